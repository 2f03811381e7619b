"""The daemon end to end on a thread, with the fake renderer: watch -> store -> render -> outbox."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.jobs import JobStatus
from tests.daemon.conftest import Env, wait_for, write_png, write_wav


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_slow_writes_wait_for_stability_then_one_job_renders(make_env: Callable[..., Env]) -> None:
    env = make_env({"watch": {"mode": "inotify", "stable_window_s": 0.6, "poll_interval_s": 0.1,
                              "rescan_interval_s": 300}})
    env.start()
    png, wav = io.BytesIO(), env.root / "src.wav"
    from PIL import Image
    Image.new("RGB", (48, 48), (10, 200, 30)).save(png, format="PNG")
    write_wav(wav, seconds=0.5)
    parts = [(png.getvalue(), env.inbox / "alice.png"), (wav.read_bytes(), env.inbox / "alice.wav")]
    files = [open(dst, "wb") for _, dst in parts]  # noqa: SIM115
    try:
        for i in range(8):  # 8 chunks, 0.25 s apart: every pause is shorter than the 0.6 s window
            if i:
                time.sleep(0.25)
                assert env.jobs() == [], "a job was queued while its files were still being written"
            for (data, _), f in zip(parts, files):
                n = len(data)
                f.write(data[i * n // 8:(i + 1) * n // 8])
                f.flush()
    finally:
        for f in files:
            f.close()
    written = time.time()
    job = env.wait_status("alice", JobStatus.DONE)
    assert job.created_at >= written + 0.5, "queued before the files were stable for the window"
    assert [j.id for j in env.jobs()] == [job.id]
    assert env.outbox_files() == ["alice.json", "alice.log", "alice.mp4"]
    assert sorted(p.name for p in (env.archive / "alice").iterdir()) == ["alice.png", "alice.wav"]
    assert list(env.inbox.iterdir()) == []
    doc = json.loads((env.outbox / "alice.json").read_text())
    assert doc["job_id"] == job.id and doc["fingerprint"] == job.fingerprint and doc["seed"] == 42
    assert {i["name"]: i["sha256"] for i in doc["inputs"]} == {
        "alice.png": sha(env.archive / "alice" / "alice.png"), "alice.wav": sha(env.archive / "alice" / "alice.wav")}
    assert doc["models"]["engine"].startswith("fake-renderer/1")
    assert doc["versions"]["python"] and doc["params"]["preset"] == "lightx2v"
    assert doc["timings"]["render_s"] > 0
    log = (env.outbox / "alice.log").read_text()
    assert "job.started" in log and "job.finished" in log and "fake engine: rendering alice" in log
    assert all(f"job_id={job.id}" in line and "stem=alice" in line for line in log.splitlines() if line.strip())
    import av
    with av.open(str(env.outbox / "alice.mp4")) as c:
        assert c.streams.video[0].frames == 3
    assert env.stop() == 0


def test_the_same_files_twice_render_once(env: Env) -> None:
    env.start()
    env.drop("alice", sidecar={"seed": 5})
    env.drop("copy", sidecar={"seed": 5})  # same content under another name, at the same time
    first = env.wait_status("alice", JobStatus.DONE)
    wait_for(lambda: not list(env.inbox.iterdir()), what="the duplicate to be archived")
    # and the same files again, after they were rendered
    env.drop("alice", sidecar={"seed": 5})
    wait_for(lambda: not list(env.inbox.iterdir()), what="the re-drop to be archived")
    assert env.stop() == 0
    assert env.renderer is not None and env.renderer.renders == 1
    assert [j.id for j in env.jobs()] == [first.id]
    assert env.outbox_files() == ["alice.json", "alice.log", "alice.mp4"]
    assert sorted(p.name for p in env.archive.iterdir()) == ["alice", "alice.1", "copy"]


def test_redo_finished_render_renders_again(make_env: Callable[..., Env]) -> None:
    env = make_env({"jobs": {"redo_finished": "render"}})
    env.start()
    env.drop("alice")
    env.wait_status("alice", JobStatus.DONE)
    wait_for(lambda: not list(env.inbox.iterdir()), what="the inputs to be archived")
    env.drop("alice")
    wait_for(lambda: env.renderer is not None and env.renderer.renders == 2, what="a second render")
    job = env.wait_status("alice", JobStatus.DONE)
    assert env.stop() == 0
    assert len(env.jobs()) == 1 and job.attempts == 1
    # the second result never overwrote the first
    assert env.outbox_files() == ["alice.1.json", "alice.1.log", "alice.1.mp4", "alice.json", "alice.log",
                                  "alice.mp4"]


class _NoObserver:
    def __init__(self, *a: Any, **k: Any) -> None:
        raise AssertionError("poll mode must not start a watchdog observer")


def test_poll_mode_finds_files_without_any_events(make_env: Callable[..., Env],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("daemon.inbox_watch.Observer", _NoObserver)
    env = make_env({"watch": {"mode": "poll", "rescan_interval_s": 300}})
    env.start()
    time.sleep(0.2)
    env.drop("alice")
    env.wait_status("alice", JobStatus.DONE)
    assert env.stop() == 0


def test_inotify_events_wake_the_scanner_long_before_the_rescan(make_env: Callable[..., Env]) -> None:
    env = make_env({"watch": {"mode": "inotify", "rescan_interval_s": 300}})
    env.start()
    time.sleep(0.3)  # the start-up scan is over; only an event can wake the scanner now
    env.drop("alice")
    env.wait_status("alice", JobStatus.DONE, timeout=10)
    assert env.stop() == 0


def test_faults_fail_the_job_and_the_daemon_goes_on(env: Env) -> None:
    env.start()
    env.drop("oom", sidecar={"prompt": "FAIL:oom"}, color=(1, 1, 1))
    env.drop("bug", sidecar={"prompt": "FAIL:crash"}, color=(2, 2, 2))
    env.drop("render", sidecar={"prompt": "FAIL:render"}, color=(3, 3, 3))
    env.drop("good", color=(5, 5, 5))
    for stem in ("oom", "bug", "render"):
        env.wait_status(stem, JobStatus.FAILED)
    env.wait_status("good", JobStatus.DONE)
    reasons = {j.stem: j.error or "" for j in env.jobs()}
    assert reasons["oom"].startswith("out of memory: CUDA out of memory")
    assert reasons["bug"].startswith("internal error: ZeroDivisionError")
    assert reasons["render"].startswith("render failed:")
    for stem in ("oom", "bug", "render"):
        assert sorted(p.name for p in (env.failed / stem).iterdir()) == sorted([
            f"{stem}.log", f"{stem}.png", f"{stem}.wav", f"{stem}.yaml", "error.txt"])
        assert (env.failed / stem / "error.txt").read_text().count("\n") == 1
    # a full disk is not a failure of the job: tests/daemon/test_reliability.py
    # (the work folder goes right after the job is recorded: wait for it)
    wait_for(lambda: not list((env.outbox / ".tmp").iterdir()), what="outbox/.tmp to be empty")
    assert env.stop() == 0


def test_device_fault_exits_non_zero_then_fails_after_max_attempts(make_env: Callable[..., Env]) -> None:
    env = make_env({"jobs": {"max_attempts": 2}})
    env.drop("gpu", sidecar={"prompt": "FAIL:device"})
    env.start()
    assert env.join() == 75  # EX_TEMPFAIL: systemd restarts a clean process
    job = env.job("gpu")
    assert job is not None and job.status is JobStatus.QUEUED and job.attempts == 1
    assert "illegal memory access" in (job.error or "")
    env.start()
    assert env.join() == 75
    job = env.job("gpu")
    assert job is not None and job.status is JobStatus.FAILED and "giving up" in (job.error or "")
    assert (env.failed / "gpu" / "gpu.wav").exists()


def test_cancel_running_and_queued_jobs(env: Env) -> None:
    env.start(steps=200, step_s=0.02)
    env.drop("long", color=(9, 9, 9))
    env.drop("next", color=(8, 8, 8))
    running = env.wait_status("long", JobStatus.RUNNING)
    env.wait_status("next", JobStatus.QUEUED)
    assert env.store.request_cancel(env.job("next").id) is not None  # type: ignore[union-attr]
    assert env.store.request_cancel(running.id) is not None
    job = env.wait_status("long", JobStatus.CANCELLED, timeout=10)
    assert "cancelled by user" in (job.error or "")
    env.wait_status("next", JobStatus.CANCELLED)
    for stem in ("long", "next"):
        # a queued job's cancel wins its row first, then moves the files (docs/daemon.md §4.6)
        wait_for(lambda s=stem: not any(env.inbox.glob(f"{s}.*")), what=f"{stem}'s files moved")  # type: ignore[misc]
        assert (env.failed / stem / f"{stem}.wav").exists()
        assert "cancelled" in (env.failed / stem / "error.txt").read_text()
    assert env.renderer is not None and env.renderer.renders == 0
    assert env.stop() == 0


def test_a_running_job_reports_the_time_left(env: Env) -> None:
    env.start(steps=200, step_s=0.025)  # a 5 s render
    env.drop("long")
    job = wait_for(lambda: (j := env.job("long")) is not None and "left" in (j.progress_text or "") and j,
                   timeout=15, what="the time left in the job's progress text")
    # the fake renderer steps at a steady rate (sleeps of 25 ms, longer on a busy machine, never shorter)
    match = re.search(r"denoise chunk 1/1 step (\d+)/200 \(\d+%\), about (\d+) s left", job.progress_text)
    assert match, job.progress_text
    step, left = int(match[1]), int(match[2])
    nominal = (200 - step) * 0.025
    assert nominal * 0.8 - 1 <= left <= nominal * 3 + 1, job.progress_text
    env.wait_status("long", JobStatus.DONE, timeout=30)
    assert env.stop() == 0


def test_a_different_result_of_the_same_name_is_never_overwritten(env: Env) -> None:
    env.outbox.mkdir(parents=True, exist_ok=True)
    (env.outbox / "alice.mp4").write_bytes(b"someone else's video")
    env.start()
    env.drop("alice")
    job = env.wait_status("alice", JobStatus.DONE)
    assert env.stop() == 0
    assert (env.outbox / "alice.mp4").read_bytes() == b"someone else's video"
    assert job.outputs["mp4"] == f"alice.{job.id}.mp4"
    assert (env.outbox / f"alice.{job.id}.mp4").stat().st_size > 100


def test_inbox_that_disappears_and_comes_back(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.start()
    wait_for(lambda: (env.config.paths.state / "inbox.json").exists(), what="the first scan")
    shutil.rmtree(env.inbox)
    status = env.config.paths.state / "inbox.json"
    wait_for(lambda: json.loads(status.read_text())["inbox_missing"], what="the inbox to be reported missing")
    env.inbox.mkdir()
    env.drop("alice")
    env.wait_status("alice", JobStatus.DONE)
    assert env.stop() == 0
    out = capsys.readouterr().out
    assert '"event": "inbox.missing"' in out and '"event": "inbox.back"' in out


def test_ready_marker_commits_without_the_stable_window(make_env: Callable[..., Env]) -> None:
    env = make_env({"watch": {"stable_window_s": 30}})
    env.start()
    env.drop("alice")
    (env.inbox / "alice.ready").touch()
    env.wait_status("alice", JobStatus.DONE, timeout=10)  # far less than the 30 s window
    assert not (env.inbox / "alice.ready").exists()
    assert env.stop() == 0


def test_required_marker_and_sidecar_make_jobs_wait(make_env: Callable[..., Env]) -> None:
    env = make_env({"jobs": {"ready_marker": "required", "sidecar": "required"}})
    env.start()
    env.drop("alice", sidecar={"seed": 1})
    env.drop("bob", color=(1, 2, 3))
    status = env.config.paths.state / "inbox.json"
    wait_for(lambda: status.exists() and len(json.loads(status.read_text())["waiting"]) == 2,
             what="both stems to wait")
    assert env.jobs() == []
    (env.inbox / "alice.ready").touch()
    (env.inbox / "bob.ready").touch()  # committed, but without the required sidecar
    env.wait_status("alice", JobStatus.DONE)
    bob = env.wait_status("bob", JobStatus.FAILED)
    assert "sidecar bob.yaml (jobs.sidecar = required)" in (bob.error or "")
    assert env.stop() == 0


def test_low_disk_keeps_jobs_queued(make_env: Callable[..., Env]) -> None:
    env = make_env({"jobs": {"min_free_mb": 10**9}})
    env.start()
    env.drop("alice")
    env.wait_status("alice", JobStatus.QUEUED)
    time.sleep(0.3)
    assert env.job("alice").status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert env.stop() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint(make_env: Callable[..., Env]) -> None:
    port = _free_port()
    env = make_env({"metrics": {"enabled": True, "port": port}})
    env.start()
    env.drop("alice")
    env.drop("bad", sidecar={"seed": "x"}, color=(0, 0, 0))
    env.wait_status("alice", JobStatus.DONE)
    env.wait_status("bad", JobStatus.FAILED)

    def scrape() -> str:
        body: str = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return body if 'infinitetalkd_jobs{status="done"} 1.0' in body else ""

    body = wait_for(scrape, what="the job counts in /metrics")
    assert 'infinitetalkd_jobs{status="failed"} 1.0' in body
    assert 'infinitetalkd_failures_total{kind="input"} 1.0' in body
    assert "infinitetalkd_render_seconds_count 1.0" in body
    assert "infinitetalkd_last_success_timestamp_seconds" in body
    assert "infinitetalkd_running_job_progress 0.0" in body  # nothing runs now
    assert "infinitetalkd_running_job_seconds_left NaN" in body
    assert env.stop() == 0


def test_metrics_show_the_running_jobs_progress_and_time_left(make_env: Callable[..., Env]) -> None:
    port = _free_port()
    env = make_env({"metrics": {"enabled": True, "port": port}})
    env.start(steps=200, step_s=0.025)
    env.drop("long")

    def scrape() -> str:
        try:
            body: str = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:  # the endpoint starts after the engine is ready
            return ""
        m = re.search(r"^infinitetalkd_running_job_seconds_left ([0-9.]+)$", body, re.M)
        return body if m and float(m[1]) > 0 else ""

    body = wait_for(scrape, timeout=15, what="a time left in /metrics")
    progress = re.search(r"^infinitetalkd_running_job_progress ([0-9.]+)$", body, re.M)
    assert progress and 0 < float(progress[1]) < 1
    env.wait_status("long", JobStatus.DONE, timeout=30)
    assert env.stop() == 0


def test_a_second_daemon_on_the_same_state_is_refused(env: Env) -> None:
    env.start()
    wait_for(lambda: (env.config.paths.state / "inbox.json").exists(), what="the daemon to start")
    from daemon.service import run_daemon
    from tests.daemon.fake_renderer import FakeRenderer
    code = run_daemon(env.config, lambda o: FakeRenderer(o), install_signals=False, stop=threading.Event())
    assert code == 78
    assert env.stop() == 0


def test_files_named_by_a_sidecar_belong_to_its_job(make_env: Callable[..., Env]) -> None:
    env = make_env({"watch": {"incomplete_after_s": 0.5}})
    env.start(steps=60, step_s=0.02)  # each render outlasts incomplete_after_s
    env.drop("first")
    write_wav(env.inbox / "second.wav", freq=330)
    write_png(env.inbox / "duo_m1.png", color=(255, 255, 255))
    write_png(env.inbox / "duo_m2.png", color=(0, 0, 0))
    env.drop("duo", sidecar={"audio2": "second.wav", "masks": ["duo_m1.png", "duo_m2.png"]}, color=(9, 99, 9))
    job = env.wait_status("duo", JobStatus.DONE, timeout=20)
    assert env.stop() == 0
    assert sorted(j.stem for j in env.jobs()) == ["duo", "first"]  # no job, no refusal for the named files
    assert not env.failed.exists() or not list(env.failed.iterdir())
    assert sorted(p.name for p in (env.archive / "duo").iterdir()) == [
        "duo.png", "duo.wav", "duo.yaml", "duo_m1.png", "duo_m2.png", "second.wav"]
    assert {i["role"] for i in job.inputs} == {"image", "audio", "audio2", "mask1", "mask2", "sidecar"}


def test_after_success_delete(make_env: Callable[..., Env]) -> None:
    env = make_env({"jobs": {"after_success": "delete"}})
    env.start()
    env.drop("alice")
    env.wait_status("alice", JobStatus.DONE)
    assert env.stop() == 0
    assert list(env.inbox.iterdir()) == []
    assert list(env.archive.iterdir()) == []  # deleted, not archived
    assert env.outbox_files() == ["alice.json", "alice.log", "alice.mp4"]
