"""Logging: structlog in front of the stdlib, configured once by the process entry point.

- Under systemd (stdout is not a terminal) every line is one JSON object; journald adds the time,
  host and unit. On a terminal the console renderer prints readable, coloured lines.
- ``job_id`` and ``stem`` are bound through contextvars around a job (``bound_contextvars``), so
  every line of that job carries them, including records from stdlib loggers (PyAV, torch).
- :func:`job_log` writes that job's lines to a file of its own (``<stem>.log`` in the outbox),
  filtered on the contextvar, as readable key=value lines without colours. The file is appended
  to, so a job requeued after a crash or a full disk keeps every attempt; lines of the engine's
  logger from helper threads (which do not carry the contextvars) are included while the job
  runs. A full or failing disk never turns a log line into an exception: the line is dropped
  and the file's writer says so once on the main log.
- Tracebacks never include frame locals (they may hold prompts, paths, tensors).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from engine.api import short_identity

__all__ = ["setup_logging", "job_log", "get_logger", "ENGINE_LOGGER"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _record_fields(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Lift the fields of an engine event (engine/events.py: ``record.fields``) into the line, so the
    engine's records are structured in JSON and readable on the console, never a dict in a dict."""
    record = event_dict.get("_record")
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        for key, value in fields.items():
            event_dict.setdefault(str(key), value)
    return event_dict


def _short_identity(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console only: the engine identity (hundreds of characters) shortened; JSON keeps it whole."""
    identity = event_dict.get("identity")
    if isinstance(identity, str):
        event_dict["identity"] = short_identity(identity)
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        _record_fields,
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
            _short_identity,
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


ENGINE_LOGGER = "infinitetalkd.engine"


class _JobFilter(logging.Filter):
    """Passes records emitted while the contextvar ``job_id`` equals this job's id, and the
    engine's records from threads without a job bound (a process renders one job at a time).

    Filters run synchronously in the emitting thread, so the contextvars seen here are the
    emitter's: lines of other jobs (other threads) never reach this job's file.
    """

    def __init__(self, job_id: int, engine_lines: bool) -> None:
        super().__init__()
        self.job_id = job_id
        self.engine_lines = engine_lines

    def filter(self, record: logging.LogRecord) -> bool:
        bound = structlog.contextvars.get_contextvars().get("job_id")
        if bound is None:
            return self.engine_lines and record.name.startswith(ENGINE_LOGGER)
        return bool(bound == self.job_id)


class _SafeFileHandler(logging.FileHandler):
    """A FileHandler that survives ENOSPC/EIO: a failed write or close is noted, not raised."""

    failed: OSError | None = None

    def _note(self, exc: OSError) -> None:
        if self.failed is None:
            self.failed = exc

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = self.stream if self.stream is not None else self._open()
            self.stream = stream
            stream.write(msg + self.terminator)
            stream.flush()
        except OSError as exc:
            self._note(exc)
        except RecursionError:
            raise
        except Exception:  # a formatting bug must not reach the code that logged
            self.handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:
            self._note(exc)
            self.stream = None


@contextmanager
def job_log(path: Path, job_id: int, *, engine_lines: bool = False) -> Iterator[Path]:
    """Append the lines of job ``job_id`` to ``path`` while the block runs (``engine_lines``: also
    the engine logger's lines from threads with no job bound). Never raises for a write error."""
    handler = _SafeFileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(_console_formatter(colors=False))
    handler.addFilter(_JobFilter(job_id, engine_lines))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        if handler.failed is not None:
            get_logger("infinitetalkd.log").warning("job_log.incomplete", job_id=job_id, path=str(path),
                                                    error=str(handler.failed))
