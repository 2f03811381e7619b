"""Resumable renders (engine/checkpoint.py): a render stopped after a chunk and rendered again with the same
checkpoint directory continues there and gives the same frames as an uninterrupted render; a damaged checkpoint,
or one of another seed, is discarded and the render starts over. A redo re-renders a finished job from a chunk on
with another seed, keeping the original's earlier chunks (from its kept checkpoints)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest

from engine import checkpoint as ckpt
from engine.api import EngineOptions, InputError, RenderRequest, RenderStopped
from engine.events import LOGGER_NAME
from engine.settings import request_from_settings
from tests.conftest import make_portrait, speech_like, write_wav

SECONDS = 1.6  # 40 frames: with a 17-frame window and 5 motion frames, 3 chunks
SETTINGS = {"size": [64, 64], "frame_window": 17, "motion_frames": 5}


@pytest.fixture(scope="module")
def engine(tiny_models: Path):
    from engine import load_engine

    device = os.environ.get("INFINITETALKD_TEST_DEVICE", "cpu")
    return load_engine(EngineOptions(models_dir=tiny_models, device=device, preset="lightx2v"))


def _request(tmp: Path, seed: int = 3, seconds: float = SECONDS) -> RenderRequest:
    img = make_portrait(tmp / "face.png")
    wav = write_wav(tmp / "speech.wav", speech_like(seconds, 16000), rate=16000)
    return request_from_settings({**SETTINGS, "seed": seed}, audio=wav, image=img)


def _hashes(path: Path) -> list[str]:
    import av

    with av.open(str(path)) as c:
        return [hashlib.sha256(f.to_ndarray(format="rgb24").tobytes()).hexdigest() for f in c.decode(video=0)]


def _stop_after(chunks: int, steps_per_chunk: int):
    """should_stop that stops the render after ``chunks`` finished chunks (counted from the first chunk this call
    renders), at the 2nd step of the next one."""
    steps: list[int] = []

    def should_stop() -> bool:
        steps.append(1)
        return len(steps) > chunks * steps_per_chunk + 1  # at the 2nd step of that chunk

    return should_stop


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory) -> list[str]:
    """Frame hashes of an uninterrupted resumable render (seed 3)."""
    tmp = tmp_path_factory.mktemp("ref")
    result = engine.render(_request(tmp), tmp / "ref.mp4", lambda p: None, lambda: False, checkpoint_dir=tmp / "ck")
    assert result.chunks >= 3
    return _hashes(tmp / "ref.mp4")


def _events(caplog, name: str) -> list[dict]:
    return [r.fields for r in caplog.records if getattr(r, "event", None) == name]


def _resumed_events(caplog) -> list[dict]:
    return _events(caplog, "engine.resumed")


def _discarded(caplog) -> list[dict]:
    return _events(caplog, "engine.checkpoint_discarded")


def _checkpoints(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.glob("ckpt_*.safetensors"))


@pytest.mark.parametrize("stop_in", [1, 2])
def test_interrupted_render_resumes_with_identical_frames(engine, reference, tmp_path: Path, caplog,
                                                          stop_in: int) -> None:
    from engine.media import probe

    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    req, ck, out = _request(tmp_path), tmp_path / "ck", tmp_path / "out.mp4"
    with pytest.raises(RenderStopped):
        engine.render(req, out, lambda p: None, _stop_after(stop_in, req.steps), checkpoint_dir=ck)
    assert not out.exists()
    assert sorted(p.name for p in ck.glob("seg_*.mp4")) == [f"seg_{i:05d}.mp4" for i in range(stop_in)]
    assert _checkpoints(ck) == [ckpt.checkpoint_path(ck, stop_in).name]  # only the newest is kept
    size = ckpt.checkpoint_path(ck, stop_in).stat().st_size
    print(f"checkpoint: {size} bytes")  # 16 x 2 x 8 x 8 float32 context latents + header
    assert size < 16 * 2 * 8 * 8 * 4 + 4096
    steps: list[int] = []
    result = engine.render(req, out, lambda p: None, lambda: bool(steps.append(1)), checkpoint_dir=ck)
    assert _resumed_events(caplog)[-1]["next_chunk"] == stop_in
    assert len(steps) == (result.chunks - stop_in) * req.steps  # the finished chunks were not rendered again
    assert result.resumed_from_chunk == stop_in and result.chunks_rendered == result.chunks - stop_in
    assert _hashes(out) == reference
    info = probe(out)
    assert info["frames"] == round(SECONDS * 25) == result.frames
    assert abs(info["duration"] - SECONDS) <= 0.05 and abs(info["audio_duration"] - SECONDS) <= 0.05, info


def test_each_segment_is_fsynced_before_it_counts(engine, tmp_path: Path, monkeypatch) -> None:
    """A power loss must not leave a checkpoint naming a segment whose data never reached the disk."""
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    req = _request(tmp_path)
    result = engine.render(req, tmp_path / "out.mp4", lambda p: None, lambda: False, checkpoint_dir=tmp_path / "ck")
    assert synced.count("seg.part") == result.chunks


def _damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damage_edit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of the motion context
    path.write_bytes(bytes(data))


def _damage_next_chunk(path: Path) -> None:  # a valid-looking header claiming more finished chunks
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"next_chunk":"1"', b'"next_chunk":"2"'))


@pytest.mark.parametrize("damage", ["truncate", "edit", "next_chunk", "other_seed"])
def test_bad_checkpoint_starts_over(engine, reference, tmp_path: Path, caplog, damage: str) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    ck, out = tmp_path / "ck", tmp_path / "out.mp4"
    first_seed = 4 if damage == "other_seed" else 3
    with pytest.raises(RenderStopped):
        first = _request(tmp_path, first_seed)
        engine.render(first, out, lambda p: None, _stop_after(1, first.steps), checkpoint_dir=ck)
    path = ckpt.checkpoint_path(ck, 1)
    if damage == "next_chunk":
        assert b'"next_chunk":"1"' in path.read_bytes()
    {"truncate": _damage_truncate, "edit": _damage_edit, "next_chunk": _damage_next_chunk,
     "other_seed": lambda p: None}[damage](path)
    steps: list[int] = []
    result = engine.render(_request(tmp_path, 3), out, lambda p: None, lambda: bool(steps.append(1)),
                           checkpoint_dir=ck)
    assert not _resumed_events(caplog)
    assert len(_discarded(caplog)) == 1, caplog.records
    assert len(steps) == result.chunks * first.steps  # started over
    assert result.resumed_from_chunk is None and result.chunks_rendered == result.chunks
    assert _hashes(out) == reference


def test_checkpoint_round_trip_and_digest(tmp_path: Path) -> None:
    import torch

    latents = torch.randn(16, 2, 8, 8)
    (tmp_path / "seg_00000.mp4").write_bytes(b"x")
    ckpt.save_checkpoint(tmp_path, ckpt.Checkpoint("r", 1, 17, latents))
    got = ckpt.load(tmp_path, "r")
    assert isinstance(got, ckpt.Checkpoint) and got.next_chunk == 1 and got.written_frames == 17
    assert got.context is not None and torch.equal(got.context, latents)
    assert ckpt.load(tmp_path, "other").startswith("another recipe")  # type: ignore[union-attr]
    (tmp_path / "seg_00000.mp4").unlink()
    assert ckpt.load(tmp_path, "r").startswith("segments missing")  # type: ignore[union-attr]
    assert not list(tmp_path.glob("*.tmp"))
    # after the last chunk nothing follows: no context tensor
    (tmp_path / "seg_00000.mp4").write_bytes(b"x")
    ckpt.save_checkpoint(tmp_path, ckpt.Checkpoint("r", 1, 17, None))
    last = ckpt.load(tmp_path, "r")
    assert isinstance(last, ckpt.Checkpoint) and last.context is None


def _fsync_refusing_directories(real, err: int):
    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(err, os.strerror(err))
        real(fd)

    return fsync


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES])
def test_directory_fsync_refused_is_tolerated(tmp_path: Path, monkeypatch, err: int) -> None:
    """Network shares (NFS, SMB) may refuse fsync on a directory: the checkpoint is written all the same."""
    import torch

    monkeypatch.setattr(ckpt.os, "fsync", _fsync_refusing_directories(os.fsync, err))
    (tmp_path / "seg_00000.mp4").write_bytes(b"x")
    ckpt.save_checkpoint(tmp_path, ckpt.Checkpoint("r", 1, 17, torch.zeros(16, 2, 8, 8)))
    assert isinstance(ckpt.load(tmp_path, "r"), ckpt.Checkpoint)


def test_directory_fsync_io_error_is_raised(tmp_path: Path, monkeypatch) -> None:
    """A real I/O error is not hidden: the checkpoint may not be durable."""
    import torch

    monkeypatch.setattr(ckpt.os, "fsync", _fsync_refusing_directories(os.fsync, errno.EIO))
    (tmp_path / "seg_00000.mp4").write_bytes(b"x")
    with pytest.raises(OSError, match="Input/output"):
        ckpt.save_checkpoint(tmp_path, ckpt.Checkpoint("r", 1, 17, torch.zeros(16, 2, 8, 8)))


def test_params_unchanged_without_redo(tmp_path: Path) -> None:
    """The redo fields stay out of params() (job fingerprints, result files) unless set."""
    req = _request(tmp_path)
    plain = req.params()
    assert "redo_from_chunk" not in plain and "redo_seed" not in plain
    assert set(plain) == {f.name for f in dataclasses.fields(req)} - {"redo_from_chunk", "redo_seed"}
    redo = dataclasses.replace(req, redo_from_chunk=2, redo_seed=7).params()
    assert redo == {**plain, "redo_from_chunk": 2, "redo_seed": 7}
    assert req.without_redo() == req
    assert [dataclasses.replace(req, redo_from_chunk=2, redo_seed=7).chunk_seed(i) for i in range(4)] == [3, 3, 7, 7]
    with pytest.raises(InputError, match="redo from chunk -1"):
        dataclasses.replace(req, redo_from_chunk=-1)


# ---------------------------------------------------------------------------------------------- redo

REDO_SECONDS = 2.6  # 65 frames: 5 chunks; chunks 0 and 1 are frames 0-28
PREFIX_FRAMES = 29


@pytest.fixture(scope="module")
def original(engine, tmp_path_factory):
    """A finished 5-chunk job (seed 3) rendered with every checkpoint kept: (request, its dir, frame hashes)."""
    tmp = tmp_path_factory.mktemp("orig")
    req = _request(tmp, seed=3, seconds=REDO_SECONDS)
    ck = tmp / "ck"
    result = engine.render(req, tmp / "out.mp4", lambda p: None, lambda: False, checkpoint_dir=ck,
                           keep_all_checkpoints=True)
    assert result.chunks == 5 and result.chunks_rendered == 5 and result.resumed_from_chunk is None
    return req, ck, _hashes(tmp / "out.mp4")


@pytest.fixture(scope="module")
def redone(engine, original, tmp_path_factory):
    """The original redone from chunk 2 with seed 7, seeded from its kept checkpoints: (request, result, hashes,
    the chunk_done events of the call)."""
    req0, base, _ = original
    tmp = tmp_path_factory.mktemp("redo")
    req = dataclasses.replace(req0, redo_from_chunk=2, redo_seed=7)
    done: list[dict] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "engine.chunk_done":
                done.append(record.fields)  # type: ignore[attr-defined]

    handler, log = Grab(), logging.getLogger(LOGGER_NAME)
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        result = engine.render(req, tmp / "out.mp4", lambda p: None, lambda: False, checkpoint_dir=tmp / "ck",
                               base_checkpoint_dir=base)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    return req, result, _hashes(tmp / "out.mp4"), done


def test_keep_all_checkpoints_keeps_every_chunk(original) -> None:
    _, ck, _ = original
    assert _checkpoints(ck) == [ckpt.checkpoint_path(ck, n).name for n in range(1, 6)]


def test_redo_keeps_the_first_chunks_and_renders_the_rest(original, redone) -> None:
    _, _, orig = original
    _, result, hashes, done = redone
    assert result.chunks == 5 and result.resumed_from_chunk == 2 and result.chunks_rendered == 3
    assert [e["chunk"] for e in done] == [2, 3, 4]  # one event per finished chunk
    assert len(hashes) == len(orig) == 65
    assert hashes[:PREFIX_FRAMES] == orig[:PREFIX_FRAMES]
    for start, end in [(29, 41), (41, 53), (53, 65)]:  # every re-rendered chunk's frames differ
        assert all(a != b for a, b in zip(hashes[start:end], orig[start:end], strict=True)), (start, end)


def test_redo_equals_a_fresh_render_with_the_same_seeds(engine, original, redone, tmp_path: Path) -> None:
    """The redo's frames are what a render of the redo request from scratch gives: the seeding changed nothing
    but the work. Stopped after two chunks on the way: their checkpoint is valid for the original job too (its
    frames do not depend on the redo), and the resumed render crosses the recipe switch at chunk 2."""
    req0, _, _ = original
    req, _, hashes, _ = redone
    ck, out = tmp_path / "ck", tmp_path / "out.mp4"
    with pytest.raises(RenderStopped):
        engine.render(req, out, lambda p: None, _stop_after(2, req.steps), checkpoint_dir=ck)
    assert isinstance(ckpt.load_at(ck, 2, ckpt.recipe_id(engine.identity(), req0)), ckpt.Checkpoint)
    result = engine.render(req, out, lambda p: None, lambda: False, checkpoint_dir=ck)
    assert result.resumed_from_chunk == 2 and result.chunks_rendered == 3
    assert _hashes(out) == hashes


def test_seeded_redo_resumes_without_its_base(engine, original, redone, tmp_path: Path) -> None:
    """A redo stopped before its first chunk finished continues from the seeded checkpoint (of the original's
    recipe) even when the base is gone. Keeping every checkpoint, the redo takes the base's earlier ones too (a
    redo of the redo may start there)."""
    _, base, _ = original
    req, _, hashes, _ = redone
    ck, out = tmp_path / "ck", tmp_path / "out.mp4"
    with pytest.raises(RenderStopped):
        engine.render(req, out, lambda p: None, _stop_after(0, req.steps), checkpoint_dir=ck,
                      keep_all_checkpoints=True, base_checkpoint_dir=base)
    assert _checkpoints(ck) == [ckpt.checkpoint_path(ck, n).name for n in (1, 2)]
    result = engine.render(req, out, lambda p: None, lambda: False, checkpoint_dir=ck)
    assert result.resumed_from_chunk == 2 and result.chunks_rendered == 3
    assert _hashes(out) == hashes


def test_keep_all_resumes_from_the_newest_valid_checkpoint(engine, original, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    req, base, orig = original
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    _damage_edit(ckpt.checkpoint_path(ck, 5))
    ckpt.checkpoint_path(ck, 4).unlink()
    result = engine.render(req, tmp_path / "out.mp4", lambda p: None, lambda: False, checkpoint_dir=ck)
    assert result.resumed_from_chunk == 3 and result.chunks_rendered == 2
    # (the last chunk's checkpoint holds no tensor: the flipped bit lands in the header, whose key order varies)
    assert [e["reason"].split(":")[0] for e in _events(caplog, "engine.checkpoint_skipped")] == ["damaged"]
    assert _hashes(tmp_path / "out.mp4") == orig
    assert _checkpoints(ck) == [ckpt.checkpoint_path(ck, 5).name]  # not keep_all this time: the newest only


def _redo_refused(engine, req: RenderRequest, base: Path, tmp: Path, match: str) -> None:
    before = sorted((p.name, p.stat().st_size) for p in base.iterdir())
    with pytest.raises(InputError, match=match):
        engine.render(req, tmp / "out.mp4", lambda p: None, lambda: False, checkpoint_dir=tmp / "ck",
                      base_checkpoint_dir=base)
    assert sorted((p.name, p.stat().st_size) for p in base.iterdir()) == before  # the original is untouched
    assert not (tmp / "out.mp4").exists()


@pytest.mark.parametrize("case", ["other_seed", "other_speech", "no_checkpoint", "beyond"])
def test_redo_refuses_an_unusable_base(engine, original, tmp_path: Path, case: str) -> None:
    req0, base, _ = original
    req = dataclasses.replace(req0, redo_from_chunk=2, redo_seed=7)
    match = "no usable checkpoint"
    if case == "other_seed":
        req = dataclasses.replace(req, seed=4)
    elif case == "other_speech":
        wav = write_wav(tmp_path / "speech.wav", speech_like(REDO_SECONDS, 16000, seed=1), rate=16000)
        req = dataclasses.replace(req, audio=(wav,))
    elif case == "no_checkpoint":  # the original kept only its last checkpoint
        shutil.copytree(base, tmp_path / "base")
        base = tmp_path / "base"
        ckpt.checkpoint_path(base, 2).unlink()
    else:
        req, match = dataclasses.replace(req, redo_from_chunk=5), "this job has 5 chunks"
    _redo_refused(engine, req, base, tmp_path, match)
