"""Start-up of ``infinitetalkd web``: the token, the bind check, uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from daemon.config import EX_CONFIG, Config
from daemon.web.app import create_app
from daemon.web.security import TokenError, check_bind, load_token

__all__ = ["serve"]


def serve(cfg: Config) -> int:
    """Run until SIGINT/SIGTERM. Exit 78 (EX_CONFIG) when the token is unreadable, or missing while
    binding anything but loopback (the server refuses to start rather than serve the LAN openly)."""
    web = cfg.web
    try:
        token = load_token(web)
        check_bind(web, token)
    except TokenError as exc:
        print(f"infinitetalkd web: {exc}", file=sys.stderr)
        return EX_CONFIG
    cfg.paths.inbox.mkdir(parents=True, exist_ok=True)
    app = create_app(cfg, token)
    where = f"http://{'[' + web.host + ']' if ':' in web.host else web.host}:{web.port}/"
    auth = "token required" if token else "no token (loopback only)"
    print(f"infinitetalkd web: serving {where} ({auth}); inbox {cfg.paths.inbox}, outbox {cfg.paths.outbox}",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=web.host, port=web.port, log_level=cfg.logging.level, access_log=False,
                            proxy_headers=False, server_header=False, lifespan="off")
    server = uvicorn.Server(config)
    server.run()
    app.state.ctx.access.close()
    return 0
