"""The three long faults the daemon must ride out, against the real daemon process:

- the outbox full (ENOSPC, injected at the filesystem boundary) while good and bad drops keep
  arriving, then freed: every good job done once, every bad drop failed once with its real reason,
  nobody typing ``retry``;
- another process holding an exclusive lock on the job database;
- the inbox gone with jobs queued: all of them done once after it returns.

The outage lasts INFINITETALKD_SOAK_S seconds (default 3, to keep CI short); INFINITETALKD_SOAK=full
runs the lengths of the README's reliability section (outbox 60 s, lock 30 s, inbox 30 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from daemon.jobs import JobStatus
from tests.daemon.conftest import Env, spawn, wait_for, write_wav
from tests.daemon.test_reliability import _hold_lock

FULL = os.environ.get("INFINITETALKD_SOAK") == "full"


def outage_s(full_length: float) -> float:
    if FULL:
        return full_length
    return float(os.environ.get("INFINITETALKD_SOAK_S", "3"))


def _ready(env: Env, p: subprocess.Popen[bytes]) -> None:
    log = env.root / "daemon.log"
    wait_for(lambda: (log.exists() and '"daemon.ready"' in log.read_text(errors="replace")) or p.poll() is not None,
             timeout=60, what="the daemon to be ready")
    assert p.poll() is None


def _stop(p: subprocess.Popen[bytes]) -> None:
    assert p.poll() is None, f"the daemon exited by itself with {p.returncode}"
    p.terminate()
    assert p.wait(30) == 0


def _once(env: Env, stems: list[str], status: JobStatus) -> None:
    for stem in stems:
        rows = [j for j in env.jobs() if j.stem == stem]
        assert [j.status for j in rows] == [status], (stem, [(j.status.value, j.error) for j in rows])


@pytest.mark.slow
def test_soak_outbox_full_with_drops_arriving_then_freed(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    env = Env(tmp_path)
    paths = env.config.paths
    for d in (paths.outbox, paths.failed, paths.archive, paths.state, paths.tmp):
        d.mkdir(parents=True, exist_ok=True)
    full = tmp_path / "full"
    spec = {"under": [str(paths.outbox), str(paths.failed), str(paths.archive)], "flag": str(full),
            "errno": "ENOSPC"}
    procs.append(p := spawn(env, steps=3, step_s=0.02, extra_env={"FAKE_FAULTS": json.dumps(spec)}))
    _ready(env, p)
    full.touch()
    seconds = outage_s(60)
    good: list[str] = []
    bad: list[str] = []
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        env.drop(f"good{i}", color=(i % 250, 7, 7))
        write_wav(env.inbox / f"bad{i}.wav")
        (env.inbox / f"bad{i}.png").write_text("not a picture\n")
        good.append(f"good{i}")
        bad.append(f"bad{i}")
        i += 1
        time.sleep(min(1.0, seconds / 5))
        assert p.poll() is None
    assert not any(j.status is JobStatus.DONE for j in env.jobs())
    assert not any(paths.failed.iterdir())
    full.unlink()
    for stem in good:
        env.wait_status(stem, JobStatus.DONE, timeout=60 + seconds)
    for stem in bad:
        env.wait_status(stem, JobStatus.FAILED, timeout=60)
    _once(env, good, JobStatus.DONE)
    _once(env, bad, JobStatus.FAILED)
    assert all("is not a .png file" in (env.job(s).error or "") for s in bad)  # type: ignore[union-attr]
    assert all((paths.failed / s / "error.txt").exists() for s in bad)
    _stop(p)


@pytest.mark.slow
def test_soak_a_long_exclusive_lock_on_the_database(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    env = Env(tmp_path)
    # The full length outlasts SQLite's default 10 s busy timeout; a short run shortens that timeout
    # so that the lock still outlasts it and the daemon's own waiting is what is tested.
    extra = {} if FULL else {"FAKE_BUSY_TIMEOUT_S": "1"}
    procs.append(p := spawn(env, steps=3, step_s=0.02, extra_env=extra))
    _ready(env, p)
    env.drop("before")
    env.wait_status("before", JobStatus.DONE, timeout=30)
    seconds = outage_s(30)
    locker = _hold_lock(env.config.paths.database, seconds)
    stems = [f"during{i}" for i in range(3)]
    for i, stem in enumerate(stems):
        env.drop(stem, color=(i, 50, 50))
    assert locker.wait(seconds + 30) == 0
    assert p.poll() is None
    for stem in stems:
        env.wait_status(stem, JobStatus.DONE, timeout=60)
    _once(env, ["before", *stems], JobStatus.DONE)
    _stop(p)


@pytest.mark.slow
def test_soak_the_inbox_gone_with_jobs_queued(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    env = Env(tmp_path)
    procs.append(p := spawn(env, steps=5, step_s=0.1))
    _ready(env, p)
    stems = [f"job{i}" for i in range(5)]
    for i, stem in enumerate(stems):
        env.drop(stem, color=(i, 90, 9))
    wait_for(lambda: len(env.jobs()) == len(stems), timeout=30, what="the jobs to be queued")
    away = tmp_path / "inbox-away"
    env.inbox.rename(away)
    seconds = outage_s(30)
    time.sleep(seconds)
    assert p.poll() is None
    assert not any(j.status is JobStatus.FAILED for j in env.jobs())
    away.rename(env.inbox)
    for stem in stems:
        env.wait_status(stem, JobStatus.DONE, timeout=60)
    _once(env, stems, JobStatus.DONE)
    _stop(p)
