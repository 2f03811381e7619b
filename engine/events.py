"""The engine's log records as structured events: an event name plus fields, through stdlib logging.

The engine never configures logging; the process that hosts it does (the daemon's structlog bridge). Every record
the engine logs carries ``record.msg == record.event == <name>`` (a dotted name such as ``engine.chunk_done``) and
``record.fields``, a dict of JSON-friendly values, so a formatter can print or serialise them without parsing prose.
"""

from __future__ import annotations

import logging
from typing import Any

LOGGER_NAME = "infinitetalkd.engine"
log = logging.getLogger(LOGGER_NAME)


def emit(event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log ``event`` with ``fields`` (kept whole in ``record.fields``, never merged into the record's own
    attributes, so a field called ``name`` or ``module`` cannot collide with LogRecord's)."""
    if log.isEnabledFor(level):
        log.log(level, event, extra={"event": event, "fields": fields})
