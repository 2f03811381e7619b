"""Tests for engine/fast.py: fp8 quantisation and Fp8Linear, enable_fp8 on the tiny DiT, compile_blocks,
preferred_attention.

CPU by default: Fp8Linear's CPU path is :func:`scaled_mm_reference` (the kernel's arithmetic in fp32), and it is
itself checked against ``torch._scaled_mm`` wherever that op runs (the CPU kernel of recent torch; the CUDA kernel
in the gpu-marked tests). compile_blocks is traced with the ``aot_eager`` backend on CPU (Inductor's C++ code
generation takes about a minute on 2 cores); the Inductor + fp8 kernel run is gpu-marked.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from engine import dit, fast
from engine.attention import attention
from engine.fast import (
    FP8_DTYPE,
    FP8_MAX,
    FP8_TARGETS,
    Fp8Linear,
    compile_blocks,
    dequantize,
    enable_fp8,
    preferred_attention,
    quantize_rowwise,
    quantize_weight,
    scaled_mm_reference,
    supports_fp8,
)
from tests.conftest import dit_inputs
from tests.engine.forward import fwd

CUDA_FP8 = torch.cuda.is_available() and supports_fp8("cuda")
needs_fp8_gpu = pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU of compute capability 8.9+ (fp8 GEMMs)")


_inputs = functools.partial(dit_inputs, dit.TINY)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tiny(dtype: torch.dtype = torch.float32, device: str = "cpu") -> dit.WanInfiniteTalk:
    torch.manual_seed(0)
    return dit.WanInfiniteTalk(dit.TINY).eval().requires_grad_(False).to(device, dtype)


# 1. quantisation helpers --------------------------------------------------------------------------


def test_quantize_rowwise_scale_range_and_roundtrip() -> None:
    g = torch.Generator().manual_seed(0)
    # Rows spanning 12 orders of magnitude: a per-tensor scale would flush the small rows to zero.
    x = torch.randn(6, 256, generator=g) * torch.logspace(-6, 6, 6)[:, None]
    q, scale = quantize_rowwise(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (6, 1)
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / FP8_MAX)
    assert torch.equal(q.float().abs().amax(-1), torch.full((6,), FP8_MAX))  # each row's abs-max -> 448
    back = dequantize(q, scale)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normal values; below 2^-6 (subnormal) the absolute
    # step is 2^-9, i.e. 2^-9 * scale after dequantisation.
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-9)
    assert ((back - x).abs() <= bound * 1.0001).all()
    assert _rel_l2(back, x) < 0.04


def test_quantize_rowwise_zero_rows_and_bf16_input() -> None:
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    x[1] = torch.linspace(-5, 5, 64)
    q, scale = quantize_rowwise(x)
    assert torch.isfinite(q.float()).all() and torch.isfinite(scale).all()
    assert torch.equal(q[0].float(), torch.zeros(64)) and torch.equal(q[2].float(), torch.zeros(64))
    assert q[1].float().abs().max() == FP8_MAX


def test_quantize_weight_is_per_output_channel() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g) * torch.linspace(0.01, 10, 32)[:, None]
    q, scale = quantize_weight(w)
    assert q.shape == (32, 48) and scale.shape == (32,)
    torch.testing.assert_close(scale, w.abs().amax(1) / FP8_MAX)
    assert _rel_l2(dequantize(q, scale[:, None]), w) < 0.04
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(2, 3, 4))


def test_reference_matches_torch_scaled_mm_where_it_runs() -> None:
    """The fp32 emulation is what the kernel computes (products summed, then per-row x per-column scales, bias)."""
    g = torch.Generator().manual_seed(0)
    x_q, sx = quantize_rowwise(torch.randn(40, 64, generator=g) * torch.linspace(0.1, 3, 40)[:, None])
    w_q, sw = quantize_weight(torch.randn(48, 64, generator=g) * torch.linspace(0.1, 3, 48)[:, None])
    bias = torch.randn(48, generator=g).to(torch.bfloat16)
    ref = scaled_mm_reference(x_q, sx, w_q, sw, bias, torch.float32)
    # Hand-written: dequantise both operands, fp64 matmul.
    hand = (x_q.double() * sx.double()) @ (w_q.double() * sw.double()[:, None]).t() + bias.double()
    torch.testing.assert_close(ref.double(), hand, rtol=1e-5, atol=1e-5)
    try:
        got = torch._scaled_mm(x_q, w_q.t(), scale_a=sx, scale_b=sw[None], bias=bias, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:  # older torch: no CPU kernel
        pytest.skip(f"torch._scaled_mm does not run on CPU here: {exc}")
    # One bf16 rounding apart (2^-8 relative).
    torch.testing.assert_close(got.float(), ref, rtol=2**-7, atol=1e-2)


# 2. Fp8Linear ------------------------------------------------------------------------------------------


def test_fp8_linear_close_to_linear_and_equals_its_parts() -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(128, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 128, generator=g) / math.sqrt(128) * torch.logspace(-2, 2, 96)[:, None])
    x = torch.randn(2, 7, 128, generator=g) * torch.logspace(-3, 3, 7)[None, :, None]
    ref = lin(x)
    f8 = Fp8Linear.from_linear(lin)
    out = f8(x)
    assert out.shape == (2, 7, 96) and out.dtype == x.dtype
    # Exactly the reference arithmetic on the quantised parts.
    x_q, sx = quantize_rowwise(x.reshape(-1, 128))
    torch.testing.assert_close(out.reshape(-1, 96), scaled_mm_reference(x_q, sx, f8.weight, f8.weight_scale,
                                                                        lin.bias, torch.float32))
    # Per-row / per-channel scales keep the error at fp8 rounding level for every row, even with rows and
    # channels 10^6 apart in magnitude (a per-tensor activation scale would flush the small rows).
    for row_out, row_ref in zip(out.reshape(-1, 96), ref.reshape(-1, 96)):
        assert _rel_l2(row_out, row_ref) < 0.06
    assert f8.bias is lin.bias
    assert torch.allclose(f8.dequantized_weight(), lin.weight, rtol=2**-4, atol=0)


def test_fp8_linear_per_tensor_scale_and_validation() -> None:
    w = torch.randn(16, 32)
    scale = w.abs().max() / FP8_MAX
    w_q = (w / scale).to(FP8_DTYPE)
    layer = Fp8Linear(w_q, scale, None)  # a ComfyUI-style 0-d scale is broadcast per channel
    assert layer.weight_scale.shape == (16,) and torch.all(layer.weight_scale == scale)
    x = torch.randn(3, 32)
    assert _rel_l2(layer(x), x @ w.t()) < 0.06
    with pytest.raises(ValueError, match="float8"):
        Fp8Linear(w, scale, None)
    with pytest.raises(ValueError, match="weight_scale"):
        Fp8Linear(w_q, torch.ones(3), None)


# 3. enable_fp8 on the tiny DiT ----------------------------------------------------------------------


def test_enable_fp8_keeps_names_and_keys_and_stays_close() -> None:
    model = _tiny()
    kw = _inputs()
    with torch.no_grad():
        ref = fwd(model, **kw)
    before = model.state_dict()
    n = enable_fp8(model)
    assert n == dit.TINY.num_layers * len(FP8_TARGETS) == 30
    after = model.state_dict()
    layers = [f"blocks.{i}.{t}" for i in range(dit.TINY.num_layers) for t in FP8_TARGETS]
    # Every original key is still there; the only new keys are the converted layers' scales.
    assert set(before) <= set(after)
    assert set(after) - set(before) == {f"{name}.weight_scale" for name in layers}
    for name in layers:
        layer = model.get_submodule(name)
        assert isinstance(layer, Fp8Linear)
        w = after[f"{name}.weight"]
        assert w.dtype == FP8_DTYPE and w.shape == before[f"{name}.weight"].shape
        assert torch.equal(after[f"{name}.bias"], before[f"{name}.bias"])
        back = dequantize(w, after[f"{name}.weight_scale"][:, None])
        assert _rel_l2(back, before[f"{name}.weight"]) < 0.04
    # Attribute access by the released names still works (nn.Sequential's "0"/"2" included).
    assert isinstance(model.blocks[0].ffn[0], Fp8Linear) and isinstance(model.blocks[1].self_attn.q, Fp8Linear)
    # Layers outside the blocks are untouched.
    for key in ("head.head.weight", "audio_proj.proj1.weight", "text_embedding.0.weight", "img_emb.proj.1.weight"):
        assert after[key].dtype == torch.float32 and torch.equal(after[key], before[key])
    with torch.no_grad():
        out = fwd(model, **kw)
    # Numerically close to the fp32 model (fp8 rounding of every GEMM input; measured ~2e-2 on this model).
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = _rel_l2(out, ref)
    cos = F.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0).item()
    assert 1e-4 < rel < 5e-2, rel  # > 1e-4: the quantisation really happens
    assert cos > 0.998
    assert enable_fp8(model) == 0  # idempotent


def test_enable_fp8_halves_bf16_weight_memory() -> None:
    model = _tiny(torch.bfloat16)
    layers = [f"blocks.{i}.{t}" for i in range(dit.TINY.num_layers) for t in FP8_TARGETS]
    weight_bytes = sum(model.get_submodule(n).weight.nbytes for n in layers)
    total_before = sum(p.nbytes for p in model.parameters())
    enable_fp8(model)
    scale_bytes = sum(model.get_submodule(n).weight_scale.nbytes for n in layers)
    total_after = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert total_before - total_after == weight_bytes // 2 - scale_bytes


def test_enable_fp8_uses_supplied_file_weights() -> None:
    model = _tiny()
    w = model.blocks[1].ffn[2].weight.detach()
    scale = w.abs().max() / FP8_MAX  # per-tensor, as in a ComfyUI scaled-fp8 file
    w_q = (w / scale).to(FP8_DTYPE)
    enable_fp8(model, weights_fp8={"blocks.1.ffn.2": (w_q, scale)})
    layer = model.blocks[1].ffn[2]
    assert torch.equal(layer.weight.view(torch.uint8), w_q.view(torch.uint8))
    assert torch.all(layer.weight_scale == scale)
    # The per-channel path was used elsewhere: its scales differ row to row.
    assert model.blocks[1].ffn[0].weight_scale.unique().numel() > 1

    with pytest.raises(ValueError, match="names no converted layer"):
        enable_fp8(_tiny(), weights_fp8={"blocks.0.ffn.1": (w_q, scale)})
    with pytest.raises(ValueError, match="expected"):
        enable_fp8(_tiny(), weights_fp8={"blocks.0.self_attn.q": (w_q, scale)})  # wrong shape
    with pytest.raises(TypeError, match="not an nn.Linear"):
        enable_fp8(_tiny(), targets=("norm1",))


def test_enable_fp8_subset_of_targets() -> None:
    model = _tiny()
    assert enable_fp8(model, targets=("ffn.0", "ffn.2")) == 2 * dit.TINY.num_layers
    assert isinstance(model.blocks[0].ffn[2], Fp8Linear)
    assert type(model.blocks[0].self_attn.q) is nn.Linear
    # The large-M set: every layer fed by the video tokens, none fed by the text / image / audio context.
    model = _tiny()
    assert enable_fp8(model, targets=fast.FP8_LARGE_M_TARGETS) == 10 * dit.TINY.num_layers
    blk = model.blocks[1]
    assert all(isinstance(m, Fp8Linear) for m in (blk.self_attn.o, blk.cross_attn.q, blk.cross_attn.o,
                                                  blk.audio_cross_attn.q_linear, blk.audio_cross_attn.proj))
    assert all(type(m) is nn.Linear for m in (blk.cross_attn.k, blk.cross_attn.v, blk.cross_attn.k_img,
                                              blk.cross_attn.v_img, blk.audio_cross_attn.kv_linear))


# 4. compile_blocks ------------------------------------------------------------------------------------


def test_compile_blocks_one_graph_for_all_blocks_no_recompiles() -> None:
    """Traced with aot_eager (no code generation): Dynamo's guards and graph count are what matter here."""
    torch._dynamo.reset()
    counters.clear()
    model = _tiny()
    enable_fp8(model)
    with torch.no_grad():
        eager = fwd(model, **_inputs())
        compile_blocks(model, backend="aot_eager")
        keys_before = set(model.state_dict())
        out = fwd(model, **_inputs())
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        # Both blocks ran through one compiled frame: the second block reused the first one's graph.
        assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            fwd(model, **_inputs(seed=2))  # another step / chunk: new values, same shapes
        fwd(model, **_inputs(h=6))  # a new bucket compiles once ...
        assert counters["frames"]["ok"] == 2
        with torch._dynamo.config.patch(error_on_recompile=True):  # ... and switching back and forth is free
            fwd(model, **_inputs(seed=3))
            fwd(model, **_inputs(h=6, seed=4))
    assert set(model.state_dict()) == keys_before  # compiling in place keeps the keys
    torch._dynamo.reset()


def test_compile_blocks_compiles_every_bucket_not_just_eight() -> None:
    """Dynamo's default recompile_limit (8 graphs per code object) would silently run the 9th bucket eagerly; the
    two bucket families have 36 sizes, so compile_blocks raises the limit (aot_eager on CPU, 10 sizes)."""
    torch._dynamo.reset()
    counters.clear()
    model = _tiny()
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=8):
        compile_blocks(model, backend="aot_eager")
        assert torch._dynamo.config.recompile_limit >= 36
        for h in range(2, 22, 2):  # ten token counts (the patch is 2x2)
            fwd(model, **_inputs(h=h))
        assert counters["frames"]["ok"] == 10, dict(counters["frames"])
    torch._dynamo.reset()


# 5. attention and device checks ---------------------------------------------------------------------------


def test_preferred_attention_context() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=g) for _ in range(3))
    ref = attention(q, k, v)
    with preferred_attention():
        torch.testing.assert_close(attention(q, k, v), ref)  # CPU: falls through to an allowed CPU kernel
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_supports_fp8() -> None:
    assert supports_fp8("cpu") is False
    assert supports_fp8(torch.device("cpu")) is False
    if torch.cuda.is_available():
        assert supports_fp8("cuda") == (torch.cuda.get_device_capability() >= (8, 9))
    else:
        assert supports_fp8("cuda") is False


@pytest.mark.gpu
@needs_fp8_gpu
def test_cuda_kernel_matches_reference() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = nn.Linear(512, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 100, 512, device="cuda", generator=g).to(torch.bfloat16)
    f8 = Fp8Linear.from_linear(lin)
    out = f8(x)  # torch._scaled_mm
    x_q, sx = quantize_rowwise(x.reshape(-1, 512))
    ref = scaled_mm_reference(x_q, sx, f8.weight, f8.weight_scale, f8.bias, torch.float32)
    torch.testing.assert_close(out.reshape(-1, 384).float(), ref, rtol=2**-7, atol=2e-2)
    assert _rel_l2(out.float(), lin(x).float()) < 0.05


@pytest.mark.gpu
@needs_fp8_gpu
def test_cuda_compiled_fp8_tiny_dit_close_to_bf16_eager() -> None:
    torch._dynamo.reset()
    model = _tiny(torch.bfloat16, "cuda")
    kw = _inputs(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), preferred_attention():
        ref = fwd(model, **kw)
        enable_fp8(model)
        compile_blocks(model)
        out = fwd(model, **kw)
        with torch._dynamo.config.patch(error_on_recompile=True):
            fwd(model, **_inputs(seed=5, device="cuda", dtype=torch.bfloat16))
    assert _rel_l2(out, ref) < 5e-2
    torch._dynamo.reset()


def test_fp8_targets_keep_the_swapped_audio_layers_in_bf16() -> None:
    assert fast.fp8_targets(adapter_swap=False) == fast.FP8_TARGETS
    kept = set(fast.FP8_TARGETS) - set(fast.fp8_targets(adapter_swap=True))
    assert kept == {"audio_cross_attn.q_linear", "audio_cross_attn.kv_linear", "audio_cross_attn.proj"}


# 6. FlashAttention-3 for the blocks' self-attention -------------------------------------------------------------


def test_use_flash3_refuses_where_fa3_cannot_run_and_says_what_to_do() -> None:
    from engine.attention import flash3_available

    model = _tiny()
    if flash3_available():
        pytest.skip("FA3 is installed on this Hopper GPU")
    with pytest.raises(RuntimeError, match="Hopper GPU .*flash_attn_interface.*engine.attention: auto or sdpa"):
        fast.use_flash3(model)
    assert not fast.uses_flash3(model)


def test_use_flash3_routes_every_self_attention_through_fa3(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring, on the CPU: a stand-in for FA3's Python module (the library boundary) computes attention with
    SDPA in FA3's [B, L, H, D] layout and returns (out, lse) like some FA3 versions; the DiT's output must equal the
    SDPA path's, every block must call it, and use_flash3(on=False) must restore SDPA."""
    import sys
    import types

    from engine import attention as attention_mod

    calls: list[tuple[int, ...]] = []

    def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(q.shape))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2)).transpose(1, 2)
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        types.SimpleNamespace(flash_attn_func=flash_attn_func))  # type: ignore[arg-type]
    monkeypatch.setattr(attention_mod, "flash3_available", lambda device=None: True)
    model = _tiny()
    kw = _inputs()
    with torch.no_grad():
        ref = fwd(model, **kw)
        assert fast.use_flash3(model) == len(model.blocks) and fast.uses_flash3(model)
        got = fwd(model, **kw)
        assert len(calls) == len(model.blocks)
        torch.testing.assert_close(got, ref)
        fast.use_flash3(model, on=False)
        assert not fast.uses_flash3(model)
        torch.testing.assert_close(fwd(model, **kw), ref)
    assert len(calls) == len(model.blocks)


def _fa3_gpu() -> bool:
    from engine.attention import flash3_available

    return torch.cuda.is_available() and flash3_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _fa3_gpu(), reason="needs FlashAttention-3 on a Hopper GPU")
def test_cuda_flash3_matches_sdpa_per_call_and_in_the_compiled_tiny_dit() -> None:
    from engine.attention import flash3_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 777, 4, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    exact = attention(q.float(), k.float(), v.float())
    # bf16 inputs: both kernels land at bf16 rounding of the exact answer
    assert _rel_l2(flash3_attention(q, k, v).float(), exact) < 1e-2
    assert _rel_l2(attention(q, k, v).float(), exact) < 1e-2
    torch._dynamo.reset()
    model = _tiny(torch.bfloat16, "cuda")
    kw = _inputs(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), preferred_attention():
        ref = fwd(model, **kw)
        fast.use_flash3(model)
        eager = fwd(model, **kw)
        compile_blocks(model)
        out = fwd(model, **kw)
    assert _rel_l2(eager, ref) < 1e-2 and _rel_l2(out, ref) < 2e-2
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("setting", "fast_path", "available", "dtype", "expected"),
    [
        ("auto", True, True, torch.bfloat16, True),
        ("auto", True, True, torch.float16, True),
        ("auto", True, False, torch.bfloat16, False),  # not installed / not Hopper: SDPA, no error
        ("auto", True, True, torch.float32, False),  # FA3 has no fp32 kernels
        ("auto", False, True, torch.bfloat16, False),  # CPU or engine.fast: false
        ("sdpa", True, True, torch.bfloat16, False),
        ("fa3", True, True, torch.bfloat16, True),
        ("fa3", False, True, torch.bfloat16, "needs the fast path on a CUDA GPU"),
        ("fa3", True, True, torch.float32, "needs engine.dtype bfloat16 or float16"),
        ("fa3", True, False, torch.bfloat16, "needs a Hopper GPU .*pip install"),
        ("flash", True, True, torch.bfloat16, "must be auto, sdpa or fa3"),
    ],
)
def test_wants_flash3_decides_or_says_why_not(setting: str, fast_path: bool, available: bool, dtype: torch.dtype,
                                              expected: bool | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            fast.wants_flash3(setting, fast=fast_path, available=available, dtype=dtype)
    else:
        assert fast.wants_flash3(setting, fast=fast_path, available=available, dtype=dtype) is expected
