"""The small status files in ``paths.state`` that ``infinitetalkd status`` reads on this host:
``inbox.json`` (the scanner's waiting list and inbox state) and ``worker.json`` (why the worker
pauses). Written whole and renamed into place, so a reader never sees half a file; not fsynced
(a status report; the next pass writes it again). A fleet's shared view is the job database."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from daemon.log import get_logger

__all__ = ["INBOX", "WORKER", "write", "read"]

INBOX = "inbox.json"
WORKER = "worker.json"

log = get_logger("infinitetalkd.statefiles")


def write(state: Path, name: str, doc: dict[str, Any]) -> None:
    """Replace ``state/name`` with ``doc``; a failure is logged, never raised."""
    path = state / name
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("status_file.failed", path=str(path), error=str(exc))


def read(state: Path, name: str) -> dict[str, Any]:
    """``state/name`` as written by :func:`write`; {} when missing or unreadable."""
    try:
        doc = json.loads((state / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
