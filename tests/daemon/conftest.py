"""Fixtures for the daemon tests: fast configs, real media files, a daemon on a thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from daemon.config import Config, load_config
from daemon.jobs import Job, JobStatus
from daemon.service import run_daemon
from daemon.store import Store
from engine.api import EngineOptions
from tests.daemon.fake_renderer import FakeRenderer

REPO = Path(__file__).resolve().parents[2]


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")
        time.sleep(interval)


def write_png(path: Path, size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 120, 90)) -> Path:
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def write_wav(path: Path, seconds: float = 0.4, rate: int = 16000, freq: float = 220.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * freq * t) * 12000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def fast_config_dict(root: Path) -> dict[str, Any]:
    return {
        "paths": {"inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "state": str(root / "state"),
                  "failed": str(root / "failed"), "archive": str(root / "archive")},
        "watch": {"mode": "poll", "poll_interval_s": 0.05, "stable_window_s": 0.3, "rescan_interval_s": 5,
                  "incomplete_after_s": 60},
        "jobs": {"max_attempts": 3, "lease_s": 60, "min_free_mb": 0},
        "worker": {"heartbeat_s": 0.2},  # cancel requests and lease losses reach the render within this
        "engine": {"models_dir": str(root / "models"), "device": "cpu"},
        "logging": {"level": "info", "format": "json"},
    }


class Env:
    """A temporary installation: config file, folders, database, and a daemon on a thread."""

    def __init__(self, root: Path, overrides: dict[str, Any] | None = None) -> None:
        self.root = root
        self.config_path = root / "config.yaml"
        self.write_config(overrides or {})
        self.inbox = self.config.paths.inbox
        self.outbox = self.config.paths.outbox
        self.failed = self.config.paths.failed
        self.archive = self.config.paths.archive
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.exit_code: int | None = None
        self.renderer: FakeRenderer | None = None
        self._store: Store | None = None

    def write_config(self, overrides: dict[str, Any]) -> None:
        doc = deep_update(fast_config_dict(self.root), overrides)
        self.config_path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        self.config: Config = load_config(self.config_path)

    # -- inputs -----------------------------------------------------------------------------

    def drop(self, stem: str, *, sidecar: dict[str, Any] | str | None = None, seconds: float = 0.4,
             image_ext: str = "png", color: tuple[int, int, int] = (200, 120, 90)) -> None:
        """Write a complete job (image, speech, optional sidecar) into the inbox."""
        write_png(self.inbox / f"{stem}.{image_ext}", color=color)
        write_wav(self.inbox / f"{stem}.wav", seconds=seconds)
        if sidecar is not None:
            text = sidecar if isinstance(sidecar, str) else yaml.safe_dump(sidecar)
            (self.inbox / f"{stem}.yaml").write_text(text, encoding="utf-8")

    # -- daemon -----------------------------------------------------------------------------

    def start(self, *, steps: int = 3, step_s: float = 0.01) -> None:
        def make(options: EngineOptions) -> FakeRenderer:
            self.renderer = FakeRenderer(options, steps=steps, step_s=step_s)
            return self.renderer

        self._stop = threading.Event()

        def target() -> None:
            self.exit_code = run_daemon(self.config, make, stop=self._stop, install_signals=False)

        self._thread = threading.Thread(target=target, name="test-daemon")
        self._thread.start()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the daemon did not stop"
            self._thread = None
        return self.exit_code

    def join(self, timeout: float = 20.0) -> int | None:
        """Wait for the daemon to exit by itself."""
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the daemon did not exit"
        self._thread = None
        return self.exit_code

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.connect(self.config.store, self.config.paths.database)
        return self._store

    def jobs(self) -> list[Job]:
        return sorted(self.store.list_jobs(limit=1000), key=lambda j: j.id)

    def job(self, stem: str) -> Job | None:
        return self.store.find(stem)

    def wait_status(self, stem: str, *statuses: JobStatus, timeout: float = 15.0) -> Job:
        def check() -> Job | None:
            j = self.job(stem)
            return j if j is not None and j.status in statuses else None

        result: Job = wait_for(check, timeout, what=f"{stem} to become {[s.value for s in statuses]}")
        return result

    def outbox_files(self) -> list[str]:
        return sorted(p.name for p in self.outbox.iterdir() if p.is_file())

    def close(self) -> None:
        if self._thread is not None:
            self.stop()
        if self._store is not None:
            self._store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def make(overrides: dict[str, Any] | None = None, name: str = "site") -> Env:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        e = Env(root, overrides)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every thread a test starts (daemon, scanner, watchdog observer, metrics) must be gone after it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"threads leaked: {[t.name for t in extra]}")
        time.sleep(0.05)


# -- the real daemon process (tests/daemon/fake_daemon.py) ---------------------------------------


def spawn(env: Env, *, steps: int, step_s: float, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    e = dict(os.environ, FAKE_STEPS=str(steps), FAKE_STEP_S=str(step_s), FAKE_RECORD=str(env.root / "renders.txt"),
             PYTHONPATH=str(REPO))
    e.pop("NOTIFY_SOCKET", None)
    e.update(extra_env or {})
    # the daemon's JSON log lines go to <root>/daemon.log (appended across restarts), for assertions
    with open(env.root / "daemon.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tests.daemon.fake_daemon", str(env.config_path)], cwd=REPO,
                                env=e, stdout=out, stderr=subprocess.PIPE)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        if p.stderr:
            p.stderr.close()
