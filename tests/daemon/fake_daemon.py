"""Test-only entry point: the real daemon main loop with the fake renderer injected.

    python -m tests.daemon.fake_daemon CONFIG.yaml

FAKE_STEPS, FAKE_STEP_S and FAKE_RECORD (a file that gets "start/done <stem> <pid>" lines) tune
the fake engine. FAKE_FAULTS (a JSON spec or a list of them, tests/daemon/faults.py) injects disk faults;
FAKE_BUSY_TIMEOUT_S shortens SQLite's busy timeout so that a lock held by another process outlasts
it in a short test. FAKE_CLOCK_OFFSET_S sets this process's wall clock (``time.time``) that many
seconds off, as on a host whose clock is wrong. Used by the subprocess tests (kill -9, SIGTERM, sd_notify, reliability).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from daemon.config import EX_CONFIG, ConfigError, load_config
from daemon.service import run_daemon
from engine.api import EngineOptions
from tests.daemon import faults
from tests.daemon.fake_renderer import FakeRenderer


def main(argv: list[str]) -> int:
    try:
        config = load_config(Path(argv[0]))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    steps = int(os.environ.get("FAKE_STEPS", "4"))
    step_s = float(os.environ.get("FAKE_STEP_S", "0.02"))
    record = Path(os.environ["FAKE_RECORD"]) if os.environ.get("FAKE_RECORD") else None

    def make(options: EngineOptions) -> FakeRenderer:
        return FakeRenderer(options, steps=steps, step_s=step_s, record=record)

    if os.environ.get("FAKE_FAULTS"):
        specs = json.loads(os.environ["FAKE_FAULTS"])
        for spec in specs if isinstance(specs, list) else [specs]:
            faults.install(spec)
    offset = float(os.environ.get("FAKE_CLOCK_OFFSET_S", "0"))
    if offset:
        real_time = time.time
        time.time = lambda: real_time() + offset
    busy = os.environ.get("FAKE_BUSY_TIMEOUT_S")
    return run_daemon(config, make, busy_timeout_ms=int(float(busy) * 1000) if busy else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
