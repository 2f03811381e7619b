"""Tests for engine/sampling.py: schedule, guidance, chunk plan, audio windows, speakers, noise.

Expected numbers are worked out by hand from the official InfiniteTalk formulation (docs/model.md §8, §9;
MeiGen-AI/InfiniteTalk wan/multitalk.py and wan/utils/multitalk_utils.py) and written as literals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.sampling import (
    APGState,
    Chunk,
    Guidance,
    audio_window_indices,
    combine,
    combine_two_speakers,
    combine_waveforms,
    euler_step,
    noise,
    passes,
    plan_chunks,
    slice_audio,
    timesteps,
)

# --------------------------------------------------------------------------------------------
# schedule and solver
# --------------------------------------------------------------------------------------------


def test_timesteps_shift7_by_hand() -> None:
    # linspace(1000, 1, 4) = [1000, 667, 334, 1], then 0; t' = 1000*7u/(1+6u), u = t/1000
    expected = [
        1000.0,  # u=1: 7/7 = 1
        933.4266,  # u=0.667: 4.669/5.002 = 0.9334266
        778.2956,  # u=0.334: 2.338/3.004 = 0.7782956
        6.9583,  # u=0.001: 0.007/1.006 = 0.0069583
        0.0,
    ]
    assert timesteps(4, 7) == pytest.approx(expected, abs=2e-3)


def test_timesteps_shift2_by_hand() -> None:
    expected = [
        1000.0,
        800.2400,  # u=0.667: 1.334/1.667 = 0.8002400
        500.7496,  # u=0.334: 0.668/1.334 = 0.5007496
        1.9980,  # u=0.001: 0.002/1.001 = 0.0019980
        0.0,
    ]
    assert timesteps(4, 2) == pytest.approx(expected, abs=2e-3)


def test_timesteps_40_steps_monotone() -> None:
    ts = timesteps(40, 7)
    assert len(ts) == 41 and ts[0] == 1000.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize(("steps", "shift"), [(4, 7.0), (8, 2.0), (40, 7.0), (40, 11.0), (57, 5.0)])
def test_timesteps_bit_exact_with_official_recipe(steps: int, shift: float) -> None:
    # the official recipe, re-done here: numpy float32 linspace, append 0., float32 tensor shift
    raw = list(np.linspace(1000, 1, steps, dtype=np.float32)) + [0.0]
    official = []
    for t in raw:
        u = torch.tensor([t]) / 1000
        official.append(float((shift * u / (1 + (shift - 1) * u)) * 1000))
    assert timesteps(steps, shift) == official  # exact equality, not approx


def test_timesteps_shift1_is_plain_linspace_and_rejects_bad_args() -> None:
    assert timesteps(4, 1.0) == pytest.approx([1000, 667, 334, 1, 0], abs=1e-3)
    assert timesteps(1, 5) == [1000.0, 0.0]
    with pytest.raises(ValueError):
        timesteps(0, 5)
    with pytest.raises(ValueError):
        timesteps(4, 0)


def test_euler_step_by_hand_and_dtype() -> None:
    z = torch.tensor([1.0, -1.0])
    v = torch.tensor([2.0, 0.5])
    # dt = (1000 - 933.4266)/1000 = 0.0665734; 1 - 2*0.0665734 = 0.8668532; -1 - 0.5*0.0665734 = -1.0332867
    out = euler_step(z, v, 1000.0, 933.4266)
    assert out.tolist() == pytest.approx([0.8668532, -1.0332867], abs=1e-6)
    # a bf16 prediction does not pull the latent down to bf16 (official latent stays fp32)
    assert euler_step(z, v.bfloat16(), 1000.0, 900.0).dtype == torch.float32
    # integrating a constant velocity over the whole schedule moves z by exactly -v (sum of dt = 1)
    ts = timesteps(40, 7)
    zz = z.clone()
    for t, t_next in zip(ts, ts[1:]):
        zz = euler_step(zz, v, t, t_next)
    assert zz.tolist() == pytest.approx([-1.0, -1.5], abs=1e-5)


# --------------------------------------------------------------------------------------------
# guidance
# --------------------------------------------------------------------------------------------


def test_passes_per_mode() -> None:
    assert passes(Guidance(5.0, 4.0)) == ("cond", "drop_text", "uncond")
    assert passes(Guidance(5.0, 1.0)) == ("cond", "drop_text", "uncond")
    assert passes(Guidance(1.0, 2.0)) == ("cond", "drop_audio")
    assert passes(Guidance(1.0, 1.0)) == ("cond",)
    assert passes(Guidance(1.0 + 1e-12, 1.0, apg=True)) == ("cond",)  # math.isclose like the official


def test_combine_three_pass_by_hand() -> None:
    preds = {
        "cond": torch.tensor([1.0, 2.0]),
        "drop_text": torch.tensor([0.5, 1.0]),
        "uncond": torch.tensor([0.0, 0.5]),
    }
    # uncond + 5*(cond - drop_text) + 4*(drop_text - uncond):
    #   [0 + 5*0.5 + 4*0.5, 0.5 + 5*1.0 + 4*0.5] = [4.5, 7.5]
    assert combine(Guidance(5.0, 4.0), preds).tolist() == pytest.approx([4.5, 7.5])


def test_combine_two_pass_by_hand() -> None:
    preds = {"cond": torch.tensor([1.0, 2.0]), "drop_audio": torch.tensor([0.25, 1.5])}
    # drop_audio + 2*(cond - drop_audio): [0.25 + 2*0.75, 1.5 + 2*0.5] = [1.75, 2.5]
    assert combine(Guidance(1.0, 2.0), preds).tolist() == pytest.approx([1.75, 2.5])


def test_combine_one_pass_and_errors() -> None:
    cond = torch.tensor([3.0, -1.0])
    assert torch.equal(combine(Guidance(1.0, 1.0), {"cond": cond}), cond)
    with pytest.raises(KeyError):
        combine(Guidance(5.0, 4.0), {"cond": cond, "drop_text": cond})
    with pytest.raises(ValueError):
        combine(Guidance(1.0, 2.0, apg=True), {"cond": cond, "drop_audio": cond})


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(1, 1, 1, -1)  # [C, T, H, W] = [1, 1, 1, n]


def test_apg_two_pass_by_hand() -> None:
    g = Guidance(1.0, 2.0, apg=True)
    state = APGState()
    preds = {"cond": _t([3.0, 0.0]), "drop_audio": _t([0.0, -4.0])}
    # step 1: diff = cond - drop_audio = [3, 4], norm 5 < 55 (no clip); parallel to cond (axis 0) = [3, 0]
    #   orthogonal [0, 4]; v = cond + (2-1)*[0, 4] = [3, 4]
    assert combine(g, preds, state).flatten().tolist() == pytest.approx([3.0, 4.0])
    # step 2: running = [3, 4] + (-0.75)*[3, 4] = [0.75, 1.0]; orthogonal [0, 1]; v = [3, 1]
    assert combine(g, preds, state).flatten().tolist() == pytest.approx([3.0, 1.0])


def test_apg_norm_threshold_by_hand() -> None:
    g = Guidance(1.0, 3.0, apg=True)
    preds = {"cond": _t([1.0, 0.0]), "drop_audio": _t([-299.0, -400.0])}
    # diff = [300, 400], norm 500 > 55: scale 55/500 = 0.11 -> [33, 44]; orthogonal to [1, 0]: [0, 44]
    # v = cond + (3-1)*[0, 44] = [1, 88]
    assert combine(g, preds, APGState()).flatten().tolist() == pytest.approx([1.0, 88.0])


def _apg_reference(
    diff: torch.Tensor, cond: torch.Tensor, running: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct re-computation of the official adaptive_projected_guidance (momentum -0.75, 55, eta 0)."""
    running = diff if running is None else diff + (-0.75) * running
    d = running.double()
    norm = math.sqrt(float((d * d).sum()))  # whole [C, T, H, W] tensor
    d = d * min(1.0, 55.0 / norm)
    c = cond.double()
    unit = c / math.sqrt(float((c * c).sum()))
    d = d - float((d * unit).sum()) * unit
    return d.float(), running


def test_apg_three_pass_matches_direct_recomputation_over_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    g = Guidance(5.0, 4.0, apg=True)
    state = APGState()
    run_text = run_audio = None
    for _ in range(3):
        # [C, T, H, W] = [2, 3, 2, 2]; scaled so the 55 threshold clips the text difference
        cond = torch.randn(2, 3, 2, 2, generator=gen) * 30
        drop_text = torch.randn(2, 3, 2, 2, generator=gen) * 30
        uncond = torch.randn(2, 3, 2, 2, generator=gen)
        got = combine(g, {"cond": cond, "drop_text": drop_text, "uncond": uncond}, state)
        text_upd, run_text = _apg_reference(cond - drop_text, cond, run_text)
        audio_upd, run_audio = _apg_reference(drop_text - uncond, cond, run_audio)
        expected = cond + 4.0 * text_upd + 3.0 * audio_upd
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        # the update is orthogonal to cond (eta 0)
        assert abs(float(((got - cond).double() * cond.double()).sum())) < 1e-2
    assert float(torch.linalg.vector_norm(cond - drop_text)) > 55  # the clip path was exercised


# --------------------------------------------------------------------------------------------
# chunk plan
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "starts"),
    [
        (25, [0]),  # shorter than a window: one padded window, trimmed after
        (81, [0]),  # 0 + 81 >= 81
        (82, [0, 72]),  # 1 + ceil(1/72) = 2
        (153, [0, 72]),  # 72 + 81 = 153 >= 153
        (154, [0, 72, 144]),  # 1 + ceil(73/72) = 3
        (250, [0, 72, 144, 216]),  # 1 + ceil(169/72) = 4; 144 + 81 = 225 < 250 <= 297
    ],
)
def test_plan_chunks(n: int, starts: list[int]) -> None:
    chunks = plan_chunks(n)
    assert [c.start for c in chunks] == starts
    assert [c.index for c in chunks] == list(range(len(starts)))
    assert all(c.frames == 81 for c in chunks)
    assert [c.keep_from for c in chunks] == [0] + [9] * (len(starts) - 1)
    assert [c.is_last for c in chunks] == [False] * (len(starts) - 1) + [True]
    assert chunks[-1] == Chunk(len(starts) - 1, starts[-1], 81, 0 if len(starts) == 1 else 9, True)


def test_plan_chunks_count_formula_and_coverage() -> None:
    for n in range(1, 800):
        chunks = plan_chunks(n)
        assert len(chunks) == (1 if n <= 81 else 1 + math.ceil((n - 81) / 72))
        produced = sum(c.frames - c.keep_from for c in chunks)
        assert produced >= n and (n <= 81 or produced - n < 72)
    with pytest.raises(ValueError):
        plan_chunks(0)
    with pytest.raises(ValueError):
        plan_chunks(100, frame_window=80)
    with pytest.raises(ValueError):
        plan_chunks(100, motion_frames=81)


# --------------------------------------------------------------------------------------------
# audio windows
# --------------------------------------------------------------------------------------------


def test_audio_window_indices_start_middle_end() -> None:
    # start: offsets -2..+2 clamped at 0
    assert audio_window_indices(0, 3, 100).tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    # middle (chunk 1 starts at 72): real neighbouring audio across the chunk boundary
    assert audio_window_indices(72, 2, 200).tolist() == [[70, 71, 72, 73, 74], [71, 72, 73, 74, 75]]
    # end: clamped at total - 1 = 99
    idx = audio_window_indices(95, 5, 100)
    assert idx.dtype == torch.long and idx.shape == (5, 5)
    assert idx[-2:].tolist() == [[96, 97, 98, 99, 99], [97, 98, 99, 99, 99]]


def _ramp(n: int, layers: int = 2, hidden: int = 3) -> torch.Tensor:
    # value = frame*100 + layer*10 + h, so positions (and the L*H flatten order) are visible
    f = torch.arange(n).view(n, 1, 1) * 100.0
    return f + torch.arange(layers).view(1, layers, 1) * 10.0 + torch.arange(hidden).view(1, 1, hidden)


def _frames(windows: torch.Tensor) -> list[list[int]]:
    return (windows[..., 0] // 100).long().tolist()  # the source frame of each window entry


def test_slice_audio_shapes_and_flatten_order() -> None:
    emb = _ramp(100)
    first, last = plan_chunks(100)
    w = slice_audio(emb, first)
    assert w.shape == (81, 5, 6)  # [frames, window, L*H]
    assert w[10, 2].tolist() == [1000, 1001, 1002, 1010, 1011, 1012]  # frame 10, layers 0/1, h 0..2
    assert _frames(w)[0] == [0, 0, 0, 1, 2]
    assert _frames(w)[80] == [78, 79, 80, 81, 82]  # chunk 0 is not last: real audio past 81


def test_slice_audio_last_chunk_mirror_padding() -> None:
    emb = _ramp(100)
    last = plan_chunks(100)[-1]
    assert last.start == 72 and last.is_last
    # end = 72 + 81 = 153 >= 100: miss = 153 - 100 + 3 = 56; padded frames 100..155 are
    # emb[99], emb[98], ..., emb[44] (padded p -> 199 - p)
    frames = _frames(slice_audio(emb, last))
    assert frames[0] == [70, 71, 72, 73, 74]
    assert frames[27] == [97, 98, 99, 99, 98]  # absolute 99: 97, 98, 99, p100=99, p101=98
    assert frames[28] == [98, 99, 99, 98, 97]
    assert frames[80] == [49, 48, 47, 46, 45]  # absolute 150..154 -> 199 - p


def test_slice_audio_end_exactly_at_audio_length() -> None:
    emb = _ramp(153)
    last = plan_chunks(153)[-1]
    # end = 153 >= 153: miss = 3, padded p153 = emb[152], p154 = emb[151]
    assert _frames(slice_audio(emb, last))[80] == [150, 151, 152, 152, 151]


def test_slice_audio_non_last_chunk_only_clamps() -> None:
    # a shorter second speaker on a non-last chunk: clamp to its last frame, no mirror
    first = plan_chunks(200)[0]
    frames = _frames(slice_audio(_ramp(60), first))
    assert frames[59] == [57, 58, 59, 59, 59]
    assert frames[80] == [59, 59, 59, 59, 59]


def test_slice_audio_short_speech_reflects_repeatedly() -> None:
    (only,) = plan_chunks(25)
    # miss = 81 - 25 + 3 = 59 > 25: appended 24..0 (25), 0..24 (25), 24..16 (9) -> padded length 84
    frames = _frames(slice_audio(_ramp(25), only))
    assert frames[0] == [0, 0, 0, 1, 2]
    assert frames[24] == [22, 23, 24, 24, 23]
    assert frames[49] == [2, 1, 0, 0, 1]  # absolute 47..51 -> appended j 22..26 -> 2, 1, 0, 0, 1
    assert frames[80] == [21, 20, 19, 18, 17]  # absolute 78..82 -> appended j 53..57 -> 24 - (j - 50)


# --------------------------------------------------------------------------------------------
# two speakers
# --------------------------------------------------------------------------------------------


def test_combine_waveforms_add_and_para() -> None:
    w1 = torch.tensor([1.0, 2.0, 3.0])
    w2 = torch.tensor([4.0, 5.0])
    a1, a2 = combine_waveforms(w1, w2, "add")
    # person 1 then person 2, each padded with silence to 3 + 2 = 5 samples
    assert a1.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0]
    assert a2.tolist() == [0.0, 0.0, 0.0, 4.0, 5.0]
    p1, p2 = combine_waveforms(w1, w2, "para")
    assert p1.tolist() == [1.0, 2.0, 3.0] and p2.tolist() == [4.0, 5.0, 0.0]
    m1, m2 = combine_waveforms(None, w2, "para")  # missing track -> silence as long as the other
    assert m1.tolist() == [0.0, 0.0] and torch.equal(m2, w2)
    # numpy in, numpy out (the engine's decoded audio is numpy float32)
    n1, n2 = combine_waveforms(w1.numpy(), None, "add")
    assert isinstance(n1, np.ndarray) and n1.dtype == np.float32
    assert n1.tolist() == [1.0, 2.0, 3.0, 0.0, 0.0, 0.0] and n2.tolist() == [0.0] * 6  # official quirk
    with pytest.raises(ValueError):
        combine_waveforms(w1, w2, "mix")
    with pytest.raises(ValueError):
        combine_waveforms(None, None, "para")


def test_combine_two_speakers_embeddings() -> None:
    e1, e2 = _ramp(4) + 1, _ramp(3) + 1  # +1 so no real entry is zero
    a1, a2 = combine_two_speakers(e1, e2, "add")
    assert a1.shape == a2.shape == (7, 2, 3)
    assert torch.equal(a1[:4], e1) and not a1[4:].any()
    assert not a2[:4].any() and torch.equal(a2[4:], e2)
    p1, p2 = combine_two_speakers(e1, e2, "para")
    assert p1.shape == p2.shape == (4, 2, 3)
    assert torch.equal(p1, e1) and torch.equal(p2[:3], e2) and not p2[3].any()


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------


def test_noise_determinism() -> None:
    shape = (16, 3, 4, 4)
    a = noise(shape, seed=42, chunk_index=0, device="cpu")
    assert a.dtype == torch.float32 and a.shape == shape
    assert torch.equal(a, noise(shape, 42, 0, "cpu"))
    assert not torch.equal(a, noise(shape, 43, 0, "cpu"))
    b = noise(shape, 42, 1, "cpu")
    assert not torch.equal(a, b) and torch.equal(b, noise(shape, 42, 1, "cpu"))
    assert not torch.equal(b, noise(shape, 42, 2, "cpu"))
    # chunk 0 is the official CPU draw: manual_seed(seed) then randn(shape)
    assert torch.equal(a, torch.randn(shape, generator=torch.Generator().manual_seed(42)))
    with pytest.raises(ValueError):
        noise(shape, -1, 0, "cpu")
