"""The eleven ways one input or one ordinary fault used to wedge or kill the daemon, one test each
(numbered as in the reliability section of the README), plus the pieces they rest on: the job log
across attempts, the result document's shape, the re-drop table, all-or-nothing file moves.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import cli
from daemon import outbox as ob
from daemon.instance import safe_name
from daemon.jobs import JobStatus
from tests.daemon import faults
from tests.daemon.conftest import REPO, Env, spawn, wait_for, write_png, write_wav

__all__ = ["wav_bytes", "streaming_wav"]


def wav_bytes(seconds: float = 0.4, rate: int = 16000, declared: int | None = None) -> bytes:
    """A 16-bit mono PCM WAV; ``declared``: the data size its header states (default: the truth)."""
    pcm = (b"\x10\x20" * int(seconds * rate))
    size = len(pcm) if declared is None else declared
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    riff = min(0xFFFFFFFF, 4 + 8 + len(fmt) + 8 + size)
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", size) + pcm)


def streaming_wav(seconds: float = 0.4) -> bytes:
    """As written by a tool streaming to a pipe: both size fields 0xFFFFFFFF."""
    data = bytearray(wav_bytes(seconds))
    data[4:8] = b"\xff\xff\xff\xff"
    data[40:44] = b"\xff\xff\xff\xff"
    return bytes(data)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def disk_faults() -> Iterator[Callable[[dict[str, object]], None]]:
    removers: list[Callable[[], None]] = []

    def install(spec: dict[str, object]) -> None:
        removers.append(faults.install(spec))

    # (the daemon's folders exist before the disk fills: a daemon that cannot create them stops at start)

    yield install
    for r in removers:
        r()


def make_dirs(env: Env) -> None:
    paths = env.config.paths
    for d in (paths.outbox, paths.failed, paths.archive, paths.state, paths.tmp, paths.state / "joblogs"):
        d.mkdir(parents=True, exist_ok=True)


def inbox_status(env: Env) -> dict[str, Any]:
    """state/inbox.json, {} before the first scan wrote it."""
    try:
        doc: dict[str, Any] = json.loads((env.config.paths.state / "inbox.json").read_text())
    except FileNotFoundError:
        return {}
    return doc


def rows(env: Env, stem: str) -> list[object]:
    return [j for j in env.jobs() if j.stem == stem]


# -- 1. a sidecar number no setting can hold ---------------------------------------------------


def test_1_a_huge_number_in_a_sidecar_is_refused_once_and_other_stems_go_on(env: Env,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    env.drop("a_huge", sidecar="seed: " + "9" * 400 + "\n", color=(1, 2, 3))
    env.drop("b_huge", sidecar="shift: " + "7" * 5000 + "\n", color=(3, 2, 1))  # beyond int-from-text limits
    env.drop("z_good", color=(9, 9, 9))  # sorted after them
    env.start()
    env.wait_status("z_good", JobStatus.DONE)
    a = env.wait_status("a_huge", JobStatus.FAILED)
    b = env.wait_status("b_huge", JobStatus.FAILED)
    assert "setting 'seed'" in (a.error or "") and "out of range" in (a.error or "")
    assert "b_huge.yaml" in (b.error or "")
    time.sleep(0.5)  # several scan passes at 0.05 s
    assert len(env.jobs()) == 3
    assert env.stop() == 0
    assert capsys.readouterr().out.count('"scan.failed"') == 0


def test_1_an_unexpected_error_for_one_stem_refuses_it_once(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from daemon import inbox as ib

    real = ib.prepare

    def buggy(inbox: Path, stem: str, *a: object, **k: object) -> ib.Prepared:
        if stem == "a_bug":
            raise OverflowError("int too large to convert to float")
        return real(inbox, stem, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(ib, "prepare", buggy)
    env.drop("a_bug", color=(4, 4, 4))
    env.drop("b_good", color=(5, 5, 5))
    env.start()
    env.wait_status("b_good", JobStatus.DONE)
    bug = env.wait_status("a_bug", JobStatus.FAILED)
    assert "internal error while checking the files: OverflowError" in (bug.error or "")
    assert (env.failed / "a_bug" / "a_bug.png").exists()
    time.sleep(0.3)
    assert len(rows(env, "a_bug")) == 1
    assert env.stop() == 0
    assert capsys.readouterr().out.count('"scan.stem_failed"') == 1


# -- 2 and 3. a full outbox ------------------------------------------------------------------------


def test_2_3_a_full_outbox_requeues_refusals_and_renders_later_without_retry(
        env: Env, disk_faults: Callable[[dict[str, object]], None], capsys: pytest.CaptureFixture[str]) -> None:
    flag = env.root / "disk-full"
    flag.touch()
    make_dirs(env)
    joblogs = env.config.paths.state / "joblogs"
    disk_faults({"under": [str(env.outbox), str(env.failed), str(env.archive), str(joblogs)],
                 "flag": str(flag), "errno": "ENOSPC"})
    (env.inbox / "bad.png").write_text("not an image at all\n")
    write_wav(env.inbox / "bad.wav")
    env.drop("good")
    env.start()
    good = wait_for(lambda: (j := env.job("good")) is not None and j.error and j, what="good to hit the full disk")
    assert good.status in (JobStatus.QUEUED, JobStatus.RUNNING) and "disk full" in (good.error or "")
    time.sleep(1.0)  # many scan passes with the disk still full
    assert len(rows(env, "bad")) <= 1 and not any(env.failed.iterdir())

    def says_paused() -> bool:
        assert cli.main(["status", "--config", str(env.config_path)]) == 0
        return "paused   a job hit a full or failing disk" in capsys.readouterr().out

    wait_for(says_paused, what="status to say why the worker is paused")
    assert sorted(p.name for p in env.inbox.iterdir()) == ["bad.png", "bad.wav", "good.png", "good.wav"]
    flag.unlink()  # space freed: nobody types retry
    done = env.wait_status("good", JobStatus.DONE, timeout=30)
    bad = env.wait_status("bad", JobStatus.FAILED, timeout=30)
    assert done.attempts == 1  # the disk-full attempts were refunded
    assert "bad.png is not a .png file" in (bad.error or "")
    assert len(rows(env, "bad")) == 1 and len(rows(env, "good")) == 1
    # the row is won first, then the files move (database first): wait for the reason file
    reason = wait_for((env.failed / "bad" / "error.txt").is_file, timeout=30, what="failed/bad/error.txt") and \
        (env.failed / "bad" / "error.txt").read_text()
    assert reason.startswith("bad.png is not a .png file")
    assert env.outbox_files() == ["good.json", "good.log", "good.mp4"]
    assert env.stop() == 0


def test_3_recovery_at_start_survives_a_full_disk(env: Env, disk_faults: Callable[[dict[str, object]], None]) -> None:
    env.drop("alice")
    store = env.store
    job, _ = store.add(fingerprint="f" * 64, stem="alice", inputs=[
        {"role": "image", "name": "alice.png", "size": 1, "mtime_ns": 1, "sha256": "x"},
        {"role": "audio", "name": "alice.wav", "size": 1, "mtime_ns": 1, "sha256": "y"}],
        params={}, identity="old", max_attempts=1)
    claimed = store.claim("elsewhere:1", lease_s=-1)  # an expired lease on its last attempt
    assert claimed is not None and claimed.id == job.id
    flag = env.root / "disk-full"
    flag.touch()
    make_dirs(env)
    disk_faults({"under": [str(env.failed)], "flag": str(flag)})
    env.start()
    failed = wait_for(lambda: (j := store.get(job.id)) is not None and j.status is JobStatus.FAILED and j,
                      what="the interrupted job to fail")
    assert "interrupted" in (failed.error or "") and failed.failed_dir is None
    # failed/ could not be written: the inputs stayed in the inbox, where they became a job again
    env.wait_status("alice", JobStatus.DONE)
    assert env.exit_code is None  # still running
    assert env.stop() == 0


# -- 4. an image of an extreme shape ---------------------------------------------------------------


def test_4_an_image_strip_is_refused_before_any_resize(env: Env) -> None:
    write_png(env.inbox / "strip.png", size=(4000, 1))
    write_wav(env.inbox / "strip.wav")
    env.start()
    job = env.wait_status("strip", JobStatus.FAILED)
    assert "strip.png is 4000x1" in (job.error or "") and "crop it" in (job.error or "")
    assert env.stop() == 0


def test_4_the_engine_cover_resize_of_a_strip_stays_small() -> None:
    code = ("import resource, numpy as np; from engine.frames import resize_cover_crop;"
            "out = resize_cover_crop(np.zeros((1, 4000, 3), np.uint8), (320, 320));"
            "assert out.shape == (320, 320, 3), out.shape;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 900 * 1024  # KiB: torch alone is ~400 MiB; the naive resize needs 1.2 GiB more


# -- 5. a locked or corrupt database ---------------------------------------------------------------


def _hold_lock(db: Path, seconds: float) -> subprocess.Popen[bytes]:
    code = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(float(sys.argv[2]));"
            "c.execute('COMMIT')")
    p = subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds)], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"locked"
    return p


def test_5_a_database_locked_by_another_process_is_waited_out(env: Env, procs: list[subprocess.Popen[bytes]],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    procs.append(p := spawn(env, steps=3, step_s=0.01, extra_env={"FAKE_BUSY_TIMEOUT_S": "0.3"}))
    env.drop("before")
    env.wait_status("before", JobStatus.DONE, timeout=30)
    locker = _hold_lock(env.config.paths.database, 6.0)
    env.drop("during", color=(7, 7, 7))
    # `status` says so in a sentence while the lock is held
    code = cli.main(["status", "--config", str(env.config_path)])
    assert code == 1 and "database busy" in capsys.readouterr().err
    assert locker.wait(30) == 0
    env.wait_status("during", JobStatus.DONE, timeout=30)
    assert p.poll() is None  # the daemon lived through it
    p.terminate()
    assert p.wait(20) == 0


def test_5_a_corrupt_database_at_start_exits_78_with_a_sentence(env: Env) -> None:
    env.config.paths.state.mkdir(parents=True, exist_ok=True)
    env.config.paths.database.write_bytes(b"this is not an SQLite database, just some bytes\n" * 100)
    r = subprocess.run([sys.executable, "-m", "tests.daemon.fake_daemon", str(env.config_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 78
    assert "Traceback" not in r.stdout + r.stderr
    assert f"the job database {env.config.paths.database} is damaged or unreadable" in r.stdout
    assert cli.main(["status", "--config", str(env.config_path)]) == 78


# -- 6. the inbox gone for a while -----------------------------------------------------------------


def test_6_queued_jobs_wait_while_the_inbox_is_gone_and_run_when_it_is_back(env: Env) -> None:
    env.start(steps=10, step_s=0.05)
    for n, stem in enumerate(("a", "b", "c")):
        env.drop(stem, color=(n * 10, 1, 1))
    wait_for(lambda: len(env.jobs()) == 3, what="three queued jobs")
    away = env.root / "inbox-away"
    env.inbox.rename(away)  # a NAS unmounted, a sync tool renaming
    wait_for(lambda: inbox_status(env).get("inbox_missing"), what="the inbox reported missing")
    time.sleep(2.0)  # longer than a render: the worker would have claimed the queued jobs by now
    assert all(j.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE) for j in env.jobs())
    away.rename(env.inbox)
    for stem in ("a", "b", "c"):
        env.wait_status(stem, JobStatus.DONE, timeout=30)
    assert len(env.jobs()) == 3
    assert env.stop() == 0


def test_6_an_idle_inotify_inbox_renamed_away_is_noticed_within_the_poll_interval(make_env: Callable[..., Env]) -> None:
    env = make_env({"watch": {"mode": "inotify", "poll_interval_s": 0.2, "rescan_interval_s": 600}})
    env.start()
    wait_for(lambda: inbox_status(env), what="the first scan")
    env.inbox.rename(env.root / "away")
    wait_for(lambda: inbox_status(env).get("inbox_missing"), timeout=5, what="the inbox reported missing")
    (env.root / "away").rename(env.inbox)
    wait_for(lambda: inbox_status(env).get("inbox_missing") is False, timeout=5, what="the inbox back")
    env.drop("alice")
    env.wait_status("alice", JobStatus.DONE)
    assert env.stop() == 0


# -- 7. files that change after the claim, or are still being written -------------------------------


def test_7_a_file_replaced_after_the_claim_is_not_archived_as_the_renders_input(env: Env) -> None:
    env.start(steps=60, step_s=0.03)
    env.drop("alice", seconds=0.4)
    old = sha(env.inbox / "alice.wav")
    wait_for(lambda: (j := env.job("alice")) is not None and j.status is JobStatus.RUNNING and j.progress > 0,
             what="the render to run")
    write_wav(env.inbox / "alice.wav.part", seconds=0.6, freq=330.0)
    os.replace(env.inbox / "alice.wav.part", env.inbox / "alice.wav")  # rename-over mid-render
    new = sha(env.inbox / "alice.wav")
    wait_for(lambda: len([j for j in env.jobs() if j.status is JobStatus.DONE]) == 2, timeout=30,
             what="the first render and the new file's own job")
    first = json.loads((env.outbox / "alice.json").read_text())
    audio = next(i for i in first["inputs"] if i["role"] == "audio")
    assert audio["sha256"] == old
    archived = sorted(env.archive.rglob("alice.wav"))
    assert sorted(sha(p) for p in archived) == sorted([old, new])
    assert sha(next(p for p in archived if p.parent.name == "alice")) == old
    assert env.stop() == 0


def test_7_10_a_wav_whose_header_promises_more_waits_for_the_rest(make_env: Callable[..., Env]) -> None:
    env = make_env({"watch": {"incomplete_after_s": 60}})
    full = wav_bytes(0.6)
    write_png(env.inbox / "slow.png")
    (env.inbox / "slow.wav").write_bytes(full[: len(full) // 3])  # a writer that paused
    env.start()
    wait_for(lambda: any("still being written" in w["reason"] for w in inbox_status(env).get("waiting", [])),
             what="the stem to wait")
    assert env.jobs() == []
    with open(env.inbox / "slow.wav", "ab") as f:
        f.write(full[len(full) // 3:])
    env.wait_status("slow", JobStatus.DONE)
    doc = json.loads((env.outbox / "slow.json").read_text())
    assert next(i for i in doc["inputs"] if i["role"] == "audio")["size"] == len(full)
    assert env.stop() == 0


def test_10_a_truncated_wav_is_refused_after_incomplete_after_s(make_env: Callable[..., Env]) -> None:
    env = make_env({"watch": {"incomplete_after_s": 1}})
    write_png(env.inbox / "cut.png")
    (env.inbox / "cut.wav").write_bytes(wav_bytes(0.6)[:5000])
    env.start()
    job = env.wait_status("cut", JobStatus.FAILED)
    assert "cut.wav is truncated or still being written" in (job.error or "")
    assert env.stop() == 0


def test_10_a_streaming_header_wav_is_read_by_its_real_length(env: Env) -> None:
    write_png(env.inbox / "piped.png")
    (env.inbox / "piped.wav").write_bytes(streaming_wav(0.4))
    env.start()
    env.wait_status("piped", JobStatus.DONE)
    assert env.stop() == 0


# -- 8. kill -9 in the middle of publishing --------------------------------------------------------


def test_8_kill_9_after_the_first_publish_rename_leaves_no_stray_set(env: Env,
                                                                     procs: list[subprocess.Popen[bytes]]) -> None:
    env.drop("alice")
    spec = json.dumps({"crash_after_publish": str(env.outbox), "flag": str(env.root / "crash")})
    procs.append(p := spawn(env, steps=2, step_s=0.01, extra_env={"FAKE_FAULTS": spec}))
    assert p.wait(60) == 137  # died right after the first rename into the outbox
    assert len(env.outbox_files()) == 1
    procs.append(p2 := spawn(env, steps=2, step_s=0.01))
    env.wait_status("alice", JobStatus.DONE, timeout=30)
    p2.terminate()
    assert p2.wait(20) == 0
    assert env.outbox_files() == ["alice.json", "alice.log", "alice.mp4"]


def test_8_kill_9_between_refusing_a_drop_and_moving_it_leaves_no_file_in_the_inbox(
        env: Env, procs: list[subprocess.Popen[bytes]]) -> None:
    """The refusal is recorded first (database first); a daemon killed before the move leaves the
    files in the inbox and a row that nobody else may move (docs/daemon.md §4.3). Once the row is
    older than jobs.lease_s, the ingest leader moves them itself."""
    env.write_config({"jobs": {"lease_s": 3}})
    (env.inbox / "bad.png").write_bytes(b"this is text, not a picture")
    write_wav(env.inbox / "bad.wav", 0.4)
    spec = json.dumps({"crash_before_mkdir": str(env.failed), "flag": str(env.root / "crash")})
    procs.append(p := spawn(env, steps=2, step_s=0.01, extra_env={"FAKE_FAULTS": spec}))
    assert p.wait(60) == 137  # died between the refusal's row and its move
    job = env.job("bad")
    assert job is not None and job.status is JobStatus.FAILED and job.failed_dir is None
    assert sorted(p.name for p in env.inbox.iterdir()) == ["bad.png", "bad.wav"]
    procs.append(p2 := spawn(env, steps=2, step_s=0.01))
    wait_for(lambda: not list(env.inbox.iterdir()), timeout=30, what="the refused files moved")
    job = env.job("bad")
    assert job is not None and job.failed_dir == str(env.failed / "bad")
    assert sorted(p.name for p in (env.failed / "bad").iterdir()) == ["bad.png", "bad.wav", "error.txt"]
    assert "bad.png" in (env.failed / "bad" / "error.txt").read_text()
    assert len(env.jobs()) == 1
    p2.terminate()
    assert p2.wait(20) == 0


def test_8_a_cancelled_jobs_files_left_in_the_inbox_are_moved_once_the_row_is_older_than_the_lease(
        env: Env) -> None:
    """The cancel of a queued job won its row and its process died before the move: the scanner leaves
    the files while the row is younger than jobs.lease_s (the winner may still be moving them), looks
    again after a back-off (a decision it remembered would never be looked at again), and moves them to
    failed/ itself once the row is older, recording where."""
    import threading

    from sqlalchemy import update

    from daemon.jobs import JobRow
    from daemon.service import move_to_failed
    from daemon.watcher import Scanner

    env.config.paths.state.mkdir(parents=True, exist_ok=True)
    scanner = Scanner(env.config, env.store, "test", files_lock=threading.Lock(), wake_worker=lambda: None,
                      move_to_failed=lambda jobs: move_to_failed(env.config, env.store, jobs, threading.Event()))
    env.drop("alice")
    queued = wait_for(lambda: scanner.scan_once() or env.job("alice"), what="alice queued")
    reason = "cancelled by user (infinitetalkd cancel) before it started"
    assert env.store.cancel_queued(queued, error=reason, failed_dir=None) is not None  # ... and the winner died
    for _ in range(3):
        scanner.scan_once()
    assert sorted(p.name for p in env.inbox.iterdir()) == ["alice.png", "alice.wav"] and not env.failed.exists()
    with env.store.engine.begin() as conn:
        conn.execute(update(JobRow).where(JobRow.id == queued.id)
                     .values(finished_at=JobRow.finished_at - env.config.jobs.lease_s - 1))
    wait_for(lambda: scanner.scan_once() or not list(env.inbox.iterdir()), timeout=15,
             what="the files moved (looked at again after a back-off)")
    assert sorted(p.name for p in (env.failed / "alice").iterdir()) == ["alice.png", "alice.wav", "error.txt"]
    assert (env.failed / "alice" / "error.txt").read_text().strip() == reason
    job = env.job("alice")
    assert job is not None and job.status is JobStatus.CANCELLED and job.failed_dir == str(env.failed / "alice")
    scanner.scan_once()  # settled: nothing more happens
    assert sorted(p.name for p in env.failed.iterdir()) == ["alice"] and len(env.jobs()) == 1


def test_8_a_job_that_fails_after_a_partial_publish_removes_it(tmp_path: Path) -> None:
    (tmp_path / "alice.json").write_text(json.dumps({"job_id": 7}))
    (tmp_path / "alice.log").write_text("")
    (tmp_path / "bob.json").write_text(json.dumps({"job_id": 8}))
    assert sorted(ob.remove_partial(tmp_path, "alice", 7)) == ["alice.json", "alice.log"]
    assert ob.remove_partial(tmp_path, "bob", 7) == []  # another job's file stays
    assert (tmp_path / "bob.json").exists()


# -- 9. long names ---------------------------------------------------------------------------------


def test_9_a_stem_near_the_name_limit_renders_and_publishes(env: Env) -> None:
    stem = "é" * 100 + "x" * 51  # 251 bytes: stem.png and stem.wav are legal, stem.json would not be
    env.drop(stem)
    env.start()
    job = env.wait_status(stem, JobStatus.DONE)
    assert all(len(n.encode()) <= 255 for n in env.outbox_files())
    assert len(env.outbox_files()) == 3 and len(list(env.archive.iterdir())) == 1
    assert job.outputs["mp4"].endswith(".mp4")
    assert env.stop() == 0


def test_9_fitted_names_stay_unique_and_short() -> None:
    a, b = "a" * 250 + "1", "a" * 250 + "2"
    names = {ob.fit_name(a, ".17.json"), ob.fit_name(b, ".17.json")}
    assert len(names) == 2 and all(len(n.encode()) <= 255 for n in names)
    assert ob.fit_name("alice", ".json") == "alice.json"
    assert len(ob.fit_name("ü" * 200, ".json").encode()) <= 255


# -- 11. stems that look like options --------------------------------------------------------------


def test_11_a_stem_beginning_with_a_dash_can_be_cancelled(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.drop("-x")
    env.start(steps=400, step_s=0.02)
    env.wait_status("-x", JobStatus.RUNNING)
    assert cli.main(["cancel", "--config", str(env.config_path), "--", "-x"]) == 0
    env.wait_status("-x", JobStatus.CANCELLED)
    assert env.stop() == 0
    with pytest.raises(SystemExit):
        cli.main(["cancel", "--help"])
    assert "infinitetalkd cancel -- -x" in " ".join(capsys.readouterr().out.split())


# -- the pieces ------------------------------------------------------------------------------------


def test_the_job_log_keeps_every_attempt_and_the_engines_lines(env: Env) -> None:
    flag = env.root / "disk-full"
    flag.touch()
    work = env.outbox / ".tmp" / safe_name(f"{socket.gethostname()}/cpu") / "1-1"  # <worker>/<job>-<attempt>
    remove = faults.install({"under": [str(work / "alice.mp4")], "flag": str(flag)})
    try:
        env.drop("alice")
        env.start()
        wait_for(lambda: (j := env.job("alice")) is not None and j.error, what="a disk-full attempt")
    finally:
        remove()
    flag.unlink()
    env.wait_status("alice", JobStatus.DONE, timeout=30)
    log = (env.outbox / "alice.log").read_text()
    assert log.count("job.started") >= 2 and "disk_full" in log
    assert "fake engine: rendering alice" in log
    assert env.stop() == 0


def test_the_result_document_has_one_name_per_thing(env: Env) -> None:
    env.drop("alice")
    env.start()
    env.wait_status("alice", JobStatus.DONE)
    doc = json.loads((env.outbox / "alice.json").read_text())
    assert "video" not in doc and doc["output"]["frames"] > 0
    assert "mp4_encode" not in doc["timings"]
    assert env.stop() == 0


def test_6_an_inbox_that_vanishes_between_its_check_and_its_listing_is_reported_missing(
        env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The cause of the old flaky test_inbox_that_disappears_and_comes_back: a listing that failed
    marked the inbox missing without the inbox.missing line (and without the status file)."""
    import threading

    from daemon import inbox as ib
    from daemon.watcher import Scanner

    scanner = Scanner(env.config, env.store, "test", files_lock=threading.Lock(), wake_worker=lambda: None)

    def vanished(inbox: Path) -> list[ib.Entry]:
        raise FileNotFoundError(2, "No such file or directory", str(inbox))

    monkeypatch.setattr(ib, "list_inbox", vanished)
    env.config.paths.state.mkdir(parents=True, exist_ok=True)
    with caplog.at_level("INFO"):
        scanner.scan_once()
    assert scanner.inbox_missing and inbox_status(env)["inbox_missing"] is True
    assert "inbox.missing" in caplog.text + capsys.readouterr().out  # (structlog configured or not)


def test_the_job_log_takes_the_engines_lines_from_its_helper_threads(tmp_path: Path) -> None:
    import logging
    import threading

    import structlog

    from daemon.log import job_log

    path = tmp_path / "job.log"
    engine = logging.getLogger("infinitetalkd.engine")
    engine.setLevel(logging.INFO)
    with structlog.contextvars.bound_contextvars(job_id=5), job_log(path, 5, engine_lines=True):
        t = threading.Thread(target=lambda: engine.info("decoded chunk %d in a helper thread", 2))
        t.start()
        t.join()

        def other_job() -> None:
            with structlog.contextvars.bound_contextvars(job_id=6):
                engine.warning("not this job's line")

        t = threading.Thread(target=other_job)
        t.start()
        t.join()
    text = path.read_text()
    assert "decoded chunk 2 in a helper thread" in text and "not this job's line" not in text
