"""End-to-end renders with the tiny models folder, through the real loaders and the real chunk loop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from engine.api import EngineOptions, InputError, Progress, RenderRequest, RenderStopped
from engine.settings import request_from_settings
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


def test_still_conditioning_is_reused_across_jobs(engine, tmp_path: Path, monkeypatch) -> None:
    """A later job with the same portrait skips the VAE encode + CLIP and renders the same frames as when they
    were computed; another portrait computes its own; only the last few portraits are kept."""
    from engine import frames as fr
    from engine.render import CONDITION_CACHE_ITEMS

    calls: list[int] = []
    real = engine._condition
    monkeypatch.setattr(engine, "_condition", lambda ref, window: calls.append(1) or real(ref, window))
    engine._conditions.clear()
    engine.render(_request(tmp_path, 1.0, seed=5), tmp_path / "a.mp4", lambda p: None, lambda: False)
    engine.render(_request(tmp_path, 1.0, seed=5), tmp_path / "b.mp4", lambda p: None, lambda: False)
    assert len(calls) == 1
    assert np.array_equal(_frames(tmp_path / "a.mp4"), _frames(tmp_path / "b.mp4"))
    img = make_portrait(tmp_path / "other.png", 128, 96)
    wav = write_wav(tmp_path / "s.wav", speech_like(1.0, 44100), rate=44100)
    other = request_from_settings({"size": SIZE, "seed": 5}, audio=wav, image=img)
    engine.render(other, tmp_path / "c.mp4", lambda p: None, lambda: False)
    assert len(calls) == 2 and len(engine._conditions) == 2
    rng = np.random.default_rng(0)
    for _ in range(CONDITION_CACHE_ITEMS + 2):  # least recently used portraits are dropped
        img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        engine._still_condition(img, fr.to_model(img[None])[:, 0], 9)
    assert len(engine._conditions) == CONDITION_CACHE_ITEMS


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


def test_denoise_uses_per_chunk_context_kv_identical_to_embeddings(engine, tmp_path: Path, monkeypatch) -> None:
    """Every DiT pass of a render gets the chunk's precomputed context K/V (built once per distinct context and
    audio input, not per step), and each pass's output equals the same pass computed from the embeddings.
    Two speakers with text guidance: 3 passes over 2 contexts (prompt / negative) and 2 audio inputs (real with
    L-RoPE keys / null)."""
    import torch

    from engine.dit import ContextEmb, ContextKV

    dit = engine.m.dit
    sources: dict[int, tuple[object, torch.Tensor]] = {}  # id(cache part) -> (part, the embedding it came from)
    built = {"text": 0, "audio": 0}
    real_text_kv, real_audio_kv = dit.text_kv, dit.audio_kv

    def spy(kind: str, real):  # type: ignore[no-untyped-def]
        def make(emb: torch.Tensor):  # type: ignore[no-untyped-def]
            part = real(emb)
            built[kind] += 1
            sources[id(part)] = (part, emb.clone())
            return part
        return make

    monkeypatch.setattr(dit, "text_kv", spy("text", real_text_kv))
    monkeypatch.setattr(dit, "audio_kv", spy("audio", real_audio_kv))
    calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def record(module, args, kwargs, output):  # type: ignore[no-untyped-def]
        kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        calls.append((tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), kw, output.clone()))

    handle = dit.register_forward_hook(record, with_kwargs=True)
    img = make_portrait(tmp_path / "two.png", 128, 96)
    a = write_wav(tmp_path / "a.wav", speech_like(1.0, seed=1))
    write_wav(tmp_path / "b.wav", speech_like(1.0, seed=2))
    req = request_from_settings({"size": SIZE, "audio2": "b.wav", "text_guidance": 2.0}, audio=a, image=img,
                                resolve=lambda key, name: tmp_path / name)
    try:
        result = engine.render(req, tmp_path / "kv.mp4", lambda p: None, lambda: False)
    finally:
        handle.remove()
    assert result.chunks == 1 and len(calls) == 3 * req.steps
    assert built == {"text": 2, "audio": 2}  # once per chunk for each distinct input, not per step
    speakers = []
    with torch.inference_mode():
        for args, kw, out in calls:
            x, t, y, kv, masks = args
            assert isinstance(kv, ContextKV)
            _, ctx = sources[id(kv.text)]
            _, aud = sources[id(kv.audio)]
            want = dit(x, t, y, ContextEmb(ctx, aud), masks, **kw)
            if engine.fast:  # compiled blocks (GPU): the cached and uncached calls are two bf16 graphs, fused
                # differently; measured 1.8e-2 on the H100 (bf16 eager alone is 1.4e-2 from fp32 at full size)
                assert ((out - want).norm() / want.norm()).item() < 5e-2
            else:  # eager: the same ops on the same inputs
                assert torch.equal(out, want)
            speakers.append(aud.shape[1])
    assert speakers[:3] == [2, 2, 1]  # cond / drop_text on both speakers, uncond on the null audio
    t0, t1, t2 = (args[3].text for args, _, _ in calls[:3])
    a0, a1, a2 = (args[3].audio for args, _, _ in calls[:3])
    assert t0 is not t1 and t1 is t2 and a0 is a1 and a1 is not a2  # prompt vs negative; real vs null audio
    assert all(args[3].text is t0 for args, _, _ in calls[::3])  # the same cache on every step


def test_low_memory_render_skips_the_cache_and_matches(engine, tiny_models: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    """Streamed blocks (memory_mode low) hold their weights on the device only inside each block's call, so the
    render projects the context inside the blocks as before; the frames equal the resident (cached) render's."""
    from engine import load_engine

    if engine.m.device.type != "cpu":
        pytest.skip("bit-equal frames are a CPU property; on a GPU the resident and streamed engines compile "
                    "different graphs (streaming itself is checked against resident in test_offload.py)")
    low = load_engine(EngineOptions(models_dir=tiny_models, device="cpu", preset="lightx2v", memory_mode="low"))
    assert low.m.dit.blocks_streamed and not engine.m.dit.blocks_streamed

    def refuse(emb):  # type: ignore[no-untyped-def]
        raise AssertionError("no context K/V cache with streamed blocks")

    monkeypatch.setattr(low.m.dit, "text_kv", refuse)
    monkeypatch.setattr(low.m.dit, "audio_kv", refuse)
    low.render(_request(tmp_path, 1.0, seed=3), tmp_path / "low.mp4", lambda p: None, lambda: False)
    engine.render(_request(tmp_path, 1.0, seed=3), tmp_path / "res.mp4", lambda p: None, lambda: False)
    assert np.array_equal(_frames(tmp_path / "low.mp4"), _frames(tmp_path / "res.mp4"))


def test_progress_moves_through_the_decode_and_the_file_end(engine, tmp_path: Path) -> None:
    """Progress does not stop at the last denoising step: the VAE decode reports per latent frame and the writer's
    end has its own share, so an ETA from the fraction covers every stage. One name for the encode timing."""
    seen: list[Progress] = []
    result = engine.render(_request(tmp_path, 4.0), tmp_path / "p.mp4", seen.append, lambda: False)
    assert result.chunks >= 2
    steps = seen[-1].steps or max(p.steps for p in seen)
    for chunk in range(1, result.chunks + 1):
        last_step = [p for p in seen if p.stage == "denoise" and p.chunk == chunk and p.step == steps]
        decode = [p for p in seen if p.stage == "decode" and p.chunk == chunk]
        assert len(last_step) == 1 and len(decode) >= 3, (chunk, decode)  # one report per latent frame or more
        assert last_step[0].fraction < decode[0].fraction < decode[-1].fraction < 1.0
    mux = [p for p in seen if p.stage == "mux"]
    assert [p.fraction for p in mux][-1] == 1.0 and mux[0].fraction < 1.0
    assert [p.fraction for p in seen] == sorted(p.fraction for p in seen)
    assert "mp4_encode" in result.timings and "encode" not in result.timings
