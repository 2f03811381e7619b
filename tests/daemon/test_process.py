"""The real daemon process (fake renderer injected): kill -9, SIGTERM, and the sd_notify protocol."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.jobs import JobStatus
from tests.daemon.conftest import REPO, Env, spawn, wait_for


def renders(env: Env) -> list[str]:
    f = env.root / "renders.txt"
    return [" ".join(line.split()[:2]) for line in f.read_text().splitlines()] if f.exists() else []


class OutboxSpy:
    """Samples the outbox listing on a thread: every mp4 ever visible there must be the final one."""

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox
        self.seen: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.outbox.is_dir():
                for p in self.outbox.iterdir():
                    try:
                        if p.is_file():
                            self.seen.setdefault(p.name, set()).add(p.stat().st_size)
                    except FileNotFoundError:
                        pass
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_kill_9_mid_render_then_restart_completes_once(env: Env, procs: list[subprocess.Popen[bytes]]) -> None:
    env.drop("alice")
    spy = OutboxSpy(env.outbox)
    try:
        procs.append(p := spawn(env, steps=200, step_s=0.03))
        job = wait_for(lambda: (j := env.job("alice")) is not None and j.status is JobStatus.RUNNING
                       and j.progress > 0 and j, timeout=30, what="the render to make progress")
        # outbox/.tmp/<worker>/<job>-<attempt>/
        wait_for(lambda: list((env.outbox / ".tmp").glob(f"*/{job.id}-1/alice.mp4")),
                 what="a partial mp4 in outbox/.tmp")
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        assert env.outbox_files() == []  # the partial file never left .tmp
        assert env.job("alice").status is JobStatus.RUNNING  # type: ignore[union-attr]

        procs.append(p2 := spawn(env, steps=3, step_s=0.01))
        done = env.wait_status("alice", JobStatus.DONE, timeout=30)
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(20) == 0
    finally:
        spy.stop()
    assert done.attempts == 2  # the killed attempt counted
    assert renders(env) == ["start alice", "start alice", "done alice"]
    assert env.outbox_files() == ["alice.json", "alice.log", "alice.mp4"]
    assert list((env.outbox / ".tmp").iterdir()) == []  # the orphan was cleaned at start
    final = (env.outbox / "alice.mp4").stat().st_size
    assert spy.seen["alice.mp4"] == {final}  # never visible with any other size
    assert set(spy.seen) == {"alice.json", "alice.log", "alice.mp4"}


def test_sigterm_requeues_exits_0_and_notifies_systemd(env: Env, procs: list[subprocess.Popen[bytes]],
                                                      tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.05)
    messages: list[str] = []
    listening = threading.Event()
    listening.set()

    def listen() -> None:  # drain continuously, as systemd does
        while listening.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())

    listener = threading.Thread(target=listen)
    listener.start()

    def drain() -> list[str]:
        return list(messages)

    env.drop("alice")
    procs.append(p := spawn(env, steps=400, step_s=0.03,
                            extra_env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}))
    wait_for(lambda: (j := env.job("alice")) is not None and j.status is JobStatus.RUNNING and j.progress > 0,
             timeout=30, what="the render to make progress")
    wait_for(lambda: any(m.startswith("STATUS=job 1 alice: denoise") for m in drain()), what="a STATUS with progress")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    assert time.monotonic() - t0 < 5  # stopped at the next step, not at the end of the render
    time.sleep(0.1)
    listening.clear()
    listener.join()
    sock.close()
    job = env.job("alice")
    assert job is not None and job.status is JobStatus.QUEUED and job.attempts == 0  # attempt refunded
    assert env.outbox_files() == []
    # the protocol: loading -> READY (after the engine) -> progress + watchdog pings -> STOPPING
    ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    assert any(m == "STATUS=loading the engine" for m in messages[:ready])
    after = messages[ready:]
    assert "WATCHDOG=1" in after
    assert any(m.startswith("STOPPING=1") for m in after)

    procs.append(p2 := spawn(env, steps=3, step_s=0.01))
    done = env.wait_status("alice", JobStatus.DONE, timeout=30)
    p2.send_signal(signal.SIGTERM)
    assert p2.wait(20) == 0
    assert done.attempts == 1
    assert env.outbox_files() == ["alice.json", "alice.log", "alice.mp4"]


def test_config_error_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("watch:\n  mode: sometimes\n")
    r = subprocess.run([sys.executable, "-m", "tests.daemon.fake_daemon", str(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 78
    assert "watch.mode: must be one of auto, inotify, poll" in r.stderr
