"""8-bit self-attention (engine/attention_int8.py): the quantisation, the float32 reference of the kernel's
arithmetic (any device), and on a GPU the Triton kernel itself against exact attention and that reference."""

from __future__ import annotations

import math

import pytest
import torch

from engine import attention_int8 as a8

CUDA = a8.available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with 8-bit tensor cores and Triton")


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√D) v in float64, [B, L, H, D]."""
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ v64).transpose(1, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(b: int, length: int, h: int, d: int, *, scale: float = 1.0, k_bias: float = 0.0, device: str = "cpu",
        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, length, h, d, generator=g) * scale
    # k_bias: a per-channel offset shared by all tokens, the structure real checkpoints give K
    k = torch.randn(b, length, h, d, generator=g) * scale + k_bias * torch.randn(b, 1, h, d, generator=g)
    v = torch.randn(b, length, h, d, generator=g)
    return q.to(device), k.to(device), v.to(device)


def test_quantize_qk_round_trip_and_scale_layout() -> None:
    x = torch.randn(2, 37, 3, 64)
    x[0, 5, 1] = 0.0  # an all-zero row must give zeros, not NaN
    xq, scale = a8.quantize_qk(x, extra_scale=0.5)
    assert xq.dtype == torch.int8 and xq.shape == x.shape and scale.shape == (2, 3, 37)
    assert int(xq.abs().max()) == 127
    back = xq.float() * scale.transpose(1, 2)[..., None] / 0.5
    assert torch.isfinite(back).all() and back[0, 5, 1].abs().max() == 0
    # per row, the error is at most half a step: amax / 127 / 2
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step / 2 + 1e-6).all()


def test_smoothing_removes_the_token_mean_and_keeps_softmax() -> None:
    q, k, _ = qkv(1, 64, 2, 32, k_bias=5.0)
    kq, ks = a8.quantize_qk(k, smooth=True)
    k_s = kq.float() * ks.transpose(1, 2)[..., None]
    # the dequantised smoothed K is K minus its token mean (up to rounding) ...
    assert rel(k_s, k - k.mean(1, keepdim=True)) < 1e-2
    # ... and softmax over keys does not see the difference
    q, k = q.double(), k.double()
    p = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k), -1)
    p_s = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k - k.mean(1, keepdim=True)), -1)
    assert torch.allclose(p, p_s, atol=1e-12)


def test_quantize_v_layout_padding_and_round_trip() -> None:
    v = torch.randn(1, 50, 2, 32)
    vt, vs = a8.quantize_v(v)
    assert vt.dtype == torch.float8_e4m3fn and vt.shape == (1, 2, 32, 64) and vs.shape == (1, 2, 32)
    assert vt[..., 50:].float().abs().max() == 0  # zero padding to a multiple of 16 tokens
    back = vt[..., :50].float().transpose(-1, -2) * vs[:, :, None, :]  # [B, H, L, D]
    assert rel(back, v.transpose(1, 2)) < 0.04  # e4m3: 3 mantissa bits, ~2-3 % rms relative error


@pytest.mark.parametrize("pv_fp8, bound", [(True, 0.05), (False, 0.03)])
def test_reference_is_close_to_exact_attention(pv_fp8: bool, bound: float) -> None:
    # 1000 tokens: not a multiple of the 128-token key block; scale 2 gives peaked softmax rows.
    for scale in (1.0, 2.0):
        q, k, v = qkv(1, 1000, 2, 128, scale=scale)
        err = rel(a8.int8_attention_reference(q, k, v.bfloat16(), pv_fp8=pv_fp8), exact(q, k, v))
        assert err < bound, (scale, err)


def test_smoothing_keeps_the_error_small_when_k_has_a_channel_offset() -> None:
    q, k, v = qkv(1, 512, 2, 64, k_bias=8.0)
    assert rel(a8.int8_attention_reference(q, k, v), exact(q, k, v)) < 0.05

    def centred_logits(kq: torch.Tensor, ks: torch.Tensor, qq: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        s = torch.einsum("blhd,bmhd->bhlm", qq.double(), kq.double()) * qs[..., None] * ks[:, :, None, :]
        return s - s.mean(-1, keepdim=True)  # softmax sees logits only up to a per-row constant

    qq, qs = a8.quantize_qk(q)
    truth = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double())
    truth = truth - truth.mean(-1, keepdim=True)
    smoothed = rel(centred_logits(*a8.quantize_qk(k, smooth=True), qq, qs), truth)
    plain = rel(centred_logits(*a8.quantize_qk(k), qq, qs), truth)
    # without smoothing the int8 grid of every K row is spent on the shared offset: several times coarser
    assert smoothed < 0.02 and plain > 3 * smoothed, (smoothed, plain)


def test_entry_point_checks_its_inputs() -> None:
    q, k, v = qkv(1, 16, 2, 32)
    with pytest.raises(ValueError, match="equal"):
        a8.int8_attention(q, k[:, :8], v)
    with pytest.raises(ValueError, match="power-of-two"):
        a8.int8_attention(q[..., :24], k[..., :24], v[..., :24])
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            a8.int8_attention(q, k, v)


# ---- on a GPU: the Triton kernel ------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("pv_fp8", [True, False])
@pytest.mark.parametrize("shape", [(1, 1000, 2, 128), (2, 4099, 3, 128), (1, 300, 4, 64)])
def test_kernel_matches_reference_and_exact(shape: tuple[int, int, int, int], pv_fp8: bool) -> None:
    q, k, v = (t.bfloat16() for t in qkv(*shape, scale=1.5, k_bias=2.0, device="cuda", seed=shape[1]))
    out = a8.int8_attention(q, k, v, pv_fp8=pv_fp8)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = a8.int8_attention_reference(q.float(), k.float(), v, pv_fp8=pv_fp8)
    assert rel(out, ref) < 1e-2  # same arithmetic; only summation order and bf16 output rounding differ
    assert rel(out, exact(q, k, v)) < (0.05 if pv_fp8 else 0.03)


@gpu
def test_kernel_runs_inside_torch_compile_without_graph_breaks() -> None:
    q, k, v = (t.bfloat16() for t in qkv(1, 777, 2, 128, device="cuda"))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return a8.int8_attention(q * 1.0, k, v) + 0.0

    compiled = torch.compile(f, fullgraph=True)  # fullgraph: a graph break would raise
    out = compiled(q, k, v)
    # the fused quantisation may round a few values differently from the eager one: compare with the truth
    assert rel(out, exact(q, k, v)) < 0.05
    assert rel(out, a8.int8_attention(q, k, v)) < 1e-2


def test_enable_int8_attention_refuses_where_it_cannot_run() -> None:
    from engine import dit, fast

    if CUDA:
        pytest.skip("the kernel can run here")
    model = dit.build(dit.TINY, "meta")
    with pytest.raises(RuntimeError, match="int8 attention needs"):
        fast.enable_int8_attention(model)
    assert fast.enable_int8_attention(model, on=False) == dit.TINY.num_layers  # switching off always works


@gpu
def test_tiny_dit_with_int8_attention_compiled_is_close_to_eager() -> None:
    from engine import dit, fast
    from tests.conftest import dit_inputs

    torch.manual_seed(0)
    model = dit.WanInfiniteTalk(dit.TINY).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    kw = dit_inputs(dit.TINY, f=3, h=16, w=16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(**kw)
        assert fast.enable_int8_attention(model) == dit.TINY.num_layers
        fast.compile_blocks(model)
        out = model(**kw)
        assert torch.isfinite(out).all() and rel(out, ref) < 0.05
        torch._dynamo.reset()
        fast.enable_int8_attention(model, on=False)
        assert torch.equal(model(**kw), ref) or rel(model(**kw), ref) < 1e-2
