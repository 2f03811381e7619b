"""The job store on SQLite and PostgreSQL: migrations, idempotent ingest, exclusive claims, fencing,
recovery, lease takeover, the sweeper, and the transition table. Fleet tables: test_store_fleet.py."""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Column, MetaData, Table, insert, inspect, update

from daemon.db import StoreOptions, build_url, make_engine
from daemon.jobs import TRANSITIONS, Base, Job, JobRow, JobStatus
from daemon.migrations import migrate
from daemon.store import SCHEMA_VERSION, StaleJob, Store, StoreError

_JOBS = cast(Table, JobRow.__table__)


@pytest.fixture
def store(db_target: Path | str) -> Iterator[Store]:
    s = Store.open(db_target)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "jobs.db")
    yield s
    s.close()


def add(store: Store, fp: str, stem: str = "a", max_attempts: int = 3) -> int:
    job, created = store.add(fingerprint=fp, stem=stem, inputs=[{"role": "audio", "name": f"{stem}.wav"}],
                             params={"seed": 1}, identity="eng", max_attempts=max_attempts)
    assert created
    return job.id


def test_schema_version_and_pragmas(tmp_path: Path, sqlite_store: Store) -> None:
    assert sqlite_store.schema_version() == SCHEMA_VERSION == 3
    sqlite_store.close()
    again = Store.open(tmp_path / "jobs.db")  # reopening runs no migration twice
    assert again.schema_version() == SCHEMA_VERSION
    again.close()
    con = sqlite3.connect(tmp_path / "jobs.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute("UPDATE schema_meta SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version 99, newer than"):
        Store.open(tmp_path / "jobs.db")


def test_same_fingerprint_is_one_job(store: Store) -> None:
    first = add(store, "fp1")
    again, created = store.add(fingerprint="fp1", stem="other", inputs=[], params={}, identity="eng", max_attempts=3)
    assert not created and again.id == first and again.stem == "a"
    assert store.counts()["queued"] == 1


def test_claim_is_fifo_and_counts_attempts(store: Store) -> None:
    ids = [add(store, f"fp{i}") for i in range(3)]
    job = store.claim("h:1", lease_s=30)
    assert job is not None and job.id == ids[0] and job.status is JobStatus.RUNNING and job.attempts == 1
    assert job.lease_until is not None and job.lease_until > time.time() + 20
    assert [store.claim("h:1", 30).id for _ in range(2)] == ids[1:]  # type: ignore[union-attr]
    assert store.claim("h:1", 30) is None


def _claimer(target: Path | str, worker: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    s = Store.open(target)
    got = []
    while (job := s.claim(worker, 30)) is not None:
        got.append(job.id)
    s.close()
    out.put(got)


def test_concurrent_processes_never_claim_the_same_job(db_target: Path | str, store: Store) -> None:
    for i in range(60):
        add(store, f"fp{i}")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(db_target, f"h:{i}", q)) for i in range(4)]
    for p in procs:
        p.start()
    claimed = [jid for _ in procs for jid in q.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(claimed) == list(range(1, 61))  # every job once, none twice


def test_writer_waits_for_a_busy_database_instead_of_failing(tmp_path: Path, sqlite_store: Store) -> None:
    store = sqlite_store
    con = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None, check_same_thread=False)
    con.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    con.execute("UPDATE schema_meta SET version = version")
    timer = threading.Timer(0.4, lambda: con.execute("COMMIT"))
    timer.start()
    t0 = time.monotonic()
    add(store, "fp-busy")
    assert time.monotonic() - t0 >= 0.3
    timer.join()
    con.close()


def test_fencing(store: Store) -> None:
    add(store, "fp1")
    job = store.claim("h:1", 30)
    assert job is not None
    with pytest.raises(StaleJob):
        store.finish(job, "h:2", JobStatus.DONE)  # not this worker's job
    assert store.heartbeat(job, "h:1", 30, 0.5, "denoise step 2/4") == (True, False)
    assert store.get(job.id).progress_text == "denoise step 2/4"  # type: ignore[union-attr]
    store.requeue(job, "h:1", refund=True)
    assert store.get(job.id).attempts == 0  # type: ignore[union-attr]
    assert store.heartbeat(job, "h:1", 30, 0.6, "x") == (False, False)  # the old attempt lost the job
    with pytest.raises(StaleJob):
        store.finish(job, "h:1", JobStatus.DONE)
    job2 = store.claim("h:1", 30)
    assert job2 is not None and job2.attempts == 1
    done = store.finish(job2, "h:1", JobStatus.DONE, outputs={"mp4": "a.mp4"})
    assert done.status is JobStatus.DONE and done.progress == 1.0 and store.last_success() is not None


def test_recovery_requeues_then_fails_after_max_attempts(store: Store) -> None:
    host = socket.gethostname()
    add(store, "fp1", max_attempts=2)
    add(store, "fp2", max_attempts=2)
    other = store.claim("elsewhere:9", 3600)  # another host, lease valid: not touched
    assert other is not None
    assert store.claim(f"{host}:1", 30) is not None
    requeued, failed = store.recover(host)
    assert [j.attempts for j in requeued] == [1] and not failed
    assert store.claim(f"{host}:2", 30) is not None
    requeued, failed = store.recover(host)
    assert not requeued and len(failed) == 1 and "interrupted 2 times" in (failed[0].error or "")
    assert store.get(other.id).status is JobStatus.RUNNING  # type: ignore[union-attr]


def test_cancel_and_retry_transitions(store: Store) -> None:
    jid = add(store, "fp1")
    assert store.request_cancel(jid) is not None
    assert store.claim("h:1", 30) is None  # a job with a cancel request is not claimed
    [job] = store.cancel_requests()
    assert store.cancel_queued(job, error="cancelled", failed_dir="/x") is not None
    assert store.request_cancel(jid) is None  # finished jobs cannot be cancelled
    back = store.retry(jid)
    assert back is not None and back.status is JobStatus.QUEUED and not back.cancel_requested
    assert store.retry(jid) is None  # only failed or cancelled jobs
    rejected = store.add_rejected(stem="bad", inputs=[], error="bad input")
    assert rejected.rejected and rejected.status is JobStatus.FAILED
    assert store.retry(rejected.id) is None  # a refused drop is judged afresh by the scanner instead


def test_redrop_of_finished_job_requeues_it(store: Store) -> None:
    add(store, "fp1")
    job = store.claim("h:1", 30)
    assert job is not None
    done = store.finish(job, "h:1", JobStatus.FAILED, error="boom")
    again = store.requeue_finished(done, stem="renamed", inputs=[], max_attempts=5)
    assert (again.status, again.attempts, again.max_attempts, again.stem, again.error) == (
        JobStatus.QUEUED, 0, 5, "renamed", None)
    with pytest.raises(StaleJob):
        store.requeue_finished(done, stem="x", inputs=[], max_attempts=5)  # it is no longer failed


# -- migrations ---------------------------------------------------------------------------------


def test_migrated_schema_matches_the_models(store: Store) -> None:
    """The frozen migrations create exactly the tables and columns the live models describe."""
    found = inspect(store.engine)
    for table in Base.metadata.sorted_tables:
        cols = {c["name"]: c for c in found.get_columns(table.name)}
        assert set(cols) == set(table.c.keys()), table.name
        for c in table.c:
            assert cols[c.name]["nullable"] == c.nullable, (table.name, c.name)
        indexed = {tuple(i["column_names"]) for i in found.get_indexes(table.name)}
        for index in table.indexes:
            assert tuple(c.name for c in index.columns) in indexed, (table.name, index.name)


def test_upgrade_from_version_1_keeps_the_jobs(db_target: Path | str) -> None:
    opts = StoreOptions()
    url = build_url(opts, db_target) if isinstance(db_target, Path) else build_url(
        StoreOptions(url=db_target), Path())
    engine = make_engine(url, opts)
    assert migrate(engine, target=1) == (0, 1)
    v1 = {c.name for c in _JOBS.c} - {"chunks_rendered", "resumed_from_chunk", "redo_of", "redo_from_chunk",
                                       "redo_seed", "inputs_dir"}
    # the live table has version 3's columns, with ORM defaults that would insert them
    jobs_v1 = Table("jobs", MetaData(), *(Column(c.name, c.type) for c in _JOBS.c if c.name in v1))
    with engine.begin() as conn:
        conn.execute(insert(jobs_v1).values(
            fingerprint="old", stem="a", status="queued", attempts=0, max_attempts=3, cancel_requested=False,
            created_at=1.0, updated_at=1.0, inputs=[], params={}, engine_identity="", progress=0.0,
            progress_text="", outputs={}, timings={}))
    engine.dispose()
    with pytest.raises(StoreError, match="schema version 1.*infinitetalkd migrate"):
        Store.open(db_target, migrate=False)
    s2 = Store.open(db_target)
    try:
        old = s2.find("a")
        assert s2.schema_version() == 3 and old is not None
        assert (old.chunks_rendered, old.resumed_from_chunk, old.redo_of) == (0, None, None)  # version 3's columns
        assert s2.migrate() == (3, 3)  # idempotent
        assert s2.list_workers() == []  # version 2's tables exist
    finally:
        s2.close()


def _first_start(target: Path | str, barrier: Any, out: Any) -> None:
    try:
        barrier.wait(60)
        s = Store.open(target)
        out.put(("ok", s.schema_version()))
        s.close()
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        out.put(("error", repr(exc)))


def test_six_simultaneous_first_starts_all_succeed(db_target: Path | str) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, q = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_first_start, args=(db_target, barrier, q)) for _ in range(6)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [("ok", SCHEMA_VERSION)] * 6


# -- liveness: lease takeover, sweeper, database clock --------------------------------------------


def test_claim_takes_over_an_expired_lease_and_fences_the_old_holder(store: Store) -> None:
    add(store, "fp1")
    old = store.claim("a", lease_s=-1)  # lease already over on the database clock
    assert old is not None and old.attempts == 1
    new = store.claim("b", lease_s=30)
    assert new is not None and (new.id, new.worker_id, new.attempts) == (old.id, "b", 2)
    assert store.heartbeat(old, "a", 30, 0.5, "x") == (False, False)
    with pytest.raises(StaleJob):
        store.finish(old, "a", JobStatus.DONE)
    assert not store.holds(old, "a") and store.holds(new, "b")
    assert store.claim("c", 30) is None  # b's lease runs: nothing to take


def test_sweeper_fails_exhausted_and_cancels_flagged_expired_jobs(store: Store) -> None:
    add(store, "fp1", max_attempts=1)
    add(store, "fp2", max_attempts=3)
    add(store, "fp3", max_attempts=3)
    j1, j2, j3 = (store.claim(w, lease_s=30) for w in ("a", "b", "c"))
    assert j1 and j2 and j3
    store.request_cancel(j2.id)
    with store.engine.begin() as conn:  # all three holders stopped heartbeating long ago
        conn.execute(update(_JOBS).values(lease_until=_JOBS.c.lease_until - 3600))
    live = store.claim("d", 30)  # j3 is the one left to take over (j1 has no attempt, j2 a cancel)
    assert live is not None and live.id == j3.id
    swept = {j.id: j for j in store.sweep_expired()}
    assert set(swept) == {j1.id, j2.id}
    assert swept[j1.id].status is JobStatus.FAILED and "interrupted 1 times" in (swept[j1.id].error or "")
    assert swept[j2.id].status is JobStatus.CANCELLED
    assert store.sweep_expired() == [] and store.get(j3.id).status is JobStatus.RUNNING  # type: ignore[union-attr]


@pytest.mark.parametrize("offset_s", [900.0, -900.0])
def test_a_host_clock_15_minutes_off_steals_nothing(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                     offset_s: float) -> None:
    add(store, "fp1")
    held = store.claim("a", lease_s=60)
    assert held is not None
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + offset_s)  # this host's clock is wrong
    assert store.claim("b", lease_s=60) is None
    assert store.sweep_expired() == []
    assert store.recover("elsewhere") == ([], [])
    # This host's heartbeat still extends the lease from the database clock, not its own.
    assert store.heartbeat(held, "a", 60, 0.1, "step") == (True, False)
    lease_until = store.get(held.id).lease_until  # type: ignore[union-attr]
    assert lease_until is not None and 50 < lease_until - real() <= 61  # one host: real() is the database's clock
    assert store.get(held.id).worker_id == "a"  # type: ignore[union-attr]


def test_recover_worker_touches_only_its_own_jobs(store: Store) -> None:
    for i in range(3):
        add(store, f"fp{i}", max_attempts=2)
    mine = store.claim("host/cuda:0", 30)
    sibling = store.claim("host/cuda:1", lease_s=-1)  # expired, but not ours to recover
    assert mine and sibling
    requeued, failed = store.recover_worker("host/cuda:0")
    assert [j.id for j in requeued] == [mine.id] and not failed
    assert store.get(sibling.id).status is JobStatus.RUNNING  # type: ignore[union-attr]
    again = store.claim("host/cuda:0", lease_s=30)
    assert again is not None and again.id == mine.id and again.attempts == 2
    requeued, failed = store.recover_worker("host/cuda:0")
    assert not requeued and [j.id for j in failed] == [mine.id]


def test_postgres_sessions_have_timeouts_and_a_locked_row_does_not_stall(pg_url: str) -> None:
    s = Store.open(pg_url, options=StoreOptions(statement_timeout_s=5, lock_timeout_s=0.3))
    try:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "5s"
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "300ms"
        add(s, "fp1")
        job = s.claim("a", 30)
        assert job is not None
        with s.engine.connect() as other:  # an operator's transaction holds the row lock
            other.exec_driver_sql(f"SELECT id FROM jobs WHERE id = {job.id} FOR UPDATE")
            t0 = time.monotonic()
            assert s.heartbeat(job, "a", 30, 0.5, "x") is None  # gave up at lock_timeout
            assert time.monotonic() - t0 < 5
            other.rollback()
        assert s.heartbeat(job, "a", 30, 0.5, "x") == (True, False)
    finally:
        s.close()


# -- the transition table ------------------------------------------------------------------------

_Q, _R, _D, _F, _C = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED

# name: (source statuses, target status or None for unchanged); the lifecycle of daemon/jobs.py.
EXPECTED = {
    "claim": ({_Q, _R}, _R), "heartbeat": ({_R}, None), "done": ({_R}, _D), "fail": ({_R}, _F),
    "cancel_running": ({_R}, _C), "requeue": ({_R}, _Q), "give_up": ({_R}, _F), "cancel_queued": ({_Q}, _C),
    "request_cancel": ({_Q, _R}, None), "retry": ({_F, _C}, _Q), "redrop": ({_D, _F, _C}, _Q),
    "chunks": ({_R}, None),
}


def test_transition_table_matches_the_lifecycle() -> None:
    assert {n: (set(t.sources), t.target) for n, t in TRANSITIONS.items()} == EXPECTED
    fields = set(Job.__dataclass_fields__)
    for t in TRANSITIONS.values():
        assert t.sets <= fields and set(t.resets) <= fields and "status" not in t.sets | set(t.resets)
    with pytest.raises(ValueError, match="does not set"):
        TRANSITIONS["heartbeat"].values(status="done")


def _in_status(store: Store, status: JobStatus, max_attempts: int) -> Job:
    """A fresh job brought to ``status`` through the store itself (running jobs: expired lease, worker w)."""
    jid = add(store, f"fp-{status.value}-{max_attempts}", max_attempts=max_attempts)
    if status is _Q:
        return store.get(jid)  # type: ignore[return-value]
    job = store.claim("w", lease_s=-1)
    assert job is not None and job.id == jid
    return job if status is _R else store.finish(job, "w", status)


def _apply(store: Store, name: str, job: Job) -> None:
    """Ask the store for transition ``name`` of ``job`` the way the daemon does."""
    calls: dict[str, Any] = {
        "claim": lambda: store.claim("w2", 30), "heartbeat": lambda: store.heartbeat(job, "w", 30, 0.5, "s"),
        "done": lambda: store.finish(job, "w", _D), "fail": lambda: store.finish(job, "w", _F, error="e"),
        "cancel_running": lambda: store.finish(job, "w", _C), "requeue": lambda: store.requeue(job, "w", refund=False),
        "give_up": store.sweep_expired, "cancel_queued": lambda: store.cancel_queued(job, error="c", failed_dir=None),
        "request_cancel": lambda: store.request_cancel(job.id), "retry": lambda: store.retry(job.id),
        "redrop": lambda: store.requeue_finished(job, stem="b", inputs=[], max_attempts=4),
        "chunks": lambda: store.record_chunks(job, "w", 3, 1),
    }
    with contextlib.suppress(StaleJob):  # a fenced call on a job in another state refuses
        calls[name]()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_transition_applies_only_from_its_sources_and_sets_only_its_columns(store: Store, name: str) -> None:
    t = TRANSITIONS[name]
    for status in JobStatus:
        job = _in_status(store, status, max_attempts=1 if name == "give_up" else 3)
        _apply(store, name, job)
        after = store.get(job.id)
        assert after is not None
        changed = {f for f in Job.__dataclass_fields__ if getattr(after, f) != getattr(job, f)}
        sources, target = EXPECTED[name]
        if status in sources:
            assert after.status is (target or status), (name, status)
            assert changed - {"status"} <= t.sets | set(t.resets), (name, status, changed)
            assert changed, (name, status)
        else:
            assert changed == set(), (name, status, changed)
        store.delete(job.id)


def test_claim_skips_jobs_whose_recipe_it_cannot_serve(store: Store) -> None:
    add(store, "fp1")  # identity "eng"
    other, _ = store.add(fingerprint="fp2", stem="b", inputs=[], params={}, identity="multi", max_attempts=3)
    assert store.claim("w", 30, identities={"x"}) is None
    got = store.claim("w", 30, identities={"multi", "x"})
    assert got is not None and got.id == other.id
    assert store.claim("w", 30, identities={"multi"}) is None


def test_completed_tells_a_lost_reply_from_a_lost_job(store: Store) -> None:
    add(store, "fp1")
    job = store.claim("a", 30)
    assert job is not None and store.completed(job, "a") is None  # still running
    store.finish(job, "a", JobStatus.DONE, outputs={"mp4": "x.mp4"})
    with pytest.raises(StaleJob):
        store.finish(job, "a", JobStatus.DONE)  # the retry after a lost reply ...
    done = store.completed(job, "a")  # ... finds its own earlier completion
    assert done is not None and done.status is JobStatus.DONE and store.completed(job, "b") is None


def _hold_and_heartbeat(target: Path | str, ready: Any) -> None:
    s = Store.open(target)
    job = s.claim("doomed", lease_s=1.5)
    assert job is not None
    ready.set()
    while True:  # a live worker: its side thread extends the lease until the process is killed
        s.heartbeat(job, "doomed", 1.5, 0.5, "rendering")
        time.sleep(0.1)


def test_a_killed_workers_job_is_taken_over_within_its_lease(db_target: Path | str, store: Store) -> None:
    add(store, "fp1")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_and_heartbeat, args=(db_target, ready))
    proc.start()
    try:
        assert ready.wait(60)
        time.sleep(2.0)  # longer than the lease: only the heartbeats keep the job
        assert store.claim("survivor", 30) is None
        proc.kill()  # kill -9: no requeue, no goodbye
        proc.join(30)
        t0 = time.monotonic()
        while (job := store.claim("survivor", 30)) is None:
            assert time.monotonic() - t0 < 30, "the dead worker's job was never taken over"
            time.sleep(0.1)
        assert job.attempts == 2 and job.worker_id == "survivor" and time.monotonic() - t0 < 1.5 + 5
    finally:
        proc.kill()
        proc.join(30)


# -- schema 3: resume and redo ------------------------------------------------------------------------


def test_chunk_counts_are_fenced_survive_a_requeue_and_reset_on_retry(store: Store) -> None:
    add(store, "fp1")
    job = store.claim("w", 30)
    assert job is not None
    assert store.record_chunks(job, "w", 2, None)
    assert not store.record_chunks(job, "other", 9, 4)  # not the holder: nothing written
    again = store.claim("w2", 30) or store.requeue(job, "w", refund=True)
    assert again.chunks_rendered == 2 and again.resumed_from_chunk is None
    second = store.claim("w2", 30)
    assert second is not None and second.chunks_rendered == 2  # a new attempt starts from the stored total
    assert store.record_chunks(second, "w2", 5, 2)
    done = store.finish(second, "w2", JobStatus.FAILED, error="x", chunks_rendered=6)
    assert (done.chunks_rendered, done.resumed_from_chunk) == (6, 2)
    fresh = store.retry(job.id)
    assert fresh is not None and (fresh.chunks_rendered, fresh.resumed_from_chunk) == (0, None)


def test_redo_rows_and_the_checkpoint_sweep_query(store: Store) -> None:
    add(store, "fp1")
    job = store.claim("w", 30)
    assert job is not None
    done = store.finish(job, "w", JobStatus.DONE)
    redo, created = store.add_redo(done, fingerprint="redo:x", stem="a.redo-c2-s7", from_chunk=2, seed=2**40,
                                   inputs_dir="/o/.tmp/.redo/x")
    assert created and (redo.redo_of, redo.redo_from_chunk, redo.redo_seed) == (done.id, 2, 2**40)
    assert redo.status is JobStatus.QUEUED and redo.inputs == done.inputs and redo.params == done.params
    assert store.add_redo(done, fingerprint="redo:x", stem="a.redo-c2-s7", from_chunk=2, seed=2**40,
                          inputs_dir="/o/.tmp/.redo/x") == (redo, False)  # asked twice: one job
    assert store.finished_before([done.id, redo.id, 999], keep_s=3600) == {done.id: False, redo.id: False}
    assert store.finished_before([done.id], keep_s=-1) == {done.id: True}  # done longer ago than keep_s


def test_worker_pause_reason_is_stored_for_status(store: Store) -> None:
    token = store.register_worker("h/cuda:0", host="h", pid=1, device="cuda:0", gpu="g", version="v", stale_s=30)
    assert store.set_worker_paused("h/cuda:0", token, "less than jobs.min_free_mb free")
    assert not store.set_worker_paused("h/cuda:0", "not-the-token", "x")
    assert [w["paused"] for w in store.fleet_snapshot(30)["workers"]] == ["less than jobs.min_free_mb free"]
    assert store.set_worker_paused("h/cuda:0", token, "")
    assert [w.paused for w in store.list_workers()] == [None]
