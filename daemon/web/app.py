"""The FastAPI application: shared context, security middleware, error shape; routes live in
:mod:`.api` (``/api/v1``) and :mod:`.page` (the HTML page)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from jinja2 import Environment, FileSystemLoader
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.config import Config
from daemon.web import api, page
from daemon.web.context import API_PREFIX, Ctx, error
from daemon.web.security import Auth, is_loopback
from daemon.web.state import StoreAccess

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
# Multipart framing and the small text fields on top of the files themselves.
_FORM_OVERHEAD = 1 << 20
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self'; media-src 'self'; script-src 'self'; "
                               "style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # not no-referrer: with it, browsers send "Origin: null" on the page's own form posts
    "referrer-policy": "same-origin",
}


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before the form is parsed: by the
    declared Content-Length at once, or while a chunked body streams in. The endpoint never
    runs, so nothing reaches the inbox."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the upload is larger than web.max_upload_mb = {self.limit >> 20} MiB"
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.limit + _FORM_OVERHEAD:
                await error(413, message)(scope, receive, send)
                return
        seen = 0
        over = replaced = False

        async def counted() -> Message:
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit + _FORM_OVERHEAD:
                    over = True
                    raise _TooLarge()
            return msg

        async def reply(msg: Message) -> None:
            # The form parser turns the interruption into its own 400: answer 413 in its place.
            nonlocal replaced
            if not over:
                await send(msg)
            elif not replaced:
                replaced = True
                await error(413, message)(scope, receive, send)

        try:
            await self.app(scope, counted, reply)
        except _TooLarge:
            if not replaced:
                replaced = True
                await error(413, message)(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(cfg: Config, token: str | None) -> FastAPI:
    app = FastAPI(title="infinitetalkd", version="1", docs_url=None, redoc_url=None,
                  openapi_url=f"{API_PREFIX}/openapi.json",
                  description="Submit, watch, cancel and retry InfiniteTalk render jobs (README 'Web page and API').")
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    app.state.ctx = Ctx(cfg, Auth(token), StoreAccess(cfg), templates)
    loopback_only = token is None

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Without a token the server is loopback-only; refusing other Host names stops DNS rebinding
        # (a web page whose name resolves to 127.0.0.1 would otherwise count as same-origin).
        host = request.headers.get("host", "").rsplit(":", 1)[0]
        if loopback_only and not is_loopback(host):
            return error(403, f"Host {host!r} is not allowed without a token")
        response = await call_next(request)
        for k, v in _SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Response:
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # e.g. WWW-Authenticate on 401
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
        return error(400, "; ".join(parts) or "bad request")

    app.include_router(api.router, prefix=API_PREFIX)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(BodyLimit, limit=cfg.web.max_upload_mb << 20)
    return app
