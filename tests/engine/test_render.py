"""End-to-end renders with the tiny models folder, through the real loaders and the real chunk loop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine.api import EngineOptions, InputError, Progress, RenderRequest, RenderStopped, request_from_settings
from tests.conftest import make_portrait, speech_like, write_wav

SIZE = [64, 64]


@pytest.fixture(scope="module")
def engine(tiny_models: Path):
    from engine import load_engine

    # INFINITETALKD_TEST_DEVICE=cuda runs the same end-to-end tests on a GPU (bf16).
    device = os.environ.get("INFINITETALKD_TEST_DEVICE", "cpu")
    return load_engine(EngineOptions(models_dir=tiny_models, device=device, preset="lightx2v"))


def _request(tmp: Path, seconds: float, **settings) -> RenderRequest:
    img = make_portrait(tmp / "face.png")
    wav = write_wav(tmp / f"speech{seconds}.wav", speech_like(seconds, 44100), rate=44100, channels=2)
    return request_from_settings({"size": SIZE, **settings}, audio=wav, image=img)


def _frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("seconds", [1.0, 4.0, 10.0])
def test_speech_lengths_give_exact_frame_counts(engine, tmp_path: Path, seconds: float) -> None:
    from engine.media import probe

    req = _request(tmp_path, seconds)
    seen: list[Progress] = []
    result = engine.render(req, tmp_path / "out.mp4", seen.append, lambda: False)
    info = probe(tmp_path / "out.mp4")
    want = round(seconds * 25)
    assert abs(result.frames - want) <= 1 and abs(info["frames"] - want) <= 1
    assert info["fps"] == 25
    assert abs(info["audio_duration"] - seconds) <= 0.05, info
    assert abs(info["duration"] - seconds) <= 0.05, info
    if seconds == 10.0:
        assert result.chunks >= 3
        assert max(p.chunk for p in seen) == result.chunks
    assert seen[-1].fraction == 1.0
    assert [p.fraction for p in seen] == sorted(p.fraction for p in seen)


def test_seed_determinism(engine, tmp_path: Path) -> None:
    a = engine.render(_request(tmp_path, 1.0, seed=7), tmp_path / "a.mp4", lambda p: None, lambda: False)
    engine.render(_request(tmp_path, 1.0, seed=7), tmp_path / "b.mp4", lambda p: None, lambda: False)
    engine.render(_request(tmp_path, 1.0, seed=8), tmp_path / "c.mp4", lambda p: None, lambda: False)
    fa, fb, fc = (_frames(tmp_path / n) for n in ("a.mp4", "b.mp4", "c.mp4"))
    assert a.seed == 7
    assert np.array_equal(fa, fb)
    assert not np.array_equal(fa, fc)


@pytest.mark.parametrize("mode", ["para", "add"])
def test_two_speakers(engine, tmp_path: Path, mode: str) -> None:
    img = make_portrait(tmp_path / "two.png", 128, 96)
    a = write_wav(tmp_path / "a.wav", speech_like(1.0, seed=1))
    write_wav(tmp_path / "b.wav", speech_like(1.5, seed=2))
    req = request_from_settings({"size": SIZE, "audio2": "b.wav", "audio_mode": mode}, audio=a, image=img,
                                resolve=lambda key, name: tmp_path / name)
    result = engine.render(req, tmp_path / "two.mp4", lambda p: None, lambda: False)
    want = round((2.5 if mode == "add" else 1.5) * 25)
    assert abs(result.frames - want) <= 1


def test_two_speakers_with_boxes(engine, tmp_path: Path) -> None:
    img = make_portrait(tmp_path / "two.png", 128, 96)
    a = write_wav(tmp_path / "a.wav", speech_like(1.0, seed=1))
    write_wav(tmp_path / "b.wav", speech_like(1.0, seed=2))
    req = request_from_settings({"size": SIZE, "audio2": "b.wav", "boxes": [[0, 0, 60, 96], [68, 0, 128, 96]]},
                                audio=a, image=img, resolve=lambda key, name: tmp_path / name)
    assert engine.render(req, tmp_path / "box.mp4", lambda p: None, lambda: False).frames == 25


def test_dubbing_a_video(engine, tmp_path: Path) -> None:
    import av

    src = tmp_path / "src.mp4"
    with av.open(str(src), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for i in range(90):
            arr = np.full((64, 96, 3), (i * 2) % 255, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    wav = write_wav(tmp_path / "dub.wav", speech_like(4.0))
    req = request_from_settings({"size": SIZE}, audio=wav, video=src)
    result = engine.render(req, tmp_path / "dub.mp4", lambda p: None, lambda: False)
    assert result.frames == 100 and result.chunks == 2


def test_should_stop_stops_between_steps(engine, tmp_path: Path) -> None:
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(RenderStopped):
        engine.render(_request(tmp_path, 1.0), tmp_path / "stop.mp4", lambda p: None, stop)
    assert not (tmp_path / "stop.mp4").exists()


def test_short_speech_is_padded_and_trimmed(engine, tmp_path: Path) -> None:
    req = _request(tmp_path, 0.2)
    assert engine.render(req, tmp_path / "short.mp4", lambda p: None, lambda: False).frames == 5


def test_prompt_cache_hits(engine, tmp_path: Path) -> None:
    before = engine.prompts.misses
    engine.render(_request(tmp_path, 1.0, prompt="a unique prompt for the cache test"), tmp_path / "p1.mp4",
                  lambda p: None, lambda: False)
    engine.render(_request(tmp_path, 1.0, prompt="a unique prompt for the cache test"), tmp_path / "p2.mp4",
                  lambda p: None, lambda: False)
    assert engine.prompts.misses == before + 1


@pytest.mark.parametrize("case", ["unreadable_image", "text_as_wav", "empty_wav", "silence", "sub_frame"])
def test_bad_inputs_raise_input_error(engine, tmp_path: Path, case: str) -> None:
    img = make_portrait(tmp_path / "ok.png")
    wav = write_wav(tmp_path / "ok.wav", speech_like(1.0))
    if case == "unreadable_image":
        img = tmp_path / "bad.png"
        img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    elif case == "text_as_wav":
        wav = tmp_path / "bad.wav"
        wav.write_text("ffconcat version 1.0\nfile /etc/passwd\n")
    elif case == "empty_wav":
        wav = tmp_path / "empty.wav"
        wav.write_bytes(b"")
    elif case == "silence":
        wav = write_wav(tmp_path / "silent.wav", np.zeros(16000, np.float32))
    elif case == "sub_frame":
        wav = write_wav(tmp_path / "tiny.wav", speech_like(0.01))
    req = request_from_settings({"size": SIZE}, audio=wav, image=img)
    with pytest.raises(InputError) as e:
        engine.render(req, tmp_path / "x.mp4", lambda p: None, lambda: False)
    assert (img.name in str(e.value)) or (wav.name in str(e.value))
