"""Tests for engine/dit.py (Wan 2.1 I2V DiT + InfiniteTalk adapter) and engine/attention.py.

fp32 on CPU. Reference implementations written here are deliberately plain (loops, explicit indices) so
they share no code with the engine.
"""

from __future__ import annotations

import copy
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import engine.dit as dit
from engine.attention import attention, sdpa_backend
from engine.dit import (
    RELEASED,
    TINY,
    ContextEmb,
    WanInfiniteTalk,
    apply_rope,
    config_from_shapes,
    reference_attention_map,
    rope_1d,
    rope_3d_tables,
    select_audio_windows,
    speaker_positions,
)
from tests.engine.forward import fwd

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures" / "manifests"


def _read_manifest(path: Path) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        assert key not in out, f"duplicate key {key} in {path.name}"
        out[key] = () if shape in ("", "-") else tuple(int(s) for s in shape.split("x"))
    return out


@pytest.fixture(scope="module")
def tiny_model() -> WanInfiniteTalk:
    torch.manual_seed(0)
    model = WanInfiniteTalk(TINY).eval()
    with torch.no_grad():  # non-trivial norm affines so a wrong norm placement shows
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _tiny_inputs(b: int = 1, p: int = 1, f: int = 3, h: int = 4, w: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(b, 16, f, h, w, generator=g),
        "t": torch.full((b,), 700.0),
        "context": torch.randn(b, 20, TINY.text_dim, generator=g),
        "clip_fea": torch.randn(b, 257, TINY.clip_dim, generator=g),
        "y": torch.randn(b, 20, f, h, w, generator=g),
        "audio": torch.randn(b, p, 4 * (f - 1) + 1, TINY.audio_window, TINY.audio_feature_dim, generator=g),
    }


# 1. manifests -------------------------------------------------------------------------------------


def test_manifests_match_released_module_and_totals(tmp_path: Path) -> None:
    base = _read_manifest(MANIFESTS / "dit_base.tsv")
    patch = _read_manifest(MANIFESTS / "infinitetalk_patch.tsv")
    assert not set(base) & set(patch), "the adapter must not override base keys"
    assert len(base) == 1303 and sum(math.prod(s) for s in base.values()) == 16_394_878_784
    assert len(patch) == 330 and sum(math.prod(s) for s in patch.values()) == 2_487_168_000

    # The committed files are what the (engine-independent) generator writes.
    runpy.run_path(str(MANIFESTS / "make_dit_manifests.py"))["main"](tmp_path)
    for name in ("dit_base.tsv", "infinitetalk_patch.tsv"):
        assert (tmp_path / name).read_text() == (MANIFESTS / name).read_text(), f"{name} is stale"

    model = dit.build(RELEASED, "cpu")
    assert all(p.is_meta for p in model.parameters())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {**base, **patch}
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}


# 2. config detection ----------------------------------------------------------------------------


def test_config_from_shapes() -> None:
    shapes = {**_read_manifest(MANIFESTS / "dit_base.tsv"), **_read_manifest(MANIFESTS / "infinitetalk_patch.tsv")}
    assert config_from_shapes(shapes) == RELEASED
    tiny = {k: tuple(v.shape) for k, v in WanInfiniteTalk(TINY).state_dict().items()}
    assert config_from_shapes(tiny) == TINY
    del shapes["audio_proj.norm.weight"]
    with pytest.raises(ValueError, match="audio_proj.norm.weight"):
        config_from_shapes(shapes)


# 3. against diffusers' WanTransformer3DModel ------------------------------------------------------

# diffusers module path -> released Wan key (diffusers' block norm2 is the cross-attention norm = Wan norm3).
_TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def _diffusers_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key == "scale_shift_table":
            out["head.modulation"] = value
        elif key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            if rest == "scale_shift_table":
                out[f"blocks.{idx}.modulation"] = value
            else:
                module, leaf = rest.rsplit(".", 1)
                out[f"blocks.{idx}.{_BLOCK[module]}.{leaf}"] = value
        else:
            module, leaf = key.rsplit(".", 1)
            out[f"{_TOP[module]}.{leaf}"] = value
    return out


def test_matches_diffusers_wan_i2v() -> None:
    """Whole forward (adapter output zeroed) against diffusers, which is independent code for Wan 2.1 I2V.

    Known conventions checked to agree: rope 44/42/42 adjacent pairs, [cos|sin] time sinusoid
    (flip_sin_to_cos), e for the head and e0 for blocks, image tokens first, unpatchify order. The one
    difference, diffusers' fp32 time sinusoid vs the official float64 one, moves outputs by ~1e-6 at t≈1000.
    diffusers does not pad the text itself, so it gets the zero-padded context; ours pads inside.
    """
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=TINY.num_heads,
        attention_head_dim=TINY.head_dim,
        in_channels=TINY.in_dim,
        out_channels=TINY.out_dim,
        text_dim=TINY.text_dim,
        freq_dim=TINY.freq_dim,
        ffn_dim=TINY.ffn_dim,
        num_layers=TINY.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=TINY.eps,
        image_dim=TINY.clip_dim,
        added_kv_proj_dim=TINY.dim,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:  # norm weights away from 1, biases away from 0
                p.add_(0.1 * torch.randn_like(p))

    ours = WanInfiniteTalk(TINY).eval()
    result = ours.load_state_dict(_diffusers_to_wan(ref.state_dict()), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("audio_proj.") or ".audio_cross_attn." in k or ".norm_x." in k for k in result.missing_keys)
    with torch.no_grad():
        for block in ours.blocks:  # the audio branch adds exactly 0
            block.audio_cross_attn.proj.weight.zero_()
            block.audio_cross_attn.proj.bias.zero_()

    inp = _tiny_inputs(b=2, h=4, w=6)  # non-square grid catches h/w swaps
    inp["t"] = torch.tensor([999.0, 250.0])
    padded = F.pad(inp["context"], (0, 0, 0, TINY.text_len - inp["context"].shape[1]))
    with torch.no_grad():
        got = fwd(ours, **inp)
        want = ref(torch.cat([inp["x"], inp["y"]], 1), inp["t"], padded, inp["clip_fea"], return_dict=False)[0]
    assert got.dtype == torch.float32 and got.shape == want.shape == (2, 16, 3, 4, 6)
    err = (got - want).abs().max().item()
    assert err < 1e-4 * max(1.0, want.abs().max().item()), err


# 4. RoPE ------------------------------------------------------------------------------------------


def _rotate_reference(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """x [L, H, D], angles [L, D/2]: rotate (x[2i], x[2i+1]) by angles[:, i], float64 loops."""
    out = np.empty_like(x)
    for pos in range(x.shape[0]):
        for i in range(x.shape[2] // 2):
            c, s = math.cos(angles[pos, i]), math.sin(angles[pos, i])
            a, b = x[pos, :, 2 * i], x[pos, :, 2 * i + 1]
            out[pos, :, 2 * i] = a * c - b * s
            out[pos, :, 2 * i + 1] = a * s + b * c
    return out


def test_rope_3d_matches_plain_reference() -> None:
    grid = (3, 4, 5)
    q = torch.randn(1, math.prod(grid), 2, 128, generator=torch.Generator().manual_seed(3))
    angles = np.zeros((math.prod(grid), 64))
    pos = 0
    for f in range(grid[0]):
        for r in range(grid[1]):
            for c in range(grid[2]):
                for i in range(64):  # pairs 0-21: time, base 44; 22-42: rows, base 42; 43-63: columns, base 42
                    if i < 22:
                        angles[pos, i] = f / 10000 ** (2 * i / 44)
                    elif i < 43:
                        angles[pos, i] = r / 10000 ** (2 * (i - 22) / 42)
                    else:
                        angles[pos, i] = c / 10000 ** (2 * (i - 43) / 42)
                pos += 1
    want = _rotate_reference(q[0].double().numpy(), angles)
    cos, sin = rope_3d_tables(grid, 128)
    got = apply_rope(q, cos, sin)[0].double().numpy()
    assert np.abs(got - want).max() < 2e-5
    cos64, sin64 = rope_3d_tables(grid, 128, dtype=torch.float64)
    assert np.abs(apply_rope(q.double(), cos64, sin64)[0].numpy() - want).max() < 1e-12


def test_rope_1d_matches_plain_reference() -> None:
    x = torch.randn(1, 6, 2, 128, generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([0.0, 2.0, 3.3, 12.0, 22.0, 23.75])
    angles = np.array([[p / 10000 ** (2 * i / 128) for i in range(64)] for p in positions.tolist()])
    want = _rotate_reference(x[0].double().numpy(), angles)
    assert np.abs(rope_1d(x, positions)[0].double().numpy() - want).max() < 2e-5


# 5. audio windowing + projection ------------------------------------------------------------------


def test_audio_windowing_against_explicit_indices(tiny_model: WanInfiniteTalk) -> None:
    fv, win, a = 9, TINY.audio_window, TINY.audio_feature_dim  # 3 latent frames
    # Random entries are all distinct, so any wrong index shows up as an inequality.
    audio = torch.randn(1, 2, fv, win, a, generator=torch.Generator().manual_seed(5))
    first, rest = select_audio_windows(audio, vae_scale=4)
    for person in range(2):
        assert torch.equal(first[0, person], audio[0, person, 0])
        for lat in range(1, 3):
            frames = [4 * (lat - 1) + 1 + k for k in range(4)]
            picks = [(frames[0], 0), (frames[0], 1), (frames[0], 2), (frames[1], 2), (frames[2], 2)]
            picks += [(frames[3], 2), (frames[3], 3), (frames[3], 4)]
            want = torch.stack([audio[0, person, fr, o] for fr, o in picks])
            assert torch.equal(rest[0, person, lat - 1], want)

    # embed_audio = proj1 on latent 0's 5 windows, proj1_vf on the 8 selected ones, then proj2, proj3, LN.
    ap = tiny_model.audio_proj
    with torch.no_grad():
        got = tiny_model.embed_audio(audio)
        for person in range(2):
            rows = [torch.relu(ap.proj1(audio[0, person, 0].reshape(-1)))]
            for lat in range(1, 3):
                rows.append(torch.relu(ap.proj1_vf(rest[0, person, lat - 1].reshape(-1))))
            tok = ap.proj3(torch.relu(ap.proj2(torch.stack(rows)))).view(3, TINY.audio_context_tokens, -1)
            want = F.layer_norm(tok, (TINY.audio_output_dim,), ap.norm.weight, ap.norm.bias, 1e-5)
            torch.testing.assert_close(got[0, person], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="video frames"):
        select_audio_windows(audio[:, :, :8], vae_scale=4)


# 6. per-frame audio attention ---------------------------------------------------------------------


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [S, H, D], k/v [N, H, D] -> [S, H, D] with an explicit softmax."""
    w = torch.einsum("shd,nhd->hsn", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hsn,nhd->shd", torch.softmax(w, dim=-1), v)


@pytest.mark.parametrize("people", [1, 2])
def test_audio_attention_is_per_latent_frame(tiny_model: WanInfiniteTalk, people: int) -> None:
    attn = tiny_model.blocks[0].audio_cross_attn
    b, f, s, h, d = 2, 3, 5, TINY.num_heads, TINY.head_dim
    g = torch.Generator().manual_seed(6)
    x = torch.randn(b, f * s, TINY.dim, generator=g)
    na = TINY.audio_context_tokens * people
    audio = torch.randn(b * f, na, TINY.audio_output_dim, generator=g)
    positions = torch.rand(b, f * s, generator=g) * 24 if people == 2 else None
    with torch.no_grad():
        got = attn(x, audio, f, positions)
        want = torch.empty_like(got)
        for i in range(b):
            for fr in range(f):
                tok = slice(fr * s, (fr + 1) * s)
                q = attn.q_linear(x[i, tok]).view(s, h, d)
                kv = attn.kv_linear(audio[i * f + fr])
                k, v = kv[:, : TINY.dim].reshape(na, h, d), kv[:, TINY.dim :].reshape(na, h, d)
                if positions is not None:
                    q = rope_1d(q[None], positions[i, tok])[0]
                    key_pos = torch.tensor([2.0] * (na // 2) + [22.0] * (na // 2))
                    k = rope_1d(k[None], key_pos)[0]
                want[i, tok] = attn.proj(_plain_attention(q, k, v).reshape(s, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_function_and_backend_selector() -> None:
    g = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(2, 5, 3, 16, generator=g),
        torch.randn(2, 7, 3, 16, generator=g),
        torch.randn(2, 7, 3, 16, generator=g),
    )
    want = torch.stack([_plain_attention(q[i], k[i], v[i]) for i in range(2)])
    torch.testing.assert_close(attention(q, k, v), want, rtol=1e-5, atol=1e-6)
    with sdpa_backend("math"):
        torch.testing.assert_close(attention(q, k, v), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend"), sdpa_backend("nope"):
        pass


# 7. two-speaker routing ---------------------------------------------------------------------------


def test_speaker_positions_on_hand_made_map() -> None:
    ref_map = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.5, 0.2],  # person 1
            [0.1, 0.8, 0.0, 0.3, 0.6],  # person 2
            [0.0, 0.0, 0.5, 0.4, 0.1],  # background
        ]
    )
    # winners: p1, p2, bg, p1, p2. p1 scaled by (v-0)/0.9 into [0,4]; p2 by (v-0)/0.8 into [20,24].
    want = torch.tensor([4.0, 24.0, 12.0, 0.5 / 0.9 * 4, 20 + 0.6 / 0.8 * 4])
    torch.testing.assert_close(speaker_positions(ref_map), want)
    torch.testing.assert_close(speaker_positions(ref_map[None].repeat(2, 1, 1)), want[None].repeat(2, 1))


def test_reference_attention_map_and_empty_mask_guard() -> None:
    g = torch.Generator().manual_seed(8)
    q, k_ref = torch.randn(1, 10, 2, 16, generator=g), torch.randn(1, 4, 2, 16, generator=g)
    masks = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    probs = torch.softmax(torch.einsum("lhd,mhd->hlm", q[0], k_ref[0]) / 4.0, dim=-1)  # [H, L, Lr]
    want = torch.stack([(probs * m).sum(-1).mean(0) / m.sum() for m in masks[0]])
    torch.testing.assert_close(reference_attention_map(q, k_ref, masks)[0], want)
    # An empty person mask must not produce NaN (which would win the argmax) and must never win.
    masks[0, 1] = 0.0
    got = reference_attention_map(q, k_ref, masks)
    assert torch.isfinite(got).all() and (got[0, 1] == 0).all()
    assert (speaker_positions(got) < 20).all()


def test_two_speaker_forward(tiny_model: WanInfiniteTalk, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = _tiny_inputs(p=2)
    masks = torch.zeros(1, 3, 4, 4)
    masks[:, 0, :, :2] = 1  # person 1 left, person 2 right, background empty at token resolution
    masks[:, 1, :, 2:] = 1
    calls = []
    real = dit.reference_attention_map
    monkeypatch.setattr(dit, "reference_attention_map", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        two = fwd(tiny_model, **inp, ref_target_masks=masks)
        assert len(calls) == TINY.num_layers  # once per block for two speakers
        one = fwd(tiny_model, **{**inp, "audio": inp["audio"][:, :1]})
        assert len(calls) == TINY.num_layers  # never for one speaker
    assert torch.isfinite(two).all()
    assert (two - one).abs().max() > 1e-3
    with pytest.raises(ValueError, match="ref_target_masks"), torch.no_grad():
        fwd(tiny_model, **inp)


# 8. tiny forward ----------------------------------------------------------------------------------


def test_tiny_forward_deterministic_and_precomputed_embeddings(tiny_model: WanInfiniteTalk) -> None:
    inp = _tiny_inputs()
    with torch.no_grad():
        a = fwd(tiny_model, **inp)
        b = fwd(tiny_model, **inp)
        ctx = tiny_model.embed_context(inp["context"], inp["clip_fea"])
        aud = tiny_model.embed_audio(inp["audio"])
        c = tiny_model(inp["x"], inp["t"], inp["y"], ContextEmb(ctx, aud))
        other_t = fwd(tiny_model, **{**inp, "t": torch.full((1,), 100.0)})
    assert a.shape == (1, 16, 3, 4, 4) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and torch.equal(a, c)
    assert (a - other_t).abs().max() > 1e-3
    assert ctx.shape == (1, 257 + TINY.text_len, TINY.dim)
    assert aud.shape == (1, 1, 3, TINY.audio_context_tokens, TINY.audio_output_dim)
    assert not any("rope" in k for k in tiny_model.state_dict())


# 9. context K/V computed once per chunk -----------------------------------------------------------

# The layers that project the context / audio tokens; with a cache none of them may run in a forward.
_CONTEXT_LAYERS = ("cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img", "audio_cross_attn.kv_linear")


def _count_context_projections(model: WanInfiniteTalk) -> tuple[list[int], list]:
    calls = [0]
    handles = [
        model.get_submodule(f"blocks.{i}.{name}").register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        for i in range(len(model.blocks))
        for name in _CONTEXT_LAYERS
    ]
    return calls, handles


def _two_speaker_masks() -> torch.Tensor:
    masks = torch.zeros(1, 3, 4, 4)
    masks[:, 0, :, :2] = 1
    masks[:, 1, :, 2:] = 1
    return masks


@pytest.mark.parametrize(
    ("dtype", "people", "clip"),
    [(torch.float32, 1, True), (torch.float32, 2, True), (torch.bfloat16, 1, True), (torch.bfloat16, 2, True),
     (torch.float32, 1, False)],
)
def test_context_kv_forward_is_bit_identical(
    tiny_model: WanInfiniteTalk, dtype: torch.dtype, people: int, clip: bool
) -> None:
    """Same ops on the same inputs: the cached forward equals the plain one bit for bit, and projects nothing."""
    model = copy.deepcopy(tiny_model).to(dtype)
    inp = _tiny_inputs(p=people)
    if not clip:
        inp["clip_fea"] = None  # no CLIP file: the image branch attends to the text (n_img = 0)
    masks = _two_speaker_masks() if people == 2 else None
    with torch.inference_mode():
        want = fwd(model, **inp, ref_target_masks=masks)
        ctx = model.embed_context(inp["context"], inp["clip_fea"])
        aud = model.embed_audio(inp["audio"])
        kv = model.context_kv(ctx, aud)
        calls, handles = _count_context_projections(model)
        got = model(inp["x"], inp["t"], inp["y"], kv, masks)
        again = model(inp["x"], torch.full((1,), 300.0), inp["y"], kv, masks)
        assert calls[0] == 0  # the cache replaced every context projection
        plain_again = model(inp["x"], torch.full((1,), 300.0), inp["y"], ContextEmb(ctx, aud), masks)
        assert calls[0] == len(_CONTEXT_LAYERS) * TINY.num_layers  # the plain path projects in every block
        for h in handles:
            h.remove()
        # The cache is what the blocks attend to: one built from another prompt changes the result. (Not a
        # permutation of the same tokens: unmasked attention without key positions is invariant to that.)
        other = model.context_kv(model.embed_context(-inp["context"], inp["clip_fea"]), aud)
        changed = model(inp["x"], inp["t"], inp["y"], other, masks)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.equal(got, want)
    assert torch.equal(again, plain_again)  # another step (t) reuses the same cache
    assert (changed - want).abs().max() > 1e-3


def test_context_kv_shapes_equal_across_blocks_and_parts_are_shared(tiny_model: WanInfiniteTalk) -> None:
    """One compiled block graph serves all blocks only if every block gets tensors of one shape/dtype/stride."""
    inp = _tiny_inputs(p=2)
    h, d = TINY.num_heads, TINY.head_dim
    with torch.inference_mode():
        text = tiny_model.text_kv(tiny_model.embed_context(inp["context"], inp["clip_fea"]))
        audio = tiny_model.audio_kv(tiny_model.embed_audio(inp["audio"]))
    assert len(text.blocks) == len(audio.blocks) == TINY.num_layers
    assert (text.batch, audio.batch, audio.num_people, audio.num_frames) == (1, 1, 2, 3)
    want = [(1, TINY.text_len, h, d)] * 2 + [(1, 257, h, d)] * 2 + [(3, 2 * TINY.audio_context_tokens, h, d)] * 2
    layouts = []
    for tkv, akv in zip(text.blocks, audio.blocks):
        tensors = [*tkv, *akv]
        assert [tuple(t.shape) for t in tensors] == want
        layouts.append([(t.dtype, t.stride()) for t in tensors])
    assert all(lay == layouts[0] for lay in layouts)
    assert len({t.data_ptr() for tkv in text.blocks for t in tkv}) == 4 * TINY.num_layers  # no aliasing
    # A pair is a plain container of the two parts (render.py pairs 2 contexts with 2 audio inputs, no copies).
    pair = dit.ContextKV(text, audio)
    assert pair.text is text and pair.audio is audio


def test_context_kv_batch_one_context_expands(tiny_model: WanInfiniteTalk) -> None:
    inp = _tiny_inputs(b=2)
    ctx1 = inp["context"][:1]
    with torch.inference_mode():
        emb = tiny_model.embed_context(ctx1, inp["clip_fea"][:1])  # [1, ...], expanded to the batch of 2
        aud = tiny_model.embed_audio(inp["audio"])
        want = tiny_model(inp["x"], inp["t"], inp["y"], ContextEmb(emb, aud))
        got = tiny_model(inp["x"], inp["t"], inp["y"], tiny_model.context_kv(emb, aud))
    # Same math; projecting one row instead of an expanded batch may round differently.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_context_kv_validation(tiny_model: WanInfiniteTalk) -> None:
    inp = _tiny_inputs(p=2)
    with torch.inference_mode():
        ctx = tiny_model.embed_context(inp["context"], inp["clip_fea"])
        aud = tiny_model.embed_audio(inp["audio"])
        kv = tiny_model.context_kv(ctx, aud)
        with pytest.raises(TypeError, match="ContextEmb .*or a ContextKV"):  # one conditioning object, nothing else
            tiny_model(inp["x"], inp["t"], inp["y"], ctx, _two_speaker_masks())
        with pytest.raises(ValueError, match="latent frames"):  # cache of 3 latent frames, latent of 2
            tiny_model(inp["x"][:, :, :2], inp["t"], inp["y"][:, :, :2], kv)
        with pytest.raises(ValueError, match="ref_target_masks"):  # two speakers still need the masks
            tiny_model(inp["x"], inp["t"], inp["y"], kv)
        with pytest.raises(ValueError, match="fewer than text_len"):
            tiny_model.text_kv(ctx[:, :10])


def test_context_kv_refused_while_blocks_are_streamed() -> None:
    """Low-memory mode keeps block weights on the host between block calls, so the cache is not built there."""
    from engine.offload import stream_blocks

    torch.manual_seed(0)
    model = WanInfiniteTalk(TINY).eval().requires_grad_(False)
    inp = _tiny_inputs()
    assert not model.blocks_streamed
    streamer = stream_blocks(model, "cpu")
    assert model.blocks_streamed
    with torch.inference_mode():
        ctx = model.embed_context(inp["context"], inp["clip_fea"])
        with pytest.raises(RuntimeError, match="streamed"):
            model.text_kv(ctx)
        with pytest.raises(RuntimeError, match="streamed"):
            model.audio_kv(model.embed_audio(inp["audio"]))
    streamer.remove()
    assert not model.blocks_streamed


def test_context_kv_with_compiled_blocks_one_graph_no_recompiles(tiny_model: WanInfiniteTalk) -> None:
    """engine.fast.compile_blocks (Inductor, as on the GPU; ~20 s on 2 CPU cores) on the cached path: the per-block
    K/V are graph inputs of one shape, so both blocks share one graph, and new steps (t, x) and a new chunk's
    cache reuse it without recompiling."""
    from torch._dynamo.utils import counters

    from engine.fast import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(tiny_model)
    inp = _tiny_inputs(p=2)
    masks = _two_speaker_masks()
    with torch.inference_mode():
        kv = model.context_kv(model.embed_context(inp["context"], inp["clip_fea"]), model.embed_audio(inp["audio"]))
        eager = model(inp["x"], inp["t"], inp["y"], kv, masks)
        compile_blocks(model)
        out = model(inp["x"], inp["t"], inp["y"], kv, masks)
        assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
        nxt = _tiny_inputs(p=2, seed=5)  # the next chunk: new context, audio and latent, same shapes
        kv2 = model.context_kv(model.embed_context(nxt["context"], nxt["clip_fea"]), model.embed_audio(nxt["audio"]))
        with torch._dynamo.config.patch(error_on_recompile=True):
            model(inp["x"], torch.full((1,), 200.0), inp["y"], kv, masks)
            model(nxt["x"], nxt["t"], nxt["y"], kv2, masks)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
