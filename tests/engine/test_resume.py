"""Resumable renders (engine/checkpoint.py): a render stopped after a chunk and rendered again with the same
checkpoint directory continues there and gives the same frames as an uninterrupted render; a damaged checkpoint,
or one of another seed, is discarded and the render starts over."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from engine import checkpoint as ckpt
from engine.api import EngineOptions, RenderRequest, RenderStopped
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


def _request(tmp: Path, seed: int = 3) -> RenderRequest:
    img = make_portrait(tmp / "face.png")
    wav = write_wav(tmp / "speech.wav", speech_like(SECONDS, 16000), rate=16000)
    return request_from_settings({**SETTINGS, "seed": seed}, audio=wav, image=img)


def _hashes(path: Path) -> list[str]:
    import av

    with av.open(str(path)) as c:
        return [hashlib.sha256(f.to_ndarray(format="rgb24").tobytes()).hexdigest() for f in c.decode(video=0)]


def _stop_after(chunks: int, steps_per_chunk: int):
    """should_stop that stops the render in chunk ``chunks`` (0-based), after ``chunks`` finished chunks."""
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


def _resumed_events(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if getattr(r, "event", None) == "engine.resumed"]


def _discarded(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if getattr(r, "event", None) == "engine.checkpoint_discarded"]


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
    size = (ck / ckpt.CHECKPOINT_NAME).stat().st_size
    print(f"checkpoint: {size} bytes")  # 3 x 5 x 64 x 64 float32 + header
    assert size < 3 * 5 * 64 * 64 * 4 + 4096
    steps: list[int] = []
    result = engine.render(req, out, lambda p: None, lambda: bool(steps.append(1)), checkpoint_dir=ck)
    assert _resumed_events(caplog)[-1]["next_chunk"] == stop_in
    assert len(steps) == (result.chunks - stop_in) * req.steps  # the finished chunks were not rendered again
    assert _hashes(out) == reference
    info = probe(out)
    assert info["frames"] == round(SECONDS * 25) == result.frames
    assert abs(info["duration"] - SECONDS) <= 0.05 and abs(info["audio_duration"] - SECONDS) <= 0.05, info


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
    path = ck / ckpt.CHECKPOINT_NAME
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
    assert _hashes(out) == reference


def test_checkpoint_round_trip_and_digest(tmp_path: Path) -> None:
    import torch

    frames = torch.randn(3, 5, 8, 8)
    (tmp_path / "seg_00000.mp4").write_bytes(b"x")
    ckpt.save_checkpoint(tmp_path, ckpt.Checkpoint("r", 1, 17, frames))
    got = ckpt.load(tmp_path, "r")
    assert isinstance(got, ckpt.Checkpoint) and got.next_chunk == 1 and got.written_frames == 17
    assert torch.equal(got.context_frames, frames)
    assert ckpt.load(tmp_path, "other").startswith("another recipe")  # type: ignore[union-attr]
    (tmp_path / "seg_00000.mp4").unlink()
    assert ckpt.load(tmp_path, "r").startswith("segments missing")  # type: ignore[union-attr]
    assert not list(tmp_path.glob("*.tmp"))
    assert np.isfinite(got.context_frames.numpy()).all()
