"""Resume and redo (docs/daemon.md §4.8) in the real daemon process with the real engine and the tiny random
models: kill -9 at ten moments, SIGTERM with a second daemon of the fleet continuing, damaged checkpoints, and a redo
from chunk 2. Every published video is compared frame by frame (sha256 of each decoded frame) with an uninterrupted
render of the same request made in this process. The rules, with the fake renderer: test_resume_rules.py."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from daemon import cli
from daemon.jobs import Job, JobStatus
from daemon.store import Store
from tests.conftest import make_portrait, speech_like
from tests.conftest import write_wav as write_speech
from tests.daemon.conftest import REPO, wait_for

# -- the real daemon process, the real engine, tiny random models ------------------------------------------

# 64x64, windows of 9 frames carrying 1: 8 new frames a chunk; 2 steps. 1.8 s of speech = 45 frames = 6 chunks.
# (A daemon's start costs more than such a chunk: the ten kills cost ten starts, not ten renders.)
SETTINGS = {"size": [64, 64], "frame_window": 9, "motion_frames": 1, "steps": 2, "seed": 11}
SIX_CHUNKS_S, FIVE_CHUNKS_S, THREE_CHUNKS_S = 1.8, 1.5, 1.0
FPS = 25


def _config(root: Path, models: Path, **jobs: Any) -> Path:
    doc = {
        "paths": {"inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "state": str(root / "state")},
        "watch": {"mode": "poll", "poll_interval_s": 0.1, "stable_window_s": 0.2, "rescan_interval_s": 5},
        "jobs": {"max_attempts": 20, "lease_s": 30, "min_free_mb": 0, **jobs},
        "worker": {"heartbeat_s": 0.05},  # the progress the test aims by is stored this often
        "engine": {"models_dir": str(models), "device": "cpu", "preset": "lightx2v"},
        "logging": {"format": "json"},
    }
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _drop(inbox: Path, stem: str, seconds: float, *, tag: str = "") -> None:
    """A portrait, its speech and a sidecar with SETTINGS. ``tag`` changes the PNG's bytes (a text chunk),
    not its pixels: another job, the same frames."""
    from PIL import PngImagePlugin

    staging = inbox.parent / "staging"
    staging.mkdir(exist_ok=True)
    img = make_portrait(staging / "face.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("tag", tag)
    with Image.open(img) as im:
        im.save(staging / f"{stem}.png", pnginfo=info)
    write_speech(staging / f"{stem}.wav", speech_like(seconds, 16000), rate=16000)
    (staging / f"{stem}.yaml").write_text(yaml.safe_dump(SETTINGS), encoding="utf-8")
    for ext in ("wav", "yaml", "png"):  # renamed in: the scanner never sees a half-written file
        os.replace(staging / f"{stem}.{ext}", inbox / f"{stem}.{ext}")


def _hashes(path: Path) -> list[str]:
    import av

    with av.open(str(path)) as c:
        return [hashlib.sha256(f.to_ndarray(format="rgb24").tobytes()).hexdigest() for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def engine(tiny_models: Path) -> Any:
    from engine import load_engine
    from engine.api import EngineOptions

    return load_engine(EngineOptions(models_dir=tiny_models, device="cpu", preset="lightx2v"))


def _request(tmp: Path, seconds: float, seed: int = 11) -> Any:
    """The request the daemon builds for a drop of :func:`_drop` (same sidecar, the config's defaults)."""
    from daemon.config import load_config
    from engine.settings import request_from_settings

    _drop(tmp, "ref", seconds)
    defaults = load_config(_config(tmp / "cfg", tmp / "models")).render
    return request_from_settings({**SETTINGS, "seed": seed}, audio=tmp / "ref.wav", image=tmp / "ref.png",
                                 defaults=defaults)


@pytest.fixture(scope="module")
def reference(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[float], list[str]]:
    """Frame hashes of an uninterrupted (resumable, so segmented the same way) render of a drop, per length."""
    made: dict[float, list[str]] = {}

    def get(seconds: float) -> list[str]:
        if seconds not in made:
            tmp = tmp_path_factory.mktemp("ref")
            req = _request(tmp, seconds)
            engine.render(req, tmp / "ref.mp4", lambda p: None, lambda: False, checkpoint_dir=tmp / "ck")
            made[seconds] = _hashes(tmp / "ref.mp4")
        return made[seconds]

    return get


class Daemon:
    """``infinitetalkd run`` as a process; its JSON log lines are appended to ``log``."""

    def __init__(self, config: Path, log: Path, worker: str | None = None) -> None:
        self.config, self.log, self.worker = config, log, worker
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
        if worker:
            env.update(INFINITETALKD_WORKER=worker, INFINITETALKD_STATE=str(config.parent / f"state-{worker}"))
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)], cwd=REPO,
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def term(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.wait(30)


@dataclass
class Seen:
    stage: str
    chunk: int
    step: int


_PROGRESS = re.compile(r"^(\w+)(?: chunk (\d+)/\d+)?(?: step (\d+)/\d+)?")


def _seen(job: Job) -> Seen | None:
    m = _PROGRESS.match(job.progress_text or "")
    if job.status is not JobStatus.RUNNING or m is None or m[1] not in ("denoise", "decode", "mux"):
        return None
    return Seen(m[1], int(m[2] or 0), int(m[3] or 0))


def _store(config: Path) -> Store:
    db = config.parent / "state" / "jobs.db"
    wait_for(db.exists, timeout=120, what="the job database")
    return Store.open(db)  # migrations take a lock: this waits for the daemon's, or makes it find version 3


def _events(*logs: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for log in logs:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []:
            if line.startswith("{") and f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if doc.get("event") == name:
                        out.append(doc)
    return sorted(out, key=lambda e: str(e.get("timestamp")))


def _chunks_seen(log_text: str) -> int:
    """Chunks rendered as a job's log tells: the engine's event per checkpointed chunk where the engine has one,
    else the worker's line per chunk it saw end."""
    return len(re.findall(r"engine\.chunk_done", log_text)) or len(re.findall(r"job\.chunk_finished", log_text))


def _check_published(outbox: Path, stem: str, frames: list[str], seconds: float) -> dict[str, Any]:
    from engine.media import probe

    assert _hashes(outbox / f"{stem}.mp4") == frames
    info = probe(outbox / f"{stem}.mp4")
    assert info["frames"] == round(seconds * FPS) and abs(info["duration"] - seconds) <= 0.05, info
    assert not (outbox / ".tmp" / ".checkpoints").exists()  # removed once published (keep_checkpoints_h = 0)
    return dict(json.loads((outbox / f"{stem}.json").read_text()))


# Where each kill -9 is aimed, by what the job's progress (stored by the heartbeat every 0.2 s) says:
# "claimed" before any progress, "step"/"decode" in this life's first chunk, "ckpt" at the first step of its
# second chunk (while the previous chunk's segment is closed and its checkpoint written), "decode2" in its second
# chunk, "random" a random time into the render, "mux" while the segments are joined and the result published
# (or, when the poll is too late for that, while the last chunk is decoded).
AIMS = ["claimed", "step", "ckpt", "decode", "random", "decode2", "step", "ckpt", "random", "mux"]


def _aimed(aim: str, first: Seen, now: Seen, since: float, delay: float, chunks: int) -> bool:
    if now.stage == "mux" or (now.chunk == chunks and now.stage == "decode"):
        return True  # "mux", or (as late as a poll can be sure of) never let a life finish the job
    later = now.chunk > first.chunk or first.chunk == chunks
    return {"claimed": True, "step": now.stage == "denoise", "decode": now.stage == "decode",
            "ckpt": later and now.stage == "denoise" and now.step == 1,
            "decode2": later and now.stage == "decode",
            "random": time.monotonic() - since >= delay, "mux": False}[aim]


def _life(store: Store, job_id: int, attempt: int, aim: str, rng: random.Random) -> bool:
    """Wait for this life's claim (attempt ``attempt``), then for the aimed moment. False: the job is done."""
    def claimed() -> Job | None:
        j = store.get(job_id)
        return j if j is not None and (j.status is JobStatus.DONE or
                                       (j.status is JobStatus.RUNNING and j.attempts == attempt)) else None

    job = wait_for(claimed, timeout=120, what=f"attempt {attempt}")
    if job.status is JobStatus.DONE:
        return False
    if aim == "claimed":
        return True
    first: Seen | None = None
    since, delay = time.monotonic(), rng.uniform(0.2, 3.0)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = store.get(job_id)  # type: ignore[assignment]
        if job.status is JobStatus.DONE:
            return False
        now = _seen(job)
        if now is not None:
            first = first or now
            if _aimed(aim, first, now, since, delay, chunks=6):
                return True
        time.sleep(0.02)
    raise AssertionError(f"attempt {attempt}: the aimed moment ({aim}) never came")


def test_kill_9_ten_times_then_identical_frames(tiny_models: Path, tmp_path: Path, reference: Any,
                                                daemons: list[Daemon]) -> None:
    frames = reference(SIX_CHUNKS_S)
    assert len(frames) == 45
    config = _config(tmp_path, tiny_models)
    _drop(tmp_path / "inbox", "talk", SIX_CHUNKS_S)
    log = tmp_path / "daemon.log"
    rng = random.Random(13)
    store: Store | None = None
    kills = 0
    try:
        for aim in AIMS:
            daemons.append(d := Daemon(config, log))
            store = store or _store(config)
            if not _life(store, 1, kills + 1, aim, rng):
                break
            d.kill()
            kills += 1
        daemons.append(d := Daemon(config, log))
        store = store or _store(config)
        wait_for(lambda: (j := store.get(1)) is not None and j.status is JobStatus.DONE, timeout=180,  # type: ignore[union-attr]
                 what="the job to be published")
        assert d.term() == 0
        job = store.get(1)
    finally:
        if store is not None:
            store.close()
    assert kills == len(AIMS), f"the job finished after {kills} kills"
    doc = _check_published(tmp_path / "outbox", "talk", frames, SIX_CHUNKS_S)
    assert job is not None and job.attempts == kills + 1
    # chunks rendered, counted from the job's own log (every attempt appends to it), not from the database
    text = (tmp_path / "outbox" / "talk.log").read_text()
    finished = _chunks_seen(text)
    resumed = [int(n) for n in re.findall(r"engine\.resumed.*?next_chunk=(\d+)", text)]
    assert 6 <= finished <= 6 + kills, text
    assert doc["chunks_rendered"] == job.chunks_rendered and finished <= job.chunks_rendered <= 6 + kills
    assert resumed and resumed == sorted(resumed)  # continued, never went back
    print(f"kills {kills}, chunks rendered {finished}, resumed at {resumed}")


def _holder(store: Store, job_id: int, chunk_at_least: int, attempt: int) -> str:
    """Wait until attempt ``attempt`` renders chunk ``chunk_at_least`` (1-based) or later; its worker's name."""
    def far() -> str | None:
        j = store.get(job_id)
        seen = _seen(j) if j is not None else None
        ok = j is not None and j.attempts == attempt and seen is not None and seen.chunk >= chunk_at_least
        return j.worker_id if ok and j is not None else None

    name: str = wait_for(far, timeout=180, interval=0.02, what=f"attempt {attempt} to reach chunk {chunk_at_least}")
    return name


def test_sigterm_then_another_worker_of_the_fleet_continues(tiny_models: Path, tmp_path: Path, reference: Any,
                                                            daemons: list[Daemon]) -> None:
    """Two daemons (workers "a" and "b", their own state folders) on one database and outbox: the holder
    is stopped with SIGTERM after two chunks, the other continues from its checkpoint, is stopped after one
    more chunk, and the first, started again, finishes. Each stop loses at most the chunk in progress."""
    frames = reference(SIX_CHUNKS_S)
    config = _config(tmp_path, tiny_models)
    _drop(tmp_path / "inbox", "talk", SIX_CHUNKS_S)
    logs = {w: tmp_path / f"daemon-{w}.log" for w in ("a", "b")}
    procs = {w: Daemon(config, logs[w], worker=w) for w in ("a", "b")}
    daemons.extend(procs.values())
    store = _store(config)
    try:
        first = _holder(store, 1, 3, attempt=1)  # chunks 1 and 2 finished
        assert procs[first].term() == 0
        other = "b" if first == "a" else "a"
        # SIGTERM refunds the attempt: the other worker's attempt is number 1 again
        assert _holder(store, 1, 5, attempt=1) == other
        assert procs[other].term() == 0
        daemons.append(again := Daemon(config, logs[first], worker=first))
        wait_for(lambda: (j := store.get(1)) is not None and j.status is JobStatus.DONE, timeout=180,
                 what="the job to be published")
        assert again.term() == 0
        job = store.get(1)
    finally:
        store.close()
    doc = _check_published(tmp_path / "outbox", "talk", frames, SIX_CHUNKS_S)
    resumed = [e["next_chunk"] for e in _events(*logs.values(), name="engine.resumed")]
    checkpointed = _events(*logs.values(), name="engine.chunk_done")  # where the engine has the event
    seen = _events(*logs.values(), name="job.chunk_finished")  # the ends the worker saw (a stop may hide one)
    assert len(resumed) == 2 and resumed[0] >= 2 and resumed[1] >= 4, resumed
    assert not checkpointed or 6 <= len(checkpointed) <= 6 + 2
    assert job is not None and doc["chunks_rendered"] == job.chunks_rendered
    assert max(6, len(seen)) <= job.chunks_rendered <= 6 + 2
    assert doc["resumed_from_chunk"] == resumed[1]


def _damage(how: str, folder: Path) -> None:
    """Damage every checkpoint file in ``folder`` (their names are the engine's business)."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, sorted(folder.iterdir())
    for path in files:
        data = path.read_bytes()
        if how == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif how == "edit":
            path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])  # one bit of the tensor


def test_damaged_or_foreign_checkpoints_are_discarded_and_the_job_starts_over(
        engine: Any, tiny_models: Path, tmp_path: Path, reference: Any, daemons: list[Daemon]) -> None:
    """Jobs 1-3 find, in their checkpoint folders, a truncated checkpoint, one with a flipped bit, and a valid
    one of another seed (each with its segments): each is discarded with a log line and the job starts over."""
    from engine.api import RenderStopped

    frames = reference(THREE_CHUNKS_S)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    steps: list[int] = []
    with pytest.raises(RenderStopped):  # seed 12, stopped in its third chunk: two chunks kept
        engine.render(_request(foreign, THREE_CHUNKS_S, seed=12), foreign / "x.mp4", lambda p: None,
                      lambda: steps.append(1) or len(steps) > 2 * 2 + 1, checkpoint_dir=foreign / "ck")
    config = _config(tmp_path, tiny_models)
    for job_id, how in ((1, "truncate"), (2, "edit"), (3, "other seed")):
        folder = tmp_path / "outbox" / ".tmp" / ".checkpoints" / str(job_id)
        shutil.copytree(foreign / "ck", folder)
        _damage(how, folder)
    log = tmp_path / "daemon.log"
    daemons.append(d := Daemon(config, log))
    store = _store(config)
    try:
        for job_id in (1, 2, 3):  # one at a time: job ids in this order
            _drop(tmp_path / "inbox", f"d{job_id}", THREE_CHUNKS_S, tag=str(job_id))
            wait_for(lambda j=job_id: store.get(j) is not None, timeout=60, what=f"job {job_id}")  # type: ignore[misc]
        wait_for(lambda: all((j := store.get(i)) is not None and j.status is JobStatus.DONE for i in (1, 2, 3)),
                 timeout=240, what="the three jobs to be published")
        assert d.term() == 0
    finally:
        store.close()
    reasons = {}
    for job_id in (1, 2, 3):
        doc = _check_published(tmp_path / "outbox", f"d{job_id}", frames, THREE_CHUNKS_S)
        assert doc["resumed_from_chunk"] is None and doc["chunks_rendered"] == 3
        text = (tmp_path / "outbox" / f"d{job_id}.log").read_text()
        found = re.search(r"engine\.checkpoint_discarded.*reason='?([^'\n]*)", text)
        assert found, text
        reasons[job_id] = found[1]
    assert reasons[1].startswith("damaged") and reasons[2].startswith("damaged: digest mismatch"), reasons
    assert reasons[3].startswith("another recipe"), reasons


def test_redo_from_chunk_2_re_renders_only_chunks_2_to_4(tiny_models: Path, tmp_path: Path, daemons: list[Daemon],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from engine.render import Engine

    if "base_checkpoint_dir" not in inspect.signature(Engine.render).parameters:
        pytest.skip("needs the engine's side of redo: Engine.render(..., base_checkpoint_dir=)")
    config = _config(tmp_path, tiny_models, keep_checkpoints_h=1)
    _drop(tmp_path / "inbox", "talk", FIVE_CHUNKS_S)
    daemons.append(d := Daemon(config, tmp_path / "daemon.log"))
    store = _store(config)
    try:
        wait_for(lambda: (j := store.get(1)) is not None and j.status is JobStatus.DONE, timeout=180,
                 what="the original to be published")
        assert cli.main(["redo", "talk", "--from-chunk", "2", "--seed", "7", "--config", str(config)]) == 0
        assert "talk.redo-c2-s7.mp4" in capsys.readouterr().out
        wait_for(lambda: (j := store.find("talk.redo-c2-s7")) is not None and j.status is JobStatus.DONE,
                 timeout=180, what="the redo to be published")
        assert d.term() == 0
    finally:
        store.close()
    outbox = tmp_path / "outbox"
    original, redone = _hashes(outbox / "talk.mp4"), _hashes(outbox / "talk.redo-c2-s7.mp4")
    kept = 9 + 8  # chunk 0's 9 frames and chunk 1's 8 new ones
    assert len(original) == len(redone) > kept
    assert redone[:kept] == original[:kept] and redone[kept:] != original[kept:]
    doc = json.loads((outbox / "talk.redo-c2-s7.json").read_text())
    assert doc["output"]["chunks"] == 5 and doc["redo"] == {"of_job": 1, "from_chunk": 2, "seed": 7}
    assert doc["chunks_rendered"] == 3 and doc["resumed_from_chunk"] == 2
    text = (outbox / "talk.redo-c2-s7.log").read_text()
    assert _chunks_seen(text) == 3  # chunks 2, 3 and 4 only
