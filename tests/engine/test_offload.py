"""Tests for engine/offload.py: DiT blocks streamed from host memory (low-memory mode).

On CPU ``stream_blocks(dit, "cpu")`` runs the real packing, slot copies and hooks synchronously, so a streamed
tiny DiT must give bit-identical outputs to the plain one. The CUDA path (pinned memory, side stream, events) is
checked by the gpu-marked tests and by bench/bench_lowmem.py at full size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine import dit
from engine.offload import (
    ALIGN,
    BlockStreamer,
    choose_memory_mode,
    plan_arenas,
    shapes_nbytes,
    stream_blocks,
)
from tests.conftest import dit_inputs as _inputs
from tests.engine.forward import fwd

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory, streams)")


def _tiny(layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> dit.WanInfiniteTalk:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(dit.TINY, num_layers=layers)
    return dit.WanInfiniteTalk(cfg).eval().requires_grad_(False).to(dtype)


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# 1. numerics: streaming is an identity ---------------------------------------------------------------


@pytest.mark.parametrize(("layers", "prefetch"), [(5, 1), (5, 2), (2, 1), (1, 1)])
def test_streamed_forward_is_bit_identical(layers: int, prefetch: int) -> None:
    m = _tiny(layers)
    kw = _inputs(m.cfg)
    with torch.inference_mode():
        ref = fwd(m, **kw)
    s = stream_blocks(m, "cpu", prefetch=prefetch)
    with torch.inference_mode():
        out1 = fwd(m, **kw)
        out2 = fwd(m, **kw)
    out3 = fwd(m, **kw)  # outside inference mode too
    assert torch.equal(out1, ref) and torch.equal(out2, ref) and torch.equal(out3, ref)
    assert s.copies == 3 * layers  # every block copied once per forward, none twice


def test_streamed_forward_matches_in_bf16_with_two_speakers() -> None:
    m = _tiny(3, torch.bfloat16)
    kw = _inputs(m.cfg, dtype=torch.bfloat16)
    kw["audio"] = torch.cat([kw["audio"], kw["audio"].flip(2)], dim=1)
    kw["ref_target_masks"] = torch.zeros(1, 3, 4, 4)
    kw["ref_target_masks"][:, 0, :, :2] = 1
    kw["ref_target_masks"][:, 1, :, 2:] = 1
    with torch.inference_mode():
        ref = fwd(m, **kw)
        stream_blocks(m, "cpu")
        assert torch.equal(fwd(m, **kw), ref)


# 2. structure ----------------------------------------------------------------------------------------


def test_structure_keys_values_hooks_and_host_layout() -> None:
    m = _tiny(3)
    before = _state(m)
    s = stream_blocks(m, torch.device("cpu"))
    assert isinstance(s, BlockStreamer) and m._block_streamer is s
    after = m.state_dict()
    assert list(after) == list(before)  # same keys, same order: checkpoints still load strictly
    assert all(torch.equal(after[k], before[k]) for k in before)
    # hooks: one pre + one always-call post hook on the model and on every block
    assert len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1
    for b in m.blocks:
        assert len(b._forward_pre_hooks) == 1 and len(b._forward_hooks) == 1
        assert all(b._forward_hooks_always_called.values())
    # at rest every block tensor is a view into one of the host arenas, aligned, never pinned on a CPU stream
    arenas = [(a.data_ptr(), a.data_ptr() + a.numel()) for a in s._arenas]
    for i, b in enumerate(m.blocks):
        ptrs = sorted(p.data_ptr() for p in b.parameters())
        base = s._host_flat[i].data_ptr()
        assert all((p - base) % ALIGN == 0 for p in ptrs)
        assert all(any(lo <= p < hi for lo, hi in arenas) for p in ptrs)
        assert not any(p.is_pinned() for p in b.parameters())
    # block regions are disjoint and ordered inside the arenas
    regions = sorted((f.data_ptr(), f.data_ptr() + f.numel()) for f in s._host_flat)
    assert all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))
    assert s.slot_bytes == max(s.block_bytes) and s.device_bytes == 2 * s.slot_bytes
    with pytest.raises(ValueError, match="already streamed"):
        stream_blocks(m, "cpu")


def test_remove_detaches_hooks_and_keeps_weights() -> None:
    m = _tiny(2)
    kw = _inputs(m.cfg)
    ref = fwd(m, **kw)
    s = stream_blocks(m, "cpu")
    fwd(m, **kw)
    s.remove()
    assert m._block_streamer is None and not m._forward_pre_hooks and not m.blocks[0]._forward_pre_hooks
    assert torch.equal(fwd(m, **kw), ref)  # still runs: the host views are ordinary CPU tensors
    stream_blocks(m, "cpu")  # and may be streamed again
    assert torch.equal(fwd(m, **kw), ref)


# 3. behaviour around the loop ------------------------------------------------------------------------


def test_host_writes_between_forwards_are_seen() -> None:
    """An adapter swap writes into the host tensors between forwards (models_dir.patch_swapper does
    ``p.data.copy_``). With 2 blocks and 2 slots every block would still sit in its slot from the last forward;
    the next forward must re-read host memory, not reuse the stale slot."""
    m, plain = _tiny(2), _tiny(2)
    kw = _inputs(m.cfg)
    stream_blocks(m, "cpu")
    fwd(m, **kw)
    new = torch.randn_like(plain.blocks[0].audio_cross_attn.proj.weight)
    for model in (m, plain):
        dict(model.named_parameters())["blocks.0.audio_cross_attn.proj.weight"].data.copy_(new)
    assert torch.equal(fwd(m, **kw), fwd(plain, **kw))


def test_a_block_that_raises_leaves_the_model_usable() -> None:
    m = _tiny(3)
    kw = _inputs(m.cfg)
    ref = fwd(m, **kw)
    s = stream_blocks(m, "cpu")
    blk = m.blocks[1]
    real = blk.forward

    def failing(*args: object) -> torch.Tensor:
        real(*args)  # the block ran on its slot weights, then the forward fails (e.g. out of memory)
        assert all(p.data_ptr() != h.data_ptr() for p, h in zip(s._tensors[1], s._host[1]))
        raise torch.OutOfMemoryError("simulated")

    blk.forward = failing  # type: ignore[method-assign]
    with pytest.raises(torch.OutOfMemoryError):
        fwd(m, **kw)
    # the always-call post hooks put the block back on its host views and closed the forward
    assert s._active is None and not s._in_forward
    assert all(p.data_ptr() == h.data_ptr() for p, h in zip(s._tensors[1], s._host[1]))
    del blk.forward
    assert torch.equal(fwd(m, **kw), ref)


def test_layers_replaced_after_streaming_are_refused() -> None:
    """enable_fp8 after stream_blocks would leave the new fp8 weights unstreamed in host memory: fail loudly."""
    m = _tiny(2)
    kw = _inputs(m.cfg)
    stream_blocks(m, "cpu")
    old = m.blocks[1].ffn[2]
    m.blocks[1].ffn[2] = torch.nn.Linear(old.in_features, old.out_features)
    with pytest.raises(RuntimeError, match="changed after stream_blocks"):
        fwd(m, **kw)


def test_block_called_on_its_own_outside_a_forward() -> None:
    m = _tiny(2)
    blk = m.blocks[1]
    cfg = m.cfg
    x = torch.randn(1, 48, cfg.dim)
    e0 = torch.randn(1, 6, cfg.dim)
    cos, sin = dit.rope_3d_tables((3, 4, 4), cfg.head_dim)
    ctx = torch.randn(1, 257 + cfg.text_len, cfg.dim)
    audio = torch.randn(3, 32, cfg.audio_output_dim)
    args = (x, e0, cos, sin, ctx, 257, audio, 3, None)
    ref = blk(*args)
    s = stream_blocks(m, "cpu")
    assert torch.equal(blk(*args), ref)
    blk.norm3.weight.data.add_(1.0)  # a host write; the next direct call must see it
    changed = blk(*args)
    assert not torch.equal(changed, ref)
    assert s.copies == 2  # one copy per direct call, no prefetch of a following block outside a forward


def test_composes_with_compiled_blocks() -> None:
    """engine.fast.compile_blocks uses nn.Module.compile; the hooks are excluded from tracing and run eagerly."""
    m = _tiny(2)
    kw = _inputs(m.cfg)
    with torch.inference_mode():
        ref = fwd(m, **kw)
    s = stream_blocks(m, "cpu")
    for b in m.blocks:
        b.compile(backend="eager", dynamic=False)
    with torch.inference_mode():
        assert torch.equal(fwd(m, **kw), ref)
        assert torch.equal(fwd(m, **kw), ref)
    assert s.copies == 4


# 4. planning helpers ---------------------------------------------------------------------------------


def test_plan_arenas_for_the_released_dit() -> None:
    """The caching host allocator rounds each pinned request up to a power of two; the plan keeps the waste low."""
    with torch.device("meta"):
        block = dit.Block(dit.RELEASED).to(torch.bfloat16)
    size = sum((p.numel() * p.element_size() + ALIGN - 1) // ALIGN * ALIGN for p in block.parameters())
    assert 0.85 * 2**30 < size < 0.9 * 2**30  # 0.88 GiB per block in bf16
    groups = plan_arenas([size] * 40)
    assert [j for g in groups for j in g] == list(range(40))  # consecutive, each block once
    rounded = sum(1 << (len(g) * size - 1).bit_length() for g in groups)
    assert rounded <= 36 * 2**30  # one buffer per block would lock 40 GiB
    assert rounded < 1.05 * 40 * size
    assert 40 * (1 << (size - 1).bit_length()) == 40 * 2**30  # what one buffer per block would cost


def test_plan_arenas_edge_cases() -> None:
    assert plan_arenas([]) == []
    assert plan_arenas([100]) == [[0]]
    # a block above the cap gets its own power of two; a block that does not fit beside it starts the next arena
    assert plan_arenas([3 * 2**30, 2**30 + 1], max_bytes=2**30) == [[0], [1]]
    assert plan_arenas([3 * 2**30, 10], max_bytes=2**30) == [[0, 1]]
    assert plan_arenas([64] * 4, max_bytes=256) == [[0], [1], [2], [3]]  # exact fits: ties go to the smaller
    assert plan_arenas([40] * 6, max_bytes=256) == [[0, 1, 2], [3, 4, 5]]  # 3 x 40 fill 128 best (94 %)


def test_choose_memory_mode() -> None:
    gib = 2**30
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert choose_memory_mode("resident", cuda, 100 * gib, free_bytes=gib) == "resident"
    assert choose_memory_mode("low", cpu, 0) == "low"
    assert choose_memory_mode("auto", cpu, 100 * gib) == "resident"
    assert choose_memory_mode("auto", cuda, 50 * gib, free_bytes=79 * gib) == "resident"  # H100 80 GB
    assert choose_memory_mode("auto", cuda, 50 * gib, free_bytes=23 * gib) == "low"  # 24 GB card
    assert choose_memory_mode("auto", cuda, 50 * gib, free_bytes=55 * gib) == "low"  # fits, but no headroom
    with pytest.raises(ValueError):
        choose_memory_mode("tiny", cpu, 0)
    assert shapes_nbytes({"a": (2, 3), "b": ()}, torch.bfloat16) == 14


# 5. the loader's low mode ----------------------------------------------------------------------------


def test_load_models_low_mode_streams_and_swaps_adapters(tiny_models: Path) -> None:
    from engine.api import EngineOptions
    from engine.models_dir import load_models

    def load(mode: str):  # type: ignore[no-untyped-def]
        return load_models(EngineOptions(models_dir=tiny_models, device="cpu", preset="lightx2v", memory_mode=mode))

    low, res = load("low"), load("resident")
    assert isinstance(low.dit._block_streamer, BlockStreamer) and getattr(res.dit, "_block_streamer", None) is None
    assert low.text_device == torch.device("cpu")
    assert low.dit.blocks_streamed and not res.dit.blocks_streamed
    assert list(low.dit.state_dict()) == list(res.dit.state_dict())
    kw = _inputs(low.dit.cfg)
    kw["audio"] = torch.cat([kw["audio"], kw["audio"]], dim=1)
    kw["ref_target_masks"] = torch.ones(1, 3, 4, 4)
    one = dict(kw, audio=kw["audio"][:, :1], ref_target_masks=None)
    with torch.inference_mode():
        assert torch.equal(fwd(low.dit, **one), fwd(res.dit, **one))
        low.swap_patch(2)
        res.swap_patch(2)  # writes the multi adapter into the host tensors of the streamed blocks
        assert torch.equal(fwd(low.dit, **kw), fwd(res.dit, **kw))
        assert torch.equal(fwd(low.dit, **one), fwd(res.dit, **one))


def test_load_dit_low_mode_fp8_streams_fp8_blocks_identical_to_resident_fp8(tiny_models: Path) -> None:
    """fp8 in low-memory mode: blocks converted before packing (half the pinned bytes), same numbers as the
    resident fp8 model (on the CPU, Fp8Linear runs its float32 reference of the fp8 GEMM)."""
    from engine import fast
    from engine.models_dir import iter_roles, load_dit, locate
    from engine.weights import read_header

    infos = {role: read_header(path) for role, path in iter_roles(locate(tiny_models, {}))}
    args = dict(device=torch.device("cpu"), dtype=torch.float32)
    low, _ = load_dit(infos["dit"], infos["patch_single"], memory_mode="low", fp8_targets=fast.FP8_TARGETS, **args)
    plain, _ = load_dit(infos["dit"], infos["patch_single"], memory_mode="resident", **args)
    bf16_bytes = sum(p.numel() * p.element_size() for p in plain.blocks.parameters())
    res, _ = load_dit(infos["dit"], infos["patch_single"], memory_mode="resident", fp8_targets=fast.FP8_TARGETS,
                      **args)
    assert fast.enable_fp8(res, fast_accum=True) == 0  # every target already converted while loading
    assert isinstance(low._block_streamer, BlockStreamer)
    assert all(isinstance(m, fast.Fp8Linear) for b in low.blocks for m in (b.ffn[0], b.self_attn.q))
    assert low._block_streamer.host_bytes < 0.5 * bf16_bytes  # fp32 test weights: fp8 is a quarter of them
    kw = _inputs(low.cfg)
    with torch.inference_mode():
        assert torch.equal(fwd(low, **kw), fwd(res, **kw))


# 6. CUDA ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.gpu
def test_cuda_streaming_is_pinned_and_identical() -> None:
    m = _tiny(4, torch.bfloat16).cuda()
    kw = _inputs(m.cfg, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = fwd(m, **kw)
        s = stream_blocks(m, "cuda")
        assert s.pinned and all(p.is_pinned() for b in m.blocks for p in b.parameters())
        assert all(p.is_cuda for n, p in m.named_parameters() if not n.startswith("blocks."))
        out = fwd(m, **kw)
        torch.cuda.synchronize()
    assert torch.equal(out, ref) and s.copies == 4


@needs_cuda
@pytest.mark.gpu
def test_cuda_streaming_from_host_blocks_keeps_gpu_memory_low() -> None:
    m = _tiny(6, torch.bfloat16)  # built on the CPU, as the low-memory loader leaves it
    kw = _inputs(m.cfg, device="cuda", dtype=torch.bfloat16)
    block_bytes = sum(p.numel() * p.element_size() for p in m.blocks.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    s = stream_blocks(m, "cuda")
    with torch.inference_mode():
        fwd(m, **kw)
    torch.cuda.synchronize()
    weights_on_gpu = torch.cuda.memory_allocated() - before
    assert weights_on_gpu < block_bytes / 2  # 2 slots of 6 blocks plus the small non-block part
    assert s.device_bytes == 2 * s.slot_bytes


@needs_cuda
@pytest.mark.gpu
def test_cuda_load_models_low_mode_fp8(tiny_models: Path) -> None:
    from engine import fast
    from engine.api import EngineOptions
    from engine.models_dir import load_models

    if not fast.supports_fp8("cuda"):
        pytest.skip("needs fp8 GEMMs (compute capability 8.9+)")
    opts = dict(models_dir=tiny_models, device="cuda", preset="lightx2v", fp8=True)
    low = load_models(EngineOptions(memory_mode="low", **opts))
    res = load_models(EngineOptions(memory_mode="resident", **opts))
    assert isinstance(low.dit.blocks[0].ffn[0], fast.Fp8Linear)
    # Both adapters are in the folder, so the audio layers stay bf16 (the swap writes bf16 weights into them), in
    # both memory modes.
    assert res.swap_patch is not None and not isinstance(low.dit.blocks[0].audio_cross_attn.q_linear, fast.Fp8Linear)
    assert isinstance(res.dit.blocks[0].ffn[0], fast.Fp8Linear)
    assert not isinstance(res.dit.blocks[0].audio_cross_attn.q_linear, fast.Fp8Linear)
    kw = _inputs(low.dit.cfg, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        a, b = fwd(low.dit, **kw), fwd(res.dit, **kw)
    # same fp8 weights and kernels; only the weights' addresses differ (slot views), which can change the GEMM
    # kernel cuBLASLt picks, so allow last-bit differences
    assert torch.equal(a, b) or ((a - b).norm() / b.norm()).item() < 1e-3
