"""Resume and redo in the daemon with the fake renderer (docs/daemon.md §4.8): the checkpoint folders' life cycle,
the chunk count over attempts, the redo command's rules and files, and each worker's pause reason in ``status``.
The real engine in the real daemon process: tests/daemon/test_resume_daemon.py."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from daemon import cli, resume
from daemon.jobs import Job, JobRow, JobStatus
from daemon.service import move_to_failed
from daemon.store import Store
from tests.daemon.conftest import Env, wait_for
from tests.daemon.fake_renderer import FakeRenderer

# -- the folders' life cycle (fake renderer) ------------------------------------------------------------


def _ckpt(env: Env, job: Job) -> Path:
    return env.outbox / ".tmp" / ".checkpoints" / str(job.id)


def test_published_failed_and_cancelled_jobs_leave_no_checkpoints(env: Env) -> None:
    env.start(steps=200, step_s=0.02)
    env.drop("good", color=(1, 1, 1))
    env.drop("bad", sidecar={"prompt": "FAIL:render"}, color=(2, 2, 2))
    env.drop("long", color=(3, 3, 3))
    good = env.wait_status("good", JobStatus.DONE, timeout=30)
    env.wait_status("bad", JobStatus.FAILED, timeout=30)
    long = wait_for(lambda: (j := env.job("long")) is not None and j.status is JobStatus.RUNNING and j.progress > 0
                    and j, timeout=30, what="the long job to run")
    assert _ckpt(env, long).is_dir()  # the renderer was given the job's folder on the outbox
    assert env.store.request_cancel(long.id) is not None
    env.wait_status("long", JobStatus.CANCELLED, timeout=30)
    assert env.stop() == 0
    assert env.renderer is not None
    folders = {o[0] for o in env.renderer.resume_options}
    assert folders == {_ckpt(env, j) for j in env.jobs()} and _ckpt(env, good) in folders
    assert all(not keep and base is None for _, keep, base in env.renderer.resume_options)  # keep_h = 0, no redo
    assert not (env.outbox / ".tmp" / ".checkpoints").exists()


def test_a_requeued_job_keeps_its_checkpoints_and_the_next_attempt_gets_the_same_folder(env: Env) -> None:
    env.start(steps=300, step_s=0.02)
    env.drop("long")
    job = wait_for(lambda: (j := env.job("long")) is not None and j.progress > 0 and j, timeout=30,
                   what="the render to make progress")
    assert env.stop() == 0  # SIGTERM's path: requeued with the attempt refunded
    assert env.job("long").status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert (_ckpt(env, job) / "fake-checkpoint").exists()
    env.start(steps=3, step_s=0.01)
    env.wait_status("long", JobStatus.DONE, timeout=30)
    assert env.stop() == 0
    assert env.renderer is not None and env.renderer.resume_options[0][0] == _ckpt(env, job)
    assert not _ckpt(env, job).exists()


def test_kept_checkpoints_are_swept_after_keep_checkpoints_h(make_env: Callable[..., Env]) -> None:
    env = make_env({"jobs": {"keep_checkpoints_h": 1}})
    env.start()
    env.drop("alice")
    job = env.wait_status("alice", JobStatus.DONE, timeout=30)
    assert env.stop() == 0
    assert env.renderer is not None and env.renderer.resume_options == [(_ckpt(env, job), True, None)]
    assert (_ckpt(env, job) / "fake-checkpoint").exists()  # kept for a redo
    stray = env.outbox / ".tmp" / ".checkpoints" / "999"  # an id this database never gave (replaced database)
    stray.mkdir()
    assert resume.sweep(env.config, env.store) == []
    assert _ckpt(env, job).exists()  # finished less than an hour ago
    with env.store.engine.begin() as conn:  # ... and now two hours ago
        conn.execute(update(JobRow.__table__).where(JobRow.id == job.id)  # type: ignore[arg-type]
                     .values(finished_at=JobRow.finished_at - 7200))
    assert resume.sweep(env.config, env.store) == [job.id]
    assert not _ckpt(env, job).exists() and stray.exists()


# -- the chunk count ------------------------------------------------------------------------------------


def _feed(tracker: resume.ChunkTracker, first: int, last: int, n: int, mux: bool) -> None:
    from engine.api import Progress

    tracker.progress(Progress("prepare", 0, 0, 0, 0, 0.0))
    for c in range(first, last + 1):
        for step in (1, 2):
            tracker.progress(Progress("denoise", c, n, step, 2, 0.5))
        tracker.progress(Progress("decode", c, n, 2, 2, 0.5))
    if mux:
        tracker.progress(Progress("mux", n, n, 0, 0, 0.99))
        tracker.progress(Progress("mux", n, n, 0, 0, 1.0))
    tracker.close()


def test_chunk_counts_over_attempts_are_stored_as_they_go(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "jobs.db")
    try:
        store.add(fingerprint="f", stem="a", inputs=[], params={}, identity="e", max_attempts=5)
        job = store.claim("w", 30)
        assert job is not None
        first = resume.ChunkTracker(store, job, "w")
        _feed(first, 1, 3, 6, mux=False)  # killed in chunk 3: chunks 1 and 2 (1-based) finished
        assert (first.finished, first.resumed_from) == (2, None)
        assert store.get(job.id).chunks_rendered == 2  # type: ignore[union-attr]
        store.requeue(job, "w", refund=False)  # what recovery does after the kill
        again = store.claim("w", 30)
        assert again is not None and again.chunks_rendered == 2
        second = resume.ChunkTracker(store, again, "w")
        _feed(second, 4, 6, 6, mux=True)  # resumed after chunk 3 (a stop hid the end of chunk 3)
        row = store.get(job.id)
        assert row is not None and (row.chunks_rendered, row.resumed_from_chunk) == (3 + 3, 3)
        assert (second.finished, second.resumed_from) == (3, 3)
        second.settle(4, 2)  # the engine's own figures win
        assert (second.total, second.resumed_from) == (3 + 4, 2)
    finally:
        store.close()


# -- redo (fake renderer): the command's rules and the job's files -----------------------------------------


def _cli(env: Env, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main([*args, "--config", str(env.config_path)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def five_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeRenderer, "chunks", 5)


def _status_doc(out: str) -> dict[str, Any]:
    """``status --json``'s document among the daemon thread's log lines (one JSON object a line)."""
    doc, _ = json.JSONDecoder().raw_decode(out, out.index('{\n  "counts"'))
    return dict(doc)


def test_redo_needs_kept_checkpoints_and_archived_inputs(make_env: Callable[..., Env], five_chunks: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    env = make_env()
    env.start()
    env.drop("alice")
    env.wait_status("alice", JobStatus.DONE, timeout=30)
    assert env.stop() == 0
    code, out = _cli(env, "redo", "alice", "--from-chunk", "2", "--seed", "7", capsys=capsys)
    assert code == 1 and "jobs.keep_checkpoints_h" in out and str(env.config_path) in out
    env.write_config({"jobs": {"keep_checkpoints_h": 1, "after_success": "delete"}})
    code, out = _cli(env, "redo", "alice", "--from-chunk", "2", capsys=capsys)
    assert code == 1 and "checkpoints of job #1 are gone" in out  # finished while none were kept
    resume.checkpoint_dir(env.config, 1).mkdir(parents=True)
    code, out = _cli(env, "redo", "alice", "--from-chunk", "2", capsys=capsys)
    assert code == 1 and "jobs.after_success: delete" in out
    env.write_config({"jobs": {"keep_checkpoints_h": 1}})
    (env.archive / "alice" / "alice.wav").write_bytes(b"changed")
    code, out = _cli(env, "redo", "alice", "--from-chunk", "2", capsys=capsys)
    assert code == 1 and "are not in" in out and "alice.wav" in out
    code, out = _cli(env, "redo", "alice", "--from-chunk", "0", capsys=capsys)
    assert code == 1 and "--from-chunk must be 1 or more" in out
    code, out = _cli(env, "redo", "alice", "--from-chunk", "5", capsys=capsys)
    assert code == 1 and "has 5 chunks (0 to 4)" in out
    assert [j.id for j in env.jobs()] == [1]  # nothing was queued


def test_redo_renders_a_copy_of_the_archived_inputs_under_a_new_name(make_env: Callable[..., Env], five_chunks: None,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    env = make_env({"jobs": {"keep_checkpoints_h": 1}})
    env.start()
    env.drop("alice")
    original = env.wait_status("alice", JobStatus.DONE, timeout=30)
    wait_for(lambda: not list(env.inbox.iterdir()), what="the inputs to be archived")
    # the user drops other files of the same names meanwhile: the redo must not take (or move) them
    env.drop("alice", seconds=0.8)
    env.wait_status("alice", JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE, timeout=30)
    code, out = _cli(env, "redo", str(original.id), "--from-chunk", "2", "--seed", "7", capsys=capsys)
    assert code == 0, out
    assert "alice.redo-c2-s7.mp4" in out and "seed 7" in out
    redo = env.wait_status("alice.redo-c2-s7", JobStatus.DONE, timeout=30)
    assert (redo.redo_of, redo.redo_from_chunk, redo.redo_seed) == (original.id, 2, 7)
    code, out = _cli(env, "redo", str(original.id), "--from-chunk", "2", "--seed", "7", capsys=capsys)
    assert code == 0 and "already re-renders" in out  # asked twice: one job
    wait_for(lambda: len([j for j in env.jobs() if j.status is JobStatus.DONE]) == 3, timeout=30,
             what="the second drop to be rendered")
    assert env.stop() == 0
    assert env.renderer is not None
    assert (_ckpt(env, redo), True, _ckpt(env, original)) in env.renderer.resume_options
    files = env.outbox_files()
    assert {"alice.mp4", "alice.redo-c2-s7.mp4", "alice.redo-c2-s7.json"} <= set(files)  # the original stays
    doc = json.loads((env.outbox / "alice.redo-c2-s7.json").read_text())
    assert doc["redo"] == {"of_job": original.id, "from_chunk": 2, "seed": 7}
    assert len(list(env.archive.iterdir())) == 2  # the two drops; no archived copy of the redo's copy
    assert not (env.outbox / ".tmp" / ".redo").exists() or not any((env.outbox / ".tmp" / ".redo").iterdir())
    code, out = _cli(env, "status", "--json", capsys=capsys)
    brief = next(j for j in _status_doc(out)["recent"] if j["id"] == redo.id)
    assert brief["redo"] == {"of_job": original.id, "from_chunk": 2, "seed": 7}


def test_status_shows_each_workers_pause_reason_from_the_database(make_env: Callable[..., Env],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    env = make_env({"jobs": {"min_free_mb": 10**9}})  # a petabyte: the disk is always "full"
    env.start()
    wait_for(lambda: any(w.paused for w in env.store.list_workers()), timeout=30, what="the pause in the database")
    # the worker writes its row first, then state/worker.json (once per change): remove the file once it is
    # there, as if the worker's own state folder were elsewhere (a fleet worker's)
    local = env.config.paths.state / "worker.json"
    wait_for(local.exists, timeout=30, what="state/worker.json")
    local.unlink()
    code, out = _cli(env, "status", capsys=capsys)
    assert code == 0 and re.search(r"^paused   less than jobs.min_free_mb = \d+ MiB free .* \(worker .+\)$", out,
                                   re.MULTILINE), out
    code, out = _cli(env, "status", "--json", capsys=capsys)
    assert "jobs.min_free_mb" in _status_doc(out)["workers"][0]["paused"]
    assert env.stop() == 0


def test_a_redo_failed_by_recovery_moves_its_own_inputs_not_the_inboxs(make_env: Callable[..., Env], five_chunks: None,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    env = make_env({"jobs": {"keep_checkpoints_h": 1}})
    env.start()
    env.drop("alice")
    env.wait_status("alice", JobStatus.DONE, timeout=30)
    wait_for(lambda: not list(env.inbox.iterdir()), what="the inputs to be archived")
    assert env.stop() == 0
    code, out = _cli(env, "redo", "alice", "--from-chunk", "2", "--seed", "7", capsys=capsys)
    assert code == 0, out
    redo = env.job("alice.redo-c2-s7")
    assert redo is not None and redo.inputs_dir
    # the user's own files of the same names, in the inbox (unstable on purpose: not yet a job)
    names = sorted(str(i["name"]) for i in redo.inputs)
    for n in names:
        (env.inbox / n).write_bytes(b"the user's newer file")
    claimed = env.store.claim("gone", 60)
    assert claimed is not None and claimed.id == redo.id
    failed = env.store.finish(claimed, "gone", JobStatus.FAILED, error="interrupted too often")
    assert failed is not None
    move_to_failed(env.config, env.store, [failed], threading.Event())
    assert all((env.inbox / n).read_bytes() == b"the user's newer file" for n in names)  # untouched
    dest = Path(env.store.get(redo.id).failed_dir or "")  # type: ignore[union-attr]
    assert sorted(p.name for p in dest.iterdir() if p.name in names) == names
    assert all((dest / n).read_bytes() != b"the user's newer file" for n in names)
