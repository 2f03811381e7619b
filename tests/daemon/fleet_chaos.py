"""The fleet scenario's machinery (tests only; tests/daemon/test_fleet_scenario.py): drops good and
bad, written to a staging folder, hashed and renamed into the inbox; real daemon processes (the fake
renderer) started, killed, stopped and resumed; the faults, each waiting for the moment it needs (a
render in progress, a live ingest leader) and for its effect (a takeover) with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from daemon.jobs import Job, JobStatus
from daemon.store import Store
from daemon.store_fleet import INGEST_LEASE
from tests.daemon.conftest import REPO, Env, wait_for, write_png, write_wav
from tests.daemon.pg_cluster import PgCluster
from tests.daemon.test_inbox import png_header_only

T = TypeVar("T")

LEASE_S = 3.0
STEPS, STEP_S = 8, 0.1  # 0.8 s a render
INCOMPLETE_S = 3.0  # a stem missing its partner is refused after this long


# -- the drops ---------------------------------------------------------------------------------------


def _pair(d: Path, stem: str, *, image: bool = True, audio: bool = True, seconds: float = 0.4) -> None:
    if image:
        r, g, b = hashlib.sha1(stem.encode()).digest()[:3]  # one fingerprint each
        write_png(d / f"{stem}.png", color=(r, g, b))
    if audio:
        write_wav(d / f"{stem}.wav", seconds=seconds)


def _sidecar(d: Path, stem: str, doc: object) -> None:
    (d / f"{stem}.yaml").write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")


def _text_png(d: Path, stem: str) -> None:
    _pair(d, stem, image=False)
    (d / f"{stem}.png").write_text("this is a text file pretending to be a portrait\n")


def _corrupt_png(d: Path, stem: str) -> None:
    _pair(d, stem)
    good = (d / f"{stem}.png").read_bytes()
    (d / f"{stem}.png").write_bytes(good[:40] + b"\x00" * 30)


def _empty_wav(d: Path, stem: str) -> None:
    _pair(d, stem, audio=False)
    (d / f"{stem}.wav").touch()


def _broken_wav(d: Path, stem: str) -> None:
    _pair(d, stem, audio=False)
    (d / f"{stem}.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(40))


def _yaml_syntax(d: Path, stem: str) -> None:
    _pair(d, stem)
    _sidecar(d, stem, "seed: [1, 2\nprompt: hello\n")


def _unknown_key(d: Path, stem: str) -> None:
    _pair(d, stem)
    _sidecar(d, stem, {"sed": 3})


def _no_partner(d: Path, stem: str) -> None:
    _pair(d, stem, audio=False)  # refused once watch.incomplete_after_s passed


def _pixel_bomb(d: Path, stem: str) -> None:
    _pair(d, stem, image=False)
    png_header_only(d / f"{stem}.png", 100_000, 100_000)


def _too_long(d: Path, stem: str) -> None:
    _pair(d, stem, seconds=2.0)
    _sidecar(d, stem, {"max_duration_s": 1.0})


def _refused_by_engine(d: Path, stem: str) -> None:
    _pair(d, stem)
    _sidecar(d, stem, {"prompt": "FAIL:input"})


def _wrong_type(d: Path, stem: str) -> None:
    _pair(d, stem)
    _sidecar(d, stem, {"seed": "forty-two"})


BAD_KINDS: list[tuple[Callable[[Path, str], None], str]] = [
    (_text_png, "is not a .png file"),
    (_empty_wav, "is empty (0 bytes)"),
    (_yaml_syntax, "YAML error at line"),
    (_no_partner, "is missing a speech file"),
    (_too_long, "is 2.0 s long, more than max_duration_s"),
    (_corrupt_png, "not a readable PNG, JPEG or WebP image"),
    (_unknown_key, "unknown setting 'sed'"),
    (_pixel_bomb, "has too many pixels"),
    (_refused_by_engine, "the fake renderer refused the input"),
    (_broken_wav, "is not a readable WAV file"),
    (_wrong_type, "setting 'seed': must be a whole number"),
]


def good_drop(d: Path, stem: str, i: int) -> None:
    write_png(d / f"{stem}.png", color=(i % 256, (i // 256) % 256, 90))  # one fingerprint each
    write_wav(d / f"{stem}.wav")


@dataclass
class Drops:
    """Drops are written to a staging folder, hashed, then renamed into the inbox (as an upload tool would)."""

    env: Env
    staging: Path
    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)  # stem -> part of its reason
    hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of the bytes dropped
    cancelled: list[str] = field(default_factory=list)  # good drops cancelled (`infinitetalkd cancel`)

    def drop(self, good: range, bad: range) -> None:
        self.staging.mkdir(exist_ok=True)
        for i in good:
            stem = f"good{i:03d}"
            good_drop(self.staging, stem, i)
            self.good.append(stem)
        for i in bad:
            make, reason = BAD_KINDS[i % len(BAD_KINDS)]
            stem = f"bad{i:02d}{make.__name__}"
            make(self.staging, stem)
            self.bad[stem] = reason
        for p in sorted(self.staging.iterdir()):
            self.hashes[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
            os.replace(p, self.env.inbox / p.name)


# -- the daemons ---------------------------------------------------------------------------------------


@dataclass
class Fleet:
    env: Env
    names: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    killed: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)  # by the test
    events: list[str] = field(default_factory=list)
    started_at: dict[str, int] = field(default_factory=dict)  # name -> its log's size at its latest start
    crashed: list[str] = field(default_factory=list)  # died of the injected crash in mid-publish

    @property
    def crash_flag(self) -> Path:
        return self.env.root / "crash"

    def start_crashing(self, name: str) -> None:
        """Start ``name`` to die (exit 137, as kill -9) right after the first rename of its first
        publish: a result set half in the outbox (tests/daemon/faults.py)."""
        self.start(name, {"FAKE_FAULTS": json.dumps({"crash_after_publish": str(self.env.outbox),
                                                     "flag": str(self.crash_flag)})})

    def revive(self) -> None:
        """Restart a daemon that died of the injected crash (once)."""
        for name, p in list(self.procs.items()):
            if (p.poll() == 137 and not self.crashed and Path(f"{self.crash_flag}.crashed").exists()):
                self.crashed.append(name)
                self.events.append(f"{time.monotonic():.1f} {name} crashed in mid-publish")
                self.start(name)

    def log_of(self, name: str) -> Path:
        return self.env.root / "logs" / f"{name}.log"

    def start(self, name: str, extra_env: dict[str, str] | None = None) -> None:
        e = dict(os.environ, FAKE_STEPS=str(STEPS), FAKE_STEP_S=str(STEP_S), PYTHONPATH=str(REPO),
                 INFINITETALKD_WORKER=name, INFINITETALKD_STATE=str(self.env.root / "state" / name),
                 **(extra_env or {}))
        e.pop("NOTIFY_SOCKET", None)
        self.log_of(name).parent.mkdir(exist_ok=True)
        self.started_at[name] = self.log_of(name).stat().st_size if self.log_of(name).exists() else 0
        with open(self.log_of(name), "ab") as out:  # appended across restarts
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "tests.daemon.fake_daemon",
                                                 str(self.env.config_path)], cwd=REPO, env=e, stdout=out,
                                                stderr=subprocess.STDOUT)
        self.events.append(f"{time.monotonic():.1f} start {name}")

    def kill(self, name: str) -> None:
        p = self.procs[name]
        assert p.poll() is None, f"{name} exited by itself with {p.returncode}"
        p.send_signal(signal.SIGCONT)  # (a no-op unless stopped)
        p.kill()
        p.wait(30)
        self.killed.append((name, p))
        self.events.append(f"{time.monotonic():.1f} kill -9 {name}")

    def wait_ready(self) -> None:
        """Every daemon's latest start got as far as ``daemon.ready`` (a SIGTERM before its signal
        handlers are in place would end it as a default SIGTERM does)."""
        for name in self.names:
            def ready(n: str = name) -> bool:
                with open(self.log_of(n), "rb") as f:
                    f.seek(self.started_at[n])
                    return b'"daemon.ready"' in f.read()

            wait_for(ready, timeout=60, interval=0.1, what=f"{name} to be ready")

    def check_alive(self) -> None:
        self.revive()
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"daemons exited by themselves: {dead}\n" + self.tail()

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_of(name).read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                doc = {"event": "(not json)", "line": line}
            out.append(doc if isinstance(doc, dict) else {"event": "(not json)", "line": line})
        return out

    def tail(self, n: int = 15) -> str:
        parts = []
        for name in self.names:
            log = self.log_of(name)
            lines = log.read_text(errors="replace").splitlines()[-n:] if log.exists() else []
            parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts + ["--- events", *self.events])

    def close(self) -> None:
        for p in list(self.procs.values()):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(30)


def _sqlite_write_locked(path: Path) -> bool:
    """Another process holds the SQLite database's write lock now."""
    conn = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def _quiet(call: Callable[[], T]) -> T | None:
    """A poll of the database that may meet it restarting: None then, and the poll goes on."""
    try:
        return call()
    except Exception:  # noqa: BLE001 - the test's own reads ride out the outage like the daemons
        return None


@dataclass
class Scenario:
    env: Env
    fleet: Fleet
    drops: Drops
    store: Store
    rng: random.Random

    def jobs(self) -> list[Job]:
        return self.store.list_jobs(limit=100_000)

    def rendering(self, *, below: float = 0.6) -> Job | None:
        """A job in mid-render (past the start, well before the end) by a running daemon of the test."""
        self.fleet.revive()
        running = _quiet(lambda: self.store.list_jobs([JobStatus.RUNNING], limit=1000)) or []
        live = {n for n, p in self.fleet.procs.items() if p.poll() is None}
        return next((j for j in running if 0 < j.progress < below and j.worker_id in live), None)

    def wait_rendering(self, what: str) -> Job:
        job: Job = wait_for(self.rendering, timeout=90, interval=0.05, what=f"a render in progress ({what})")
        return job

    # -- the faults ------------------------------------------------------------------------------------

    def live_leader(self) -> str | None:
        lease = _quiet(lambda: self.store.lease(INGEST_LEASE))
        live = {n for n, p in self.fleet.procs.items() if p.poll() is None}
        return lease.holder if lease is not None and lease.remaining_s > 0 and lease.holder in live else None

    def _stopped_until(self, name: str, until: Callable[[], bool], what: str) -> bool:
        """SIGSTOP daemon ``name`` until ``until()``, then SIGCONT it. False when the stop caught it
        inside an SQLite write transaction: SQLite's lock is the stopped process's, and every sibling
        waits for it (docs/daemon.md §4.6); PostgreSQL ends such a transaction by itself."""
        p = self.fleet.procs[name]
        p.send_signal(signal.SIGSTOP)
        self.fleet.events.append(f"{time.monotonic():.1f} SIGSTOP {name} ({what})")
        sqlite = self.env.config.store.url is None
        locked_since: list[float] = []

        def outcome() -> str | None:
            if until():
                return "done"
            if sqlite and _sqlite_write_locked(self.env.config.paths.database):
                locked_since.append(locked_since[0] if locked_since else time.monotonic())
                if time.monotonic() - locked_since[0] > 2 * LEASE_S:
                    return "locked"
            else:
                locked_since.clear()
            return None

        try:
            done = wait_for(outcome, timeout=90, interval=0.1, what=what) == "done"
        finally:
            p.send_signal(signal.SIGCONT)
            self.fleet.events.append(f"{time.monotonic():.1f} SIGCONT {name}")
        if not done:
            self.fleet.events.append("(stopped inside an SQLite write transaction: again)")
        return done

    def sigstop_past_the_lease(self) -> None:
        """A worker in mid-render is stopped until another worker holds its job (its lease ran out);
        resumed, it throws its result away rather than publishing it."""
        for _ in range(5):
            # Not the ingest leader if another will do: it writes the most, so is the likeliest to
            # be caught inside a write transaction.
            leader = self.live_leader()
            victim = self.wait_rendering("to SIGSTOP")
            if victim.worker_id == leader and len(self.fleet.names) > 2:
                victim = wait_for(lambda ld=leader: (j := self.rendering()) is not None and j.worker_id != ld and j,
                                  timeout=10, interval=0.05, what="a render elsewhere")
            name = str(victim.worker_id)

            def taken(v: Job = victim, n: str = name) -> bool:
                j = _quiet(lambda: self.store.get(v.id))
                return j is not None and j.worker_id != n and j.status in (JobStatus.RUNNING, JobStatus.DONE)

            if self._stopped_until(name, taken, f"until another worker holds job {victim.id}"):
                wait_for(lambda v=victim, n=name: any(d.get("event") == "job.lost" and d.get("job_id") == v.id
                                                      for d in self.fleet.log_lines(n)),
                         timeout=30, interval=0.1, what=f"{name} to discard job {victim.id}")
                return
        raise AssertionError("every SIGSTOP caught its worker inside an SQLite write transaction")

    def sigstop_the_ingest_leader(self, good: range, bad: range) -> None:
        """Drops arrive while the ingest leader is stopped past its lease: another daemon takes the
        inbox over and ingests them; the former leader, resumed with its stale view of the inbox,
        moves nothing (the final checks: one folder per refusal, every byte once)."""
        self.drops.drop(good, bad)
        stems = [f"good{i:03d}" for i in good]
        for _ in range(5):
            old = wait_for(self.live_leader, timeout=60, what="a live ingest leader")

            def taken_over(o: str = old) -> bool:
                return (self.live_leader() not in (None, o)
                        and all(_quiet(lambda s=s: self.store.find(s)) is not None for s in stems))

            if self._stopped_until(old, taken_over, "the ingest leader, until another ingested the new drops"):
                return
        raise AssertionError("every SIGSTOP caught the leader inside an SQLite write transaction")

    def kill_the_ingest_leader(self) -> None:
        old = wait_for(self.live_leader, timeout=60, what="a live ingest leader")
        self.fleet.kill(old)
        wait_for(lambda: self.live_leader() not in (None, old), timeout=60, interval=0.1,
                 what="another daemon to take the inbox over")
        self.fleet.start(old)

    def restart_postgresql(self, cluster: PgCluster) -> None:
        self.wait_rendering("to restart PostgreSQL under")
        self.fleet.events.append(f"{time.monotonic():.1f} pg restart")
        # Down for longer than a render: renders finish during the outage and record their end
        # once it is over; a lease may run out meanwhile (a takeover, never a second publish).
        cluster.restart("immediate", down_s=2 * STEPS * STEP_S)
        self.fleet.events.append(f"{time.monotonic():.1f} pg up")

    def kill_random_workers(self, times: int) -> None:
        for _ in range(times):
            job = self.rendering(below=0.95)
            live = sorted(n for n, p in self.fleet.procs.items() if p.poll() is None)
            name = str(job.worker_id) if job is not None else self.rng.choice(live)
            self.fleet.kill(name)
            if self.rng.random() < 0.5:
                time.sleep(self.rng.uniform(0.2, LEASE_S + 1))  # long enough, at times, for a takeover
            self.fleet.start(name)
            time.sleep(self.rng.uniform(0.3, 1.5))

    def cancel(self, stems: list[str]) -> None:
        """`infinitetalkd cancel` for just-queued jobs and for one in mid-render: each ends cancelled
        (its inputs in failed/) or, when the cancel came too late, done."""
        for stem in stems:
            job = wait_for(lambda s=stem: _quiet(lambda: self.store.find(s)), timeout=60, what=f"{stem} queued")
            self.store.request_cancel(job.id)
        running = self.wait_rendering("to cancel")
        self.store.request_cancel(running.id)
        self.drops.cancelled += [*stems, running.stem]
        self.fleet.events.append(f"{time.monotonic():.1f} cancel {self.drops.cancelled}")

    # -- the end -------------------------------------------------------------------------------------

    def settled(self) -> bool:
        self.fleet.revive()
        jobs = _quiet(self.jobs)
        if jobs is None:
            return False
        by = {j.stem: j for j in jobs}
        cancelled = set(self.drops.cancelled)
        return (all(s in by and by[s].status is JobStatus.DONE for s in self.drops.good if s not in cancelled)
                and all(s in by and (by[s].status is JobStatus.DONE or by[s].status is JobStatus.CANCELLED
                                     and by[s].failed_dir) for s in cancelled)
                and all(s in by and by[s].status is JobStatus.FAILED and by[s].failed_dir for s in self.drops.bad)
                and not any(j.status in (JobStatus.QUEUED, JobStatus.RUNNING) for j in jobs))


def batches(n: int, parts: int) -> list[range]:
    """``range(n)`` in ``parts`` consecutive pieces, the first the largest (work for every worker at once)."""
    first = max(n - (parts - 1) * (n // (parts + 1)), 0)
    rest = (n - first) // (parts - 1) if parts > 1 else 0
    edges = [0, first] + [first + rest * k for k in range(1, parts - 1)] + [n]
    return [range(a, b) for a, b in zip(edges, edges[1:], strict=False)]
