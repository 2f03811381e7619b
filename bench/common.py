"""Shared by the benchmark scripts: the full-size DiT, with random weights built straight on the device, or read
from a real ComfyUI models folder through the engine's own loader."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine import dit


def random_dit(cfg: dit.DiTConfig, device: str, dtype: torch.dtype) -> dit.WanInfiniteTalk:
    """Built on meta, materialised once on ``device`` in ``dtype`` (no fp32 copy, no host copy), then filled:
    matrices ~ N(0, 1/fan_in), norm weights 1, other vectors N(0, 0.02). Weight values do not change kernel speed."""
    model = dit.build(cfg, "meta").to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5, generator=gen)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def folder_dit(models_dir: Path, device: str, dtype: torch.dtype, *, speakers: int = 1) -> dit.WanInfiniteTalk:
    """The DiT + InfiniteTalk patch (single- or multi-speaker) of a ComfyUI models folder, loaded the way the
    engine loads it (engine.models_dir.load_dit: fp8-scaled files dequantised, strict key check), no LoRA.

    Raises FileNotFoundError naming the role when the folder lacks the DiT or the patch."""
    from engine import weights as wt
    from engine.models_dir import load_dit, locate

    found = locate(models_dir)
    patch_role = "patch_single" if speakers == 1 else "patch_multi"
    for role in ("dit", patch_role):
        if found[role] is None:
            raise FileNotFoundError(f"{models_dir}: no {role} file (run 'infinitetalkd doctor --models-dir "
                                    f"{models_dir}' to see what is expected where)")
    base, patch = wt.read_header(found["dit"]), wt.read_header(found[patch_role])  # type: ignore[arg-type]
    model, _ = load_dit(base, patch, device=torch.device(device), dtype=dtype)
    assert isinstance(model, dit.WanInfiniteTalk)
    return model.eval().requires_grad_(False)


def bench_dit(models_dir: Path | None, device: str, dtype: torch.dtype) -> dit.WanInfiniteTalk:
    """Real weights from ``models_dir`` when given, else the released shapes with random weights."""
    if models_dir is not None:
        return folder_dit(models_dir, device, dtype)
    return random_dit(dit.RELEASED, device, dtype)


def round_to_file_fp8(model: dit.WanInfiniteTalk, targets: tuple[str, ...]) -> dict[str, tuple[torch.Tensor,
                                                                                                torch.Tensor]]:
    """Put the ``targets`` Linears of every block on a per-tensor e4m3 grid, as a ComfyUI fp8-scaled file stores
    them (engine.weights.write_scaled_fp8: scale = absmax / 448), in place: afterwards the 16-bit weights hold
    the file's dequantised values, like a model loaded from such a file. Returns the stored payload per layer
    (``"blocks.3.ffn.0"`` -> (e4m3 weight, scale [])) for engine.fast.enable_fp8(weights_fp8=...), so random
    weights can show the fp8 path the way it runs on a user's file (bench_speedup.py ``--fp8-grid``)."""
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for rel in targets:
                layer = block.get_submodule(rel)
                w = layer.weight.float()
                absmax = w.abs().max()
                scale = torch.where(absmax > 0, absmax / torch.finfo(torch.float8_e4m3fn).max, torch.ones_like(absmax))
                q = (w / scale).to(torch.float8_e4m3fn)
                layer.weight.copy_(q.float() * scale)
                stored[f"blocks.{i}.{rel}"] = (q, scale.float())
    return stored


def folder_fp8_payload(models_dir: Path, num_blocks: int, targets: tuple[str, ...],
                       device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The e4m3 payload a real fp8-scaled DiT file stores for the ``targets`` of every block (empty for a bf16
    file), keyed for engine.fast.enable_fp8(weights_fp8=...)."""
    from engine import weights as wt
    from engine.models_dir import locate

    path = locate(models_dir)["dit"]
    if path is None:
        raise FileNotFoundError(f"{models_dir}: no dit file")
    keys = [f"blocks.{i}.{rel}.weight" for i in range(num_blocks) for rel in targets]
    return {k[: -len(".weight")]: v for k, v in wt.iter_fp8_weights(wt.read_header(path), keys, device=device)}


def kernel_breakdown(fn: Callable[[], object], top: int = 25) -> dict[str, object]:
    """Run ``fn`` once under torch.profiler (CUDA activity) and sum the device time of its kernels by kind:
    attention (SDPA / flash / fmha / cuDNN graph kernels), GEMM (cuBLAS / CUTLASS / scaled_mm), Triton (the fused
    elementwise kernels Inductor writes), other. Returns the sums in ms and the ``top`` kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds = {"attention": 0.0, "gemm": 0.0, "triton": 0.0, "other": 0.0}
    rows = []
    for evt in prof.key_averages():
        us = float(getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0))
        if us <= 0:
            continue
        name = evt.key.lower()
        if name.startswith("triton"):  # before attention: Inductor names fused kernels after the ops they feed
            kind = "triton"
        elif any(s in name for s in ("fmha", "flash", "attention", "attn", "sdpa")):
            kind = "attention"
        elif any(s in name for s in ("gemm", "cutlass", "xmma", "nvjet", "scaled_mm", "matmul", "gmma")):
            kind = "gemm"
        else:
            kind = "other"
        kinds[kind] += us / 1e3
        rows.append((us / 1e3, evt.count, kind, evt.key[:120]))
    rows.sort(reverse=True)
    return {"ms_by_kind": {k: round(v, 1) for k, v in kinds.items()},
            "top": [{"ms": round(ms, 2), "calls": n, "kind": k, "kernel": name} for ms, n, k, name in rows[:top]]}


def attention_cases(length: int, heads: int = 40, head_dim: int = 128,
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Self-attention inputs [1, length, heads, head_dim] on the GPU for the kernel probes: (q, k) in fp32 for three
    distributions — "unit" (unit variance: near-uniform softmax), "peaky" (larger logits plus a per-channel K
    offset), "outliers" (4 K channels 12x larger, the mirror channels of Q, plus a larger offset) — and one bf16 V."""
    g = torch.Generator(device="cuda").manual_seed(length)
    shape = (1, length, heads, head_dim)
    q = torch.randn(*shape, device="cuda", generator=g)
    k = torch.randn(*shape, device="cuda", generator=g)
    v = torch.randn(*shape, device="cuda", generator=g).bfloat16()
    chan_bias = torch.randn(1, 1, heads, head_dim, device="cuda", generator=g)
    outl = torch.ones(1, 1, heads, head_dim, device="cuda")
    outl[..., :4] = 12.0
    return {"unit": (q, k), "peaky": (q * 1.8, k * 1.8 + 2 * chan_bias),
            "outliers": (q * outl.flip(-1) * 0.7, k * outl * 0.7 + 3 * chan_bias)}, v


def compare_forwards(models: Path | None, variants: list[tuple[str, bool, Callable[..., torch.Tensor]]],
                     baselines: dict[bool, str], *, profile: bool, top: int = 8) -> Iterator[dict[str, object]]:
    """The full-size DiT (random weights unless ``models``) compiled at 448x896x81 once per variant (name, fp8 GEMMs
    with fast accumulation?, self-attention kernel), in order; the bf16 -> fp8 conversion happens at the first fp8
    variant. Yields one row per variant: s / forward (median of 3), compile s, peak GiB, closeness to the variant
    named in ``baselines[fp8 GEMMs]`` when that ran before (same GEMMs, other attention), and with ``profile`` the
    kernel time by kind. A variant that raises yields its traceback instead."""
    import traceback

    from bench.bench_fast import closeness, make_inputs, timed, wall_once
    from engine import fast

    model = bench_dit(models, "cuda", torch.bfloat16)
    kw = make_inputs(model.cfg, 448, 896, 81, "cuda", torch.bfloat16, seed=0)
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), fast.preferred_attention():
        for name, gemm_fp8, kernel in variants:
            row: dict[str, object] = {"forward": name}
            try:
                if gemm_fp8 and not any(isinstance(m, fast.Fp8Linear) for m in model.modules()):
                    fast.enable_fp8(model, fast_accum=True)
                for block in model.blocks:
                    block.self_attn.kernel = kernel
                torch._dynamo.reset()
                fast.compile_blocks(model)
                torch.cuda.reset_peak_memory_stats()
                first, _ = wall_once(lambda: model(**kw))
                sec, out = timed(lambda: model(**kw), 3)
                outs[name] = out.float().clone()
                row.update(s_per_forward=round(sec, 3), compile_s=round(first - sec, 1),
                           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
                base = baselines.get(gemm_fp8)
                if base and name != base and base in outs:
                    c = closeness(outs[name], outs[base])
                    row.update(rel_l2_vs_bf16_attention=round(c["rel_l2"], 5), cos=round(c["cos"], 6))
                if profile:
                    row["profile"] = kernel_breakdown(lambda: model(**kw), top=top)
            except Exception:  # noqa: BLE001
                row["error"] = traceback.format_exc()[-2000:]
            yield row


def mean_call_s(fn: Callable[[], object], iters: int = 10) -> float:
    """Seconds per call of a GPU function: 2 warm-up calls, then the mean of ``iters`` between synchronisations."""
    import time

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters
