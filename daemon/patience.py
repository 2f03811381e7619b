"""Waiting out a busy or briefly unwritable database instead of dying of it.

Another process may hold the SQLite file locked for longer than the busy timeout (a backup tool,
an ``sqlite3`` shell, ``infinitetalkd status`` on a slow disk), and the disk under it may be full
for a while. Both surface as SQLAlchemy's ``OperationalError``. The daemon's call sites (worker
loop, scanner, heartbeat, recovery) go through :func:`patiently`, which retries with a capped
exponential backoff, logs the episode once when it starts and once when it ends, and gives up
only when the process is asked to stop. Anything else (a corrupt file, a schema error) is not an
``OperationalError`` and propagates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from daemon.db import is_transient
from daemon.log import get_logger

__all__ = ["patiently", "Stopped", "is_busy", "unusable_database"]

log = get_logger("infinitetalkd.db")

T = TypeVar("T")

_FIRST_WAIT_S = 0.1
_MAX_WAIT_S = 5.0


class Stopped(Exception):
    """The process was asked to stop while it waited for the database."""


def is_busy(exc: BaseException) -> bool:
    """An error worth waiting out: locked, busy, disk full or I/O trouble (all OperationalError)."""
    return isinstance(exc, OperationalError)


def patiently(call: Callable[[], T], what: str, *, stop: threading.Event | None = None,
              sleep: Callable[[float], object] = time.sleep) -> T:
    """Run ``call`` until it does not raise a busy/locked error. Raises :class:`Stopped` if
    ``stop`` is set while waiting; any other exception propagates at once."""
    wait = _FIRST_WAIT_S
    since: float | None = None
    while True:
        try:
            result = call()
        except Exception as exc:
            # Also a PostgreSQL server that restarts or drops the connection (daemon/db.py is_transient).
            if not is_transient(exc):
                raise
            if since is None:
                since = time.monotonic()
                log.warning("db.busy", during=what,
                            error=" ".join(str(getattr(exc, "orig", None) or exc).split())[:300],
                            hint="another process holds the database, or its disk is full; waiting")
            if stop is not None:
                if stop.wait(wait):
                    raise Stopped(what) from None
            else:
                sleep(wait)
            wait = min(wait * 2, _MAX_WAIT_S)
            continue
        if since is not None:
            log.info("db.ok", during=what, waited_s=round(time.monotonic() - since, 3))
        return result


def unusable_database(path: Path, exc: Exception) -> str:
    """The sentence for a job database that cannot be opened: which file, what went wrong, what to do."""
    detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return (f"the job database {path} is damaged or unreadable ({detail}); stop the daemon, move the file "
            f"(and any {path.name}-wal / -shm beside it) aside, and start again: a new, empty database is "
            "created (the inbox is scanned again; finished results stay in the outbox)")
