"""The fleet under fire (docs/daemon.md §4.6): real daemon processes (the fake renderer) on one inbox,
good and bad drops arriving in waves, while

- a worker in mid-render is SIGSTOPped past its lease and resumed: its job is taken over, and the
  resumed worker discards its result (``job.lost``) instead of publishing it a second time;
- the ingest leader is killed with SIGKILL (another daemon takes the inbox over) and restarted;
- the ingest leader is SIGSTOPped while drops arrive, until another daemon has taken the inbox
  over and ingested them, and resumed: a cut-off former leader moves nothing;
- PostgreSQL is stopped (``pg_ctl stop -m immediate``: every connection cut) while renders run, and
  started again 1.6 s later;
- random workers are killed with SIGKILL and restarted, and one dies (an injected crash) between
  the renames of a publish, leaving a partial result set in the outbox.

Three jobs are cancelled meanwhile (two queued, one in mid-render). At the end every good drop is
published exactly once (one mp4, one json, one log) unless it was cancelled, every bad drop and
cancelled job has exactly one failed/ folder with its reason, every input file's bytes are in archive/ or
failed/ exactly once, and no daemon exited unless the test stopped it.

PostgreSQL: 4 daemons on a cluster of the test's own (tests/daemon/pg_cluster.py). SQLite: 3
daemons on one host, no database restart. The drop counts are the full scenario's (200 good drops and
20 bad ones); INFINITETALKD_FLEET=quick runs a smaller one (32 and 11) while working on it;
INFINITETALKD_FLEET_GOOD / _BAD set other counts, INFINITETALKD_FLEET_SEED the random kills.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.jobs import Job, JobStatus
from daemon.store import Store
from tests.daemon.conftest import Env, wait_for
from tests.daemon.fleet_chaos import INCOMPLETE_S, LEASE_S, Drops, Fleet, Scenario, batches, good_drop
from tests.daemon.pg_cluster import PgCluster, pg_cluster  # noqa: F401 - the fixture

FULL = os.environ.get("INFINITETALKD_FLEET") != "quick"
N_GOOD = int(os.environ.get("INFINITETALKD_FLEET_GOOD", "200" if FULL else "32"))
N_BAD = int(os.environ.get("INFINITETALKD_FLEET_BAD", "20" if FULL else "11"))
# Events that mean a bug, whatever else happened (daemon/worker.py, daemon/watcher.py, daemon/service.py).
# (Not job.stale: a worker whose lease ran out during an outage, after it published, may meet it.)
BUG_EVENTS = {"job.internal_error", "job.finalize_failed", "scan.failed", "scan.stem_failed", "engine.load_failed",
              "store.unusable"}


@pytest.fixture
def scenario(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Scenario, PgCluster | None]]:
    backend, workers = request.param
    cluster: PgCluster | None = request.getfixturevalue("pg_cluster") if backend == "postgresql" else None
    store_cfg = {} if cluster is None else {"store": {
        "url": cluster.url, "connect_timeout_s": 2, "statement_timeout_s": 10, "lock_timeout_s": 5}}
    env = Env(tmp_path, {"watch": {"poll_interval_s": 0.1, "stable_window_s": 0.3, "incomplete_after_s": INCOMPLETE_S},
                         "jobs": {"lease_s": LEASE_S, "max_attempts": 20}, "worker": {"heartbeat_s": 0.3},
                         **store_cfg})
    fleet = Fleet(env, [f"w{i}" for i in range(workers)])
    drops = Drops(env, tmp_path / "staging")
    # The test's own polls give up on a locked SQLite file at once (and poll again), so that a lock
    # held by a stopped daemon is noticed within a poll, not after the daemons' busy timeout.
    store = Store.connect(env.config.store.model_copy(update={"busy_timeout_s": 0.2}), env.config.paths.database)
    try:
        rng = random.Random(int(os.environ.get("INFINITETALKD_FLEET_SEED", "12")))
        yield Scenario(env, fleet, drops, store, rng), cluster
    finally:
        fleet.close()
        store.close()
        env.close()


def _queued_alice(env: Env) -> Job:
    """A queued job of the recipe "x" for the drop ``alice`` in the inbox (its inputs as ingest records them)."""
    for d in (env.outbox, env.failed, env.config.paths.state):
        d.mkdir(parents=True, exist_ok=True)
    env.drop("alice")
    inputs = [{"role": role, "name": f"alice.{ext}", "size": (env.inbox / f"alice.{ext}").stat().st_size,
               "mtime_ns": (env.inbox / f"alice.{ext}").stat().st_mtime_ns}
              for role, ext in (("image", "png"), ("audio", "wav"))]
    job, _ = env.store.add(fingerprint="a" * 64, stem="alice", inputs=inputs, params={}, identity="x",
                           max_attempts=3)
    return job


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [("sqlite", 3), ("postgresql", 4)], ids=["sqlite-3", "postgresql-4"],
                         indirect=True)
def test_a_fleet_under_kills_stops_and_a_database_restart_publishes_each_job_once(
        scenario: tuple[Scenario, PgCluster | None]) -> None:
    sc, cluster = scenario
    env, fleet, drops = sc.env, sc.fleet, sc.drops
    t0 = time.monotonic()
    good, bad = batches(N_GOOD, 4), batches(N_BAD, 4)
    try:
        drops.drop(good[0], bad[0])
        fleet.start_crashing(fleet.names[0])
        for name in fleet.names[1:]:
            fleet.start(name)

        sc.sigstop_past_the_lease()
        drops.drop(good[1], bad[1])
        sc.kill_the_ingest_leader()
        sc.sigstop_the_ingest_leader(good[2], bad[2])
        if cluster is not None:
            sc.restart_postgresql(cluster)
        drops.drop(good[3], bad[3])
        sc.cancel([f"good{i:03d}" for i in good[3][-2:]])
        sc.kill_random_workers(3)
        fleet.check_alive()
        wait_for(sc.settled, timeout=120 + 2 * (N_GOOD + N_BAD), interval=0.25,
                 what="every good drop done and every bad one refused")
    except AssertionError as exc:  # with what each daemon did last
        raise AssertionError(f"{exc}\n{fleet.tail()}") from None
    fleet.wait_ready()
    fleet.check_alive()
    assert fleet.crashed, "the injected crash in mid-publish did not happen"
    for p in fleet.procs.values():
        p.terminate()
    codes = {n: p.wait(60) for n, p in fleet.procs.items()}
    assert codes == dict.fromkeys(fleet.names, 0), fleet.tail()
    assert all(p.returncode == -signal.SIGKILL for _, p in fleet.killed)
    elapsed = time.monotonic() - t0

    jobs = sc.jobs()
    cancelled = sorted(j.stem for j in jobs if j.status is JobStatus.CANCELLED)
    assert set(cancelled) <= set(drops.cancelled)
    published = sorted(set(drops.good) - set(cancelled))
    # Exactly once: one mp4, json and log per good drop, nothing else in the outbox.
    assert env.outbox_files() == sorted(f"{s}.{ext}" for s in published for ext in ("json", "log", "mp4"))
    for stem in published:
        doc = json.loads((env.outbox / f"{stem}.json").read_text())
        assert doc["outputs"]["mp4"].endswith(f"{stem}.mp4")
    # One failed/ folder per bad drop and per cancelled job, saying why.
    assert sorted(p.name for p in env.failed.iterdir()) == sorted([*drops.bad, *cancelled])
    for stem, reason in [*drops.bad.items(), *((s, "cancelled") for s in cancelled)]:
        assert reason in (env.failed / stem / "error.txt").read_text(), stem
    assert sorted(j.stem for j in jobs if j.status is JobStatus.DONE) == published
    assert sorted(j.stem for j in jobs if j.status is JobStatus.FAILED) == sorted(drops.bad)
    assert len(jobs) == len(drops.good) + len(drops.bad)
    # No input byte lost: each dropped file is in archive/ or failed/, once, as dropped.
    assert not list(env.inbox.iterdir())
    found: dict[str, list[str]] = {}
    for root in (env.archive, env.failed):
        for p in root.rglob("*"):
            if p.is_file() and p.name in drops.hashes:
                found.setdefault(p.name, []).append(hashlib.sha256(p.read_bytes()).hexdigest())
    assert {n: found.get(n) for n in drops.hashes} == {n: [h] for n, h in drops.hashes.items()}
    # Nothing went wrong inside any daemon.
    bugs = [(n, d) for n in fleet.names for d in fleet.log_lines(n) if d.get("event") in BUG_EVENTS
            or d.get("event") == "(not json)" and "Traceback" in str(d.get("line"))]
    assert not bugs, bugs[:5]
    print(f"fleet scenario: {len(fleet.names)} daemons, {len(drops.good)} good + {len(drops.bad)} bad drops, "
          f"{len(cancelled)} cancelled, {len(fleet.killed)} kills, {elapsed:.0f} s; {fleet.events}")


def test_a_cut_off_former_leader_moves_no_file_of_a_cancelled_queued_job(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes handle the same cancel request: the new ingest leader, and a former one cut off
    with the list it read before (a stale view). Only the process whose row update wins moves the
    inputs; the other moves nothing, not even files dropped again under the same names since."""
    import threading

    from daemon.metrics import Metrics
    from daemon.notify import Notifier
    from daemon.worker import Worker
    from tests.daemon.fake_renderer import FakeRenderer

    env = Env(tmp_path)
    former_store = Store.connect(env.config.store, env.config.paths.database)
    try:
        job = _queued_alice(env)
        assert env.store.request_cancel(job.id) is not None

        def worker(store: Store, name: str) -> Worker:
            return Worker(env.config, store, FakeRenderer(env.config.engine.options()), "x", notifier=Notifier({}),
                          metrics=Metrics(), stop=threading.Event(), wake=threading.Event(),
                          files_lock=threading.Lock(), name=name)

        stale = former_store.cancel_requests()  # read just before the former leader was cut off
        worker(env.store, "new-leader")._cancel_requested_jobs()
        assert sorted(p.name for p in (env.failed / "alice").iterdir()) == ["alice.png", "alice.wav", "error.txt"]
        env.drop("alice", color=(1, 2, 3))  # the user drops new files under the same names
        monkeypatch.setattr(former_store, "cancel_requests", lambda: stale)
        worker(former_store, "former-leader")._cancel_requested_jobs()
        assert [p.name for p in env.failed.iterdir()] == ["alice"]  # no second folder
        assert sorted(p.name for p in env.inbox.iterdir()) == ["alice.png", "alice.wav"]  # left alone
        done = env.store.get(job.id)
        assert done is not None and done.status is JobStatus.CANCELLED and done.failed_dir == str(env.failed / "alice")
        assert done.error == (env.failed / "alice" / "error.txt").read_text().strip()
    finally:
        former_store.close()
        env.close()


def test_a_leader_that_loses_its_lease_during_a_pass_moves_nothing_more(tmp_path: Path) -> None:
    """A re-drop of a rendered job's files is archived by the ingest leader (jobs.redo_finished =
    skip) without winning a row: a leader whose lease ran out during its pass (stopped, cut off)
    leaves them, and the rest of the inbox, to the new leader."""
    import threading

    from daemon.watcher import Scanner

    env = Env(tmp_path, {"watch": {"stable_window_s": 0}})
    try:
        for d in (env.outbox, env.config.paths.state):
            d.mkdir(parents=True, exist_ok=True)

        def scanner(leading: Callable[[], bool]) -> Scanner:
            return Scanner(env.config, env.store, "x", files_lock=threading.Lock(), wake_worker=lambda: None,
                           leading=leading, name="w")

        env.drop("alice")
        scanner(lambda: True).scan_once()
        job = env.job("alice")
        assert job is not None and job.status is JobStatus.QUEUED
        claimed = env.store.claim("w", lease_s=60)
        assert claimed is not None and claimed.id == job.id
        env.store.finish(claimed, "w", JobStatus.DONE, outputs={"mp4": "alice.mp4"})
        before = {p.name: p.read_bytes() for p in env.inbox.iterdir()}
        env.drop("zed", color=(9, 9, 9))  # a new stem after it in the pass
        answers = iter([True])  # leading when the pass starts, never again
        scanner(lambda: next(answers, False)).scan_once()
        assert {p.name: p.read_bytes() for p in env.inbox.iterdir() if p.stem == "alice"} == before
        assert not env.archive.exists() or not list(env.archive.iterdir())
        assert env.job("zed") is None
        scanner(lambda: True).scan_once()  # the leader now archives the re-drop and queues zed
        assert not (env.inbox / "alice.png").exists() and env.job("zed") is not None
    finally:
        env.close()


def test_workers_whose_clocks_are_15_minutes_off_steal_nothing(tmp_path: Path) -> None:
    """Two daemons on one host, one clock 15 minutes ahead, the other 15 minutes behind: leases are
    judged on the database's clock, so neither takes a job, a worker name or the ingest lease from
    the other; every job is rendered once, in one attempt."""
    env = Env(tmp_path, {"jobs": {"lease_s": LEASE_S}, "worker": {"heartbeat_s": 0.3}})
    fleet = Fleet(env, ["ahead", "behind"])
    stems = [f"good{i:03d}" for i in range(8)]
    try:
        for i, stem in enumerate(stems):
            good_drop(env.inbox, stem, i)
        for name, offset in (("ahead", 900), ("behind", -900)):
            fleet.start(name, {"FAKE_CLOCK_OFFSET_S": str(offset)})
        for stem in stems:
            env.wait_status(stem, JobStatus.DONE, timeout=90)
        fleet.check_alive()
        jobs = env.jobs()
        assert [j.attempts for j in jobs] == [1] * len(stems)
        assert {j.worker_id for j in jobs} == {"ahead", "behind"}  # both rendered, side by side
        events = [d.get("event") for n in fleet.names for d in fleet.log_lines(n)]
        assert "job.lost" not in events and "liveness: lost the ingest lease" not in events
        assert sum(e == "liveness: now the ingest leader (epoch 1)" for e in events) == 1
        assert env.outbox_files() == sorted(f"{s}.{ext}" for s in stems for ext in ("json", "log", "mp4"))
    finally:
        fleet.close()
        env.close()


def _claimed_alice(env: Env) -> tuple[Job, Job]:
    """One job (alice) in the store, claimed by worker "former": (the job, its claimed attempt)."""
    from daemon import inbox as ib

    for d in (env.outbox, env.failed, env.config.paths.state):
        d.mkdir(parents=True, exist_ok=True)
    env.drop("alice")
    limits = ib.Limits(max_input_bytes=2**30, max_sidecar_bytes=2**16,
                       max_image_pixels=env.config.jobs.max_image_pixels)
    prepared = ib.prepare(env.inbox, "alice", ib.Parts(image="alice.png", video=None, audio="alice.wav",
                                                       sidecar=None, marker=None, problem=None, missing=()),
                          defaults=env.config.render, identity="x", limits=limits)
    job, _ = env.store.add(fingerprint=prepared.fingerprint, stem="alice", inputs=prepared.inputs,
                           params=prepared.params, identity="x", max_attempts=3)
    held = env.store.claim("former", lease_s=60)
    assert held is not None and held.id == job.id
    return job, held


def _take_over(env: Env, job: Job) -> Job:
    """The job's lease runs out and worker "new" claims it."""
    from sqlalchemy import update

    from daemon.jobs import JobRow

    with env.store.engine.begin() as conn:
        conn.execute(update(JobRow).where(JobRow.id == job.id).values(lease_until=0.0))
    held = env.store.claim("new", lease_s=60)
    assert held is not None and held.id == job.id
    return held


def _other_holder_finishes(env: Env, job: Job, *, archive: bool) -> None:
    """The other holder's renames of a complete result set (and, with ``archive``, its archiving of
    the inputs from the inbox)."""
    from daemon.results import run_key

    for ext in ("json", "log", "mp4"):
        doc = {"job_id": job.id, "run": run_key(job), "outputs": {"mp4": "alice.mp4"}, "timings": {}}
        (env.outbox / f"alice.{ext}").write_text(json.dumps(doc) if ext == "json" else ext)
    if archive:
        (env.archive / "alice").mkdir(parents=True)
        for p in sorted(env.inbox.iterdir()):
            os.replace(p, env.archive / "alice" / p.name)


def _run_as(env: Env, renderer: Any, name: str, held: Job) -> list[str]:
    """Run one job in a worker named ``name``; the archive's paths after it."""
    import threading

    from daemon.metrics import Metrics
    from daemon.notify import Notifier
    from daemon.worker import Worker

    renderer.warmup()
    worker = Worker(env.config, env.store, renderer, "x", notifier=Notifier({}), metrics=Metrics(),
                    stop=threading.Event(), wake=threading.Event(), files_lock=threading.Lock(), name=name)
    worker.run_job(held)
    assert env.outbox_files() == ["alice.json", "alice.log", "alice.mp4"]
    return sorted(str(p.relative_to(env.archive)) for p in env.archive.rglob("*")) if env.archive.is_dir() else []


@pytest.mark.parametrize("who", ["new holder", "former holder"])
def test_a_result_published_by_the_other_holder_during_a_render_is_neither_published_nor_archived_again(
        tmp_path: Path, who: str) -> None:
    """Two holders of one job render it at once: the former one, stopped past its lease after its
    last ownership check, and the one that took the job over. Whichever finishes second finds the
    other's complete result set in the outbox when its render ends:
    - the new holder (the former one published and archived the inputs meanwhile) records the job
      done, publishing nothing a second time and archiving no copy of the inputs from its snapshot;
    - the former holder (the new one published and has not archived yet) moves nothing: the job
      is no longer its own."""
    from engine.api import RenderRequest
    from tests.daemon.fake_renderer import FakeRenderer

    env = Env(tmp_path)
    try:
        job, held = _claimed_alice(env)
        name = "former"
        if who == "new holder":  # the former holder's lease ran out; the new one took the job over
            held, name = _take_over(env, job), "new"
            assert held.attempts == 2

        class TheOtherHolderPublishes(FakeRenderer):
            def render(self, request: RenderRequest, out_path: Path, *args: Any, **kwargs: Any) -> Any:
                result = super().render(request, out_path, *args, **kwargs)
                if who == "former holder":  # meanwhile the job went to another worker
                    _take_over(env, job)
                _other_holder_finishes(env, job, archive=who == "new holder")
                return result

        archived = _run_as(env, TheOtherHolderPublishes(env.config.engine.options()), name, held)
        after = env.store.get(job.id)
        assert after is not None
        if who == "new holder":
            assert archived == ["alice", "alice/alice.png", "alice/alice.wav"] and not list(env.inbox.iterdir())
            assert after.status is JobStatus.DONE
        else:
            assert archived == [] and sorted(p.name for p in env.inbox.iterdir()) == ["alice.png", "alice.wav"]
            assert after.status is JobStatus.RUNNING and after.worker_id == "new"
    finally:
        env.close()


@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_a_holder_stopped_past_its_lease_after_its_ownership_check_settles_no_input_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str) -> None:
    """The former holder passes its ownership check, is stopped past its lease right after it, and
    resumes once the new holder has published the job and archived its inputs: its own moves (the
    publish, or failed/) find the inputs gone from the inbox and archive/alice/ holding them, and
    move no copy from its snapshot (the fleet scenario met this as an input archived twice)."""
    from daemon import files as fl
    from daemon import outbox as ob
    from engine.api import RenderError, RenderRequest
    from tests.daemon.fake_renderer import FakeRenderer

    env = Env(tmp_path)
    try:
        job, held = _claimed_alice(env)

        def stopped_past_the_lease() -> None:
            _take_over(env, job)
            _other_holder_finishes(env, job, archive=True)

        class Fails(FakeRenderer):
            def render(self, request: RenderRequest, out_path: Path, *args: Any, **kwargs: Any) -> Any:
                stopped_past_the_lease()  # (the failure path checks no ownership before its moves)
                raise RenderError("a fault of this worker")

        if outcome == "done":
            real_publish = ob.publish
            monkeypatch.setattr(ob, "publish", lambda *a, **k: (stopped_past_the_lease(), real_publish(*a, **k))[1])
            renderer = FakeRenderer(env.config.engine.options())
        else:
            renderer = Fails(env.config.engine.options())
        archived = _run_as(env, renderer, "former", held)
        assert archived == ["alice", "alice/alice.png", "alice/alice.wav"]
        assert not list(env.inbox.iterdir()) and not (env.failed.exists() and list(env.failed.iterdir()))
        after = env.store.get(job.id)
        assert after is not None and after.status is JobStatus.RUNNING and after.worker_id == "new"
        assert fl.already_settled(env.config.paths.settled, "alice", job.id, env.inbox, job.inputs) == \
            env.archive / "alice"
    finally:
        env.close()


def test_a_cancelled_jobs_inputs_that_cannot_move_yet_are_moved_at_a_later_pass(tmp_path: Path) -> None:
    """The row is won first; when failed/ cannot be written then (a full disk), the inputs stay in the
    inbox and the process that won the row moves them once it can."""
    import threading

    from daemon.metrics import Metrics
    from daemon.notify import Notifier
    from daemon.worker import Worker
    from tests.daemon import faults
    from tests.daemon.fake_renderer import FakeRenderer

    env = Env(tmp_path)
    uninstall = faults.install({"under": [str(env.failed)], "flag": str(tmp_path / "full"), "errno": "ENOSPC"})
    try:
        job = _queued_alice(env)
        env.store.request_cancel(job.id)
        worker = Worker(env.config, env.store, FakeRenderer(env.config.engine.options()), "x", notifier=Notifier({}),
                        metrics=Metrics(), stop=threading.Event(), wake=threading.Event(),
                        files_lock=threading.Lock(), name="leader")
        (tmp_path / "full").touch()
        worker._cancel_requested_jobs()
        cancelled = env.store.get(job.id)
        assert cancelled is not None and cancelled.status is JobStatus.CANCELLED and cancelled.failed_dir is None
        assert sorted(p.name for p in env.inbox.iterdir()) == ["alice.png", "alice.wav"]
        (tmp_path / "full").unlink()
        worker._cancel_requested_jobs()
        assert not list(env.inbox.iterdir())
        assert sorted(p.name for p in (env.failed / "alice").iterdir()) == ["alice.png", "alice.wav", "error.txt"]
        moved = env.store.get(job.id)
        assert moved is not None and moved.failed_dir == str(env.failed / "alice")
    finally:
        uninstall()
        env.close()
