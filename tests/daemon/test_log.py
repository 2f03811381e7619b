"""The daemon's log formatting of engine events (engine/events.py): fields become keys of the line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from daemon import log as dlog
from engine.events import emit


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_engine_event_fields_are_keys_of_the_line(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(dlog.sys, "stdout", out)
    dlog.setup_logging("info", fmt)
    try:
        emit("engine.chunk_done", logging.INFO, chunk=3, seconds=1.5)
        dlog.get_logger("infinitetalkd.engine").info("engine.ready", identity="dit=a.safetensors;" + "x" * 900)
    finally:
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "_infinitetalkd", False):
                root.removeHandler(h)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    if fmt == "json":
        doc = json.loads(lines[0])
        assert doc["event"] == "engine.chunk_done" and doc["chunk"] == 3 and doc["seconds"] == 1.5
        assert len(json.loads(lines[1])["identity"]) > 900  # JSON keeps the whole identity
    else:
        assert "chunk=3" in lines[0] and "seconds=1.5" in lines[0]
        assert len(lines[1]) < 400 and "sha256" in lines[1]  # the console line is not flooded
