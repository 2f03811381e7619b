"""Which worker of a fleet this process is: its name, device, state folder and metrics port.

One config file serves every GPU of a host (docs/daemon.md §4): the template unit
``systemd/infinitetalkd@.service`` sets, per instance,

- ``INFINITETALKD_DEVICE`` (or ``infinitetalkd run --device``): overrides ``engine.device``;
- ``INFINITETALKD_STATE``: this worker's own state folder (lock, job logs, ``worker.json``,
  ``inbox.json``); the SQLite database stays where the config's ``paths.state`` puts it, shared by
  the workers of the host;
- ``INFINITETALKD_METRICS_PORT``: overrides ``metrics.port``;
- ``INFINITETALKD_WORKER``: overrides ``worker.name``.

The worker name defaults to ``<host>/<device>``.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config, ConfigError

__all__ = ["Instance", "resolve", "safe_name", "stale_after"]

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Instance:
    name: str
    config: Config  # the config with this instance's device, state folder and metrics port applied
    database: Path  # the SQLite database (shared by the workers of a host); unused with store.url

    @property
    def tmp(self) -> Path:
        """This worker's work folders: ``outbox/.tmp/<worker>/``; it cleans only these."""
        return self.config.paths.tmp / safe_name(self.name)


def safe_name(name: str) -> str:
    """A worker name as one path component (``host/cuda:0`` -> ``host_cuda_0``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "worker"


def resolve(config: Config, *, device: str | None = None, env: Mapping[str, str] | None = None) -> Instance:
    """Apply ``--device`` and the INFINITETALKD_* variables to ``config``. Raises ConfigError for a
    malformed value (naming the variable)."""
    env = os.environ if env is None else env
    device = device or env.get("INFINITETALKD_DEVICE") or None
    if device is not None and not _DEVICE_RE.match(device):
        raise ConfigError(f"device {device!r} (--device or INFINITETALKD_DEVICE): must be auto, cpu, cuda or cuda:N")
    engine = config.engine if device is None else config.engine.model_copy(update={"device": device})
    paths, metrics = config.paths, config.metrics
    if env.get("INFINITETALKD_STATE"):
        paths = paths.model_copy(update={"state": Path(env["INFINITETALKD_STATE"])})
    if env.get("INFINITETALKD_METRICS_PORT"):
        raw = env["INFINITETALKD_METRICS_PORT"]
        if not raw.isdigit() or not 1 <= int(raw) <= 65535:
            raise ConfigError(f"INFINITETALKD_METRICS_PORT={raw!r}: must be a port number (1-65535)")
        metrics = metrics.model_copy(update={"port": int(raw)})
    name = env.get("INFINITETALKD_WORKER") or config.worker.name or f"{socket.gethostname()}/{engine.device}"
    new = config.model_copy(update={"engine": engine, "paths": paths, "metrics": metrics})
    new._source = config.source
    return Instance(name=name, config=new, database=config.paths.database)


def stale_after(config: Config) -> float:
    """A worker row without a heartbeat for this long is dead: its name may be taken over and
    ``status`` shows it as stale."""
    return max(3 * config.worker.heartbeat_s, min(config.jobs.lease_s, 60.0))
