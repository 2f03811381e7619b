"""The job store on SQLite: migrations, idempotent ingest, exclusive claims, fencing, recovery."""

from __future__ import annotations

import multiprocessing
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from daemon.jobs import JobStatus
from daemon.store import SCHEMA_VERSION, StaleJob, Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "jobs.db")
    yield s
    s.close()


def add(store: Store, fp: str, stem: str = "a", max_attempts: int = 3) -> int:
    job, created = store.add(fingerprint=fp, stem=stem, inputs=[{"role": "audio", "name": f"{stem}.wav"}],
                             params={"seed": 1}, identity="eng", max_attempts=max_attempts)
    assert created
    return job.id


def test_schema_version_and_pragmas(tmp_path: Path, store: Store) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
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


def _claimer(path: str, worker: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    s = Store.open(Path(path))
    got = []
    while (job := s.claim(worker, 30)) is not None:
        got.append(job.id)
    s.close()
    out.put(got)


def test_concurrent_processes_never_claim_the_same_job(tmp_path: Path, store: Store) -> None:
    for i in range(60):
        add(store, f"fp{i}")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path / "jobs.db"), f"h:{i}", q)) for i in range(4)]
    for p in procs:
        p.start()
    claimed = [jid for _ in procs for jid in q.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(claimed) == list(range(1, 61))  # every job once, none twice


def test_writer_waits_for_a_busy_database_instead_of_failing(tmp_path: Path, store: Store) -> None:
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
