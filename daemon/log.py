"""Logging: structlog in front of the stdlib, configured once by the process entry point.

- Under systemd (stdout is not a terminal) every line is one JSON object; journald adds the time,
  host and unit. On a terminal the console renderer prints readable, coloured lines.
- ``job_id`` and ``stem`` are bound through contextvars around a job (``bound_contextvars``), so
  every line of that job carries them, including records from stdlib loggers (PyAV, torch).
- :func:`job_log` writes that job's lines to a file of its own (``<stem>.log`` in the outbox),
  filtered on the contextvar, as readable key=value lines without colours.
- Tracebacks never include frame locals (they may hold prompts, paths, tensors).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

__all__ = ["setup_logging", "job_log", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _json_formatter() -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ],
    )


def _console_formatter(colors: bool) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # plain_traceback: no rich tracebacks (those show locals by default).
            structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback),
        ],
    )


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog and stdlib logging to stdout. ``fmt``: auto | json | console."""
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_json_formatter() if fmt == "json" else _console_formatter(colors=sys.stdout.isatty()))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_infinitetalkd", False):
            root.removeHandler(old)
    handler._infinitetalkd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    inotify_log = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _StopNoise) for f in inotify_log.filters):
        inotify_log.addFilter(_StopNoise())


class _StopNoise(logging.Filter):
    """watchdog 7 logs an *error* when its inotify thread is stopped while a read is pending (a
    normal shutdown); drop exactly that line so journals do not show a false alarm at every stop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


class _JobFilter(logging.Filter):
    """Passes records emitted while the contextvar ``job_id`` equals this job's id.

    Filters run synchronously in the emitting thread, so the contextvars seen here are the
    emitter's: lines of other jobs (other threads) never reach this job's file.
    """

    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id

    def filter(self, record: logging.LogRecord) -> bool:
        return structlog.contextvars.get_contextvars().get("job_id") == self.job_id


@contextmanager
def job_log(path: Path, job_id: int) -> Iterator[Path]:
    """Copy the lines of job ``job_id`` into ``path`` while the block runs."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_console_formatter(colors=False))
    handler.addFilter(_JobFilter(job_id))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
