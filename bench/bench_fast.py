"""The DiT fast path on a GPU: eager bf16 vs compiled bf16 vs compiled fp8, speed and closeness (issue 5).

Builds the full-size WanInfiniteTalk(RELEASED) in bf16 with random weights (the init of bench_dit.py), then on the
same inputs and inside ``engine.fast.preferred_attention()``:

  (a) eager bf16: s/forward (CUDA events, median of --repeat after a warm-up), peak GiB; its output is the
      reference. Block 0's inputs are captured and block 0 is also run in fp32 (the noise floor: what bf16
      rounding alone does to one block's update).
  (b) compiled bf16 (``compile_blocks``): first-call time minus steady time = compile cost; Dynamo's frame
      counter after the first forward (one graph must serve all 40 blocks) and no recompile on another step
      and another chunk (``error_on_recompile``).
  (c) compiled fp8 (``enable_fp8`` then ``compile_blocks``): same figures, weights GiB after conversion.
  (d) optional, while --budget-s lasts: the other buckets with compiled fp8 (and switching back and forth
      between buckets without recompiling), then compiled fp8 with fast accumulation.

--fp32-truth adds a whole-forward fp32 reference (blocks cast to fp32 one at a time, then back: bf16 -> fp32 ->
bf16 is exact), so every configuration's error is also given against the exact-arithmetic answer, next to eager
bf16's own. --fp8-subsets adds block-0 errors for subsets of the converted layers and a compiled forward with only
the large-M layers in fp8 (the K/V projections of the 512 text / 257 image / 32 audio context tokens in bf16).

Closeness to (a): relative L2 ||out - ref|| / ||ref|| and cosine similarity of the fp32 velocity output; per block:
the same metrics on the block's update (output - input) against the fp32 block. Tolerances are in TOL below.
Random weights: real checkpoints have outlier channels that make fp8 error larger (or smaller) than here.

    python bench/bench_fast.py --bucket 448x896 --bucket 640x640 --repeat 3 --out $OUT
    python bench/bench_fast.py --tiny        # CPU dry run of the script with the tiny DiT (aot_eager backend)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_dit  # noqa: E402
from engine import dit, fast  # noqa: E402

# Acceptance, written down before measuring. Compile only reorders bf16 arithmetic: it must stay within bf16
# rounding noise (rel L2 1e-2; the fp32-vs-bf16 block floor below is ~1e-2 on the block update and far smaller
# on the output). fp8 e4m3 keeps 3 mantissa bits against bf16's 7, i.e. 16x the unit roundoff, so a single fp8
# block update is expected ~10-16x the bf16 floor; for the whole forward we accept rel L2 <= 3e-2 and cosine
# >= 0.9995 (the cosine that a 3e-2 relative error implies) against the eager bf16 output.
TOL = {
    "compiled_bf16": {"rel_l2": 1e-2, "cos": 0.99995},
    "fp8": {"rel_l2": 3e-2, "cos": 0.9995},
}
# Written after the first run (2026-11-25), where compiled bf16 missed the 1e-2 above (1.6e-2) although its block-0
# update was *closer* to fp32 than eager's: the tolerance ignored that bf16 noise accumulates over 40 blocks, so
# eager itself is that far from the exact answer. Criterion anchored on the fp32 forward instead: an option that
# only reorders bf16 arithmetic must be no further from fp32 than eager bf16 is (ratio <= 1.25). fp8 gets no pass
# threshold here: its ratio is reported; whether it is acceptable needs real weights and a render A/B.
TOL_VS_FP32 = {"compiled_bf16_ratio_to_eager": 1.25}

# Layers whose inputs are the few context tokens (512 text, 257 image, 32 audio per frame): no speed from fp8.
LARGE_M = fast.FP8_LARGE_M_TARGETS
SMALL_M = tuple(t for t in fast.FP8_TARGETS if t not in LARGE_M)
SUBSETS = {
    "all 15 (default)": fast.FP8_TARGETS,
    "large-M only (10)": LARGE_M,
    "context/audio K,V only (5)": SMALL_M,
    "ffn only (2)": ("ffn.0", "ffn.2"),
    "self-attn q,k,v,o only (4)": ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"),
}


def make_inputs(cfg: dit.DiTConfig, h: int, w: int, frames: int, device: str, dtype: torch.dtype, seed: int) -> dict:
    """One speaker, 120 text tokens (padded to 512 inside), 257 CLIP tokens: the shapes of bench_dit.py."""
    g = torch.Generator(device=device).manual_seed(seed)
    f, lh, lw = (frames - 1) // 4 + 1, h // 8, w // 8

    def rnd(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=g).to(dt)

    return dict(
        x=rnd(1, cfg.out_dim, f, lh, lw, dt=torch.float32),
        t=torch.tensor([900.0], device=device),
        context=rnd(1, 120, cfg.text_dim),
        clip_fea=rnd(1, 257, cfg.clip_dim),
        y=rnd(1, cfg.in_dim - cfg.out_dim, f, lh, lw),
        audio=rnd(1, 1, frames, cfg.audio_window, cfg.audio_feature_dim),
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of ``repeat`` calls (CUDA events on a GPU, wall clock on CPU) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def wall_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def alloc_gib() -> float | None:
    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated() / 2**30, 2)


def closeness(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    a, b = out.double().flatten(), ref.double().flatten()
    return {
        "rel_l2": float((a - b).norm() / b.norm()),
        "cos": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
    }


def fp32_forward(model: dit.WanInfiniteTalk, kw: dict) -> torch.Tensor:
    """The forward in fp32 arithmetic without holding an fp32 copy of the 35 GiB model: the small non-block
    modules are cast to fp32 for the call, each block just before it runs and back to bf16 right after (values
    that came from bf16 survive bf16 -> fp32 -> bf16 exactly). Eager, no TF32 (precision "highest")."""
    others = [m for name, m in model.named_children() if name != "blocks"]

    def to_fp32(m: torch.nn.Module, args: tuple) -> None:  # a hook must return None to keep the inputs
        m.float()

    def to_bf16(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        m.to(torch.bfloat16)

    hooks = []
    for block in model.blocks:
        hooks.append(block.register_forward_pre_hook(to_fp32))
        hooks.append(block.register_forward_hook(to_bf16))
    try:
        for m in others:
            m.float()
        return model(**kw).float()
    finally:
        for h in hooks:
            h.remove()
        for m in others:
            m.to(torch.bfloat16)


def frames_ok() -> int:
    return int(counters["frames"]["ok"])


def env_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = dict(torch=torch.__version__, python=platform.python_version(), device=device)
    if device == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(),
            capability=list(torch.cuda.get_device_capability()),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            supports_fp8=fast.supports_fp8("cuda"),
        )
    with contextlib.suppress(Exception):
        from torch.nn.attention import list_flash_attention_impls

        info["flash_impls"] = list_flash_attention_impls()
    from engine.attention import flash3_available

    info["fa3_available"] = flash3_available(device) if device != "cpu" else False
    info["recompile_limit"] = getattr(torch._dynamo.config, "recompile_limit", None) or getattr(
        torch._dynamo.config, "cache_size_limit", None
    )
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", action="append", default=None, help="HxW, repeatable; the first is the main one")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--block-repeat", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=300.0, help="start optional stages only before this")
    ap.add_argument("--out", default=None, help="folder for bench_fast.json / .md (default $OUT or bench/out)")
    ap.add_argument("--tiny", action="store_true", help="dry run with the tiny DiT (CPU: aot_eager backend)")
    ap.add_argument("--fp32-truth", action="store_true", help="also compare every output with an fp32 forward")
    ap.add_argument("--fp8-subsets", action="store_true", help="fp8 on subsets of the layers (block 0 + forward)")
    ap.add_argument("--no-fast-accum", action="store_true", help="skip the fast-accumulation stage")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dit.TINY if args.tiny else dit.RELEASED
    backend = "inductor" if device == "cuda" else "aot_eager"
    buckets = args.bucket or (["64x64", "64x96"] if args.tiny else ["448x896"])
    frames = 9 if args.tiny and args.frames == 81 else args.frames
    dtype = torch.bfloat16
    torch.set_float32_matmul_precision("highest")  # the fp32 noise-floor block must be real fp32 (no TF32)
    out_dir = Path(args.out or os.environ.get("OUT") or "bench/out")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = dict(env=env_info(device), args=vars(args), backend=backend, tol=TOL,
                                  tol_vs_fp32=TOL_VS_FP32, rows=[],
                                  blocks=[], errors=[])

    def save() -> None:
        (out_dir / "bench_fast.json").write_text(json.dumps(report, indent=1))

    def elapsed() -> float:
        return time.perf_counter() - t_start

    def hw(b: str) -> tuple[int, int]:
        h, w = (int(v) for v in b.split("x"))
        return h, w

    def tokens(b: str) -> int:
        h, w = hw(b)
        return ((frames - 1) // 4 + 1) * (h // 16) * (w // 16)

    model = random_dit(cfg, device, dtype)
    sync()
    report["env"]["build_s"] = round(elapsed(), 1)
    report["env"]["weights_gib_bf16"] = alloc_gib()
    main_b = buckets[0]
    kw = make_inputs(cfg, *hw(main_b), frames, device, dtype, seed=0)
    # Another denoising step and another chunk of the same bucket: new values, same shapes.
    kw_next = make_inputs(cfg, *hw(main_b), frames, device, dtype, seed=1)
    kw_next["t"] = torch.tensor([500.0], device=device)
    rows, blocks = report["rows"], report["blocks"]

    truth: dict[str, torch.Tensor] = {}

    def add_row(out: torch.Tensor | None = None, **row: Any) -> None:
        if out is not None and "ref" in truth:
            c = closeness(out.float(), truth["ref"])
            row.update(rel_l2_vs_fp32=round(c["rel_l2"], 5), cos_vs_fp32=round(c["cos"], 6))
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    def add_block(name: str, sec: float, y: torch.Tensor, x_in: torch.Tensor, delta32: torch.Tensor) -> None:
        c = closeness(y.float() - x_in.float(), delta32)
        row = dict(config=name, ms_per_block=round(sec * 1000, 2), x40_s=round(40 * sec, 3),
                   update_rel_l2_vs_fp32=round(c["rel_l2"], 5), update_cos_vs_fp32=round(c["cos"], 6))
        blocks.append(row)
        print(json.dumps(row), flush=True)
        save()

    with torch.no_grad(), fast.preferred_attention():
        # (a) eager bf16 -------------------------------------------------------------------------------
        captured: dict[str, tuple] = {}
        hook = model.blocks[0].register_forward_pre_hook(lambda m, a: captured.setdefault("args", a))
        model(**kw)  # warm-up; captures block 0's positional inputs
        hook.remove()
        reset_peak()
        sec_a, out = timed(lambda: model(**kw), args.repeat)
        peak_a = peak_gib()  # before the fp32 reference below, which needs more memory
        ref = out.float().clone()
        if args.fp32_truth:
            t0 = time.perf_counter()
            truth["ref"] = fp32_forward(model, kw)
            report["env"]["fp32_forward_s"] = round(time.perf_counter() - t0, 1)
        add_row(out=ref, config="eager bf16", bucket=main_b, tokens=tokens(main_b), s_per_forward=round(sec_a, 3),
                peak_gib=peak_a, weights_gib=report["env"]["weights_gib_bf16"], compile_s=None,
                rel_l2=0.0, cos=1.0, frames_compiled=None, recompiles=None)

        blk, bargs = model.blocks[0], captured["args"]
        x_in = bargs[0]
        blk32 = copy.deepcopy(blk).float()
        args32 = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in bargs]
        delta32 = (blk32.forward(*args32) - x_in.float()).clone()
        del blk32, args32
        gc.collect()
        sec, y = timed(lambda: blk.forward(*bargs), args.block_repeat)
        add_block("block 0, eager bf16 (noise floor vs fp32)", sec, y, x_in, delta32)
        if args.fp8_subsets:
            for name, targets in SUBSETS.items():
                holder = torch.nn.Module()
                holder.blocks = torch.nn.ModuleList([copy.deepcopy(blk)])
                fast.enable_fp8(holder, targets=targets)
                sec, y = timed(lambda: holder.blocks[0].forward(*bargs), args.block_repeat)  # noqa: B023
                add_block(f"block 0, eager fp8, {name}", sec, y, x_in, delta32)
                del holder
            gc.collect()

        def compiled_row(label: str, weights_gib: float | None) -> None:
            """Compile the blocks afresh, time the forward, check that another chunk does not recompile."""
            counters.clear()
            torch._dynamo.reset()
            fast.compile_blocks(model, backend=backend)
            first_s, _ = wall_once(lambda: model(**kw))
            n_frames = frames_ok()
            graphs = int(counters["stats"]["unique_graphs"])
            with torch._dynamo.config.patch(error_on_recompile=True):
                reset_peak()
                sec_c, out = timed(lambda: model(**kw), args.repeat)
                peak_c = peak_gib()
                model(**kw_next)
            c = closeness(out.float(), ref)
            add_row(out=out, config=label, bucket=main_b, tokens=tokens(main_b), s_per_forward=round(sec_c, 3),
                    peak_gib=peak_c, weights_gib=weights_gib, compile_s=round(first_s - sec_c, 1),
                    rel_l2=round(c["rel_l2"], 5), cos=round(c["cos"], 6), frames_compiled=n_frames,
                    unique_graphs=graphs, recompiles=frames_ok() - n_frames,
                    graph_breaks=sum(counters["graph_break"].values()))
            sec, y = timed(lambda: blk(*bargs), args.block_repeat)
            add_block(f"block 0, {label}", sec, y, x_in, delta32)

        # (b) compiled bf16 --------------------------------------------------------------------------
        try:
            compiled_row("compiled bf16", report["env"]["weights_gib_bf16"])
        except Exception:
            report["errors"].append("compiled bf16: " + traceback.format_exc())
            print(report["errors"][-1], flush=True)
            save()
        torch._dynamo.reset()

        # (c) fp8 ------------------------------------------------------------------------------------
        if args.fp8_subsets:  # first the large-M layers only, then (below) the remaining 5 per block as well
            try:
                fast.enable_fp8(model, targets=LARGE_M)
                report["env"]["weights_gib_fp8_large_m"] = alloc_gib()
                compiled_row("compiled fp8, large-M layers only", report["env"]["weights_gib_fp8_large_m"])
            except Exception:
                report["errors"].append("compiled fp8 large-M: " + traceback.format_exc())
                print(report["errors"][-1], flush=True)
                save()
        t0 = time.perf_counter()
        n_fp8 = fast.enable_fp8(model)
        sync()
        report["env"]["fp8_layers"] = n_fp8  # (those converted by this call)
        report["env"]["fp8_convert_s"] = round(time.perf_counter() - t0, 1)
        report["env"]["weights_gib_fp8"] = w8 = alloc_gib()
        try:
            sec, y = timed(lambda: blk.forward(*bargs), args.block_repeat)
            add_block("block 0, eager fp8", sec, y, x_in, delta32)
        except Exception:
            report["errors"].append("eager fp8 block: " + traceback.format_exc())
            print(report["errors"][-1], flush=True)
        try:
            compiled_row("compiled fp8", w8)
        except Exception:
            report["errors"].append("compiled fp8: " + traceback.format_exc())
            print(report["errors"][-1], flush=True)
            save()

        # (d) optional: other buckets (compiled fp8, no eager reference), then fast accumulation -------------
        for other in buckets[1:]:
            if elapsed() > args.budget_s:
                report["errors"].append(f"skipped bucket {other}: {elapsed():.0f} s > budget")
                continue
            try:
                n0 = frames_ok()
                kw_o = make_inputs(cfg, *hw(other), frames, device, dtype, seed=2)
                first_s, _ = wall_once(lambda: model(**kw_o))  # noqa: B023
                n_frames = frames_ok()
                with torch._dynamo.config.patch(error_on_recompile=True):
                    reset_peak()
                    sec_o, out = timed(lambda: model(**kw_o), args.repeat)  # noqa: B023
                    peak_o = peak_gib()
                    model(**kw)  # back to the main bucket and again: both graphs stay cached
                    model(**kw_o)
                add_row(config="compiled fp8", bucket=other, tokens=tokens(other), s_per_forward=round(sec_o, 3),
                        peak_gib=peak_o, weights_gib=w8, compile_s=round(first_s - sec_o, 1), rel_l2=None, cos=None,
                        frames_compiled=n_frames - n0, recompiles=frames_ok() - n_frames,
                        bucket_switch_ok=True, finite=bool(torch.isfinite(out).all()))
            except Exception:
                report["errors"].append(f"bucket {other}: " + traceback.format_exc())
                print(report["errors"][-1], flush=True)
                save()
        if elapsed() <= args.budget_s and device == "cuda" and not args.no_fast_accum:
            try:
                for m in model.modules():
                    if isinstance(m, fast.Fp8Linear):
                        m.fast_accum = True
                compiled_row("compiled fp8 + fast accum", w8)
            except Exception:
                report["errors"].append("fast accum: " + traceback.format_exc())
                print(report["errors"][-1], flush=True)
        else:
            report["errors"].append(f"skipped fast accum: {elapsed():.0f} s > budget, no GPU or --no-fast-accum")

    report["total_s"] = round(elapsed(), 1)
    save()
    md = table(report)
    (out_dir / "bench_fast.md").write_text(md)
    print(json.dumps(report["env"]))
    print(md)


def table(report: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else str(v)

    lines = [
        "| config | bucket | tokens | s / forward | peak GiB | weights GiB | compile s | rel L2 vs eager | "
        "cos vs eager | rel L2 vs fp32 | graphs compiled | recompiles |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {r['bucket']} | {r['tokens']} | {f(r['s_per_forward'])} | {f(r['peak_gib'])} | "
            f"{f(r['weights_gib'])} | {f(r['compile_s'])} | {f(r['rel_l2'])} | {f(r['cos'])} | "
            f"{f(r.get('rel_l2_vs_fp32'))} | {f(r.get('frames_compiled'))} | {f(r.get('recompiles'))} |"
        )
    lines += ["", "| block 0 (captured inputs) | ms / block | x 40 (s) | update rel L2 vs fp32 | update cos vs fp32 |",
              "|---|---|---|---|---|"]
    for b in report["blocks"]:
        lines.append(f"| {b['config']} | {b['ms_per_block']} | {b['x40_s']} | {b['update_rel_l2_vs_fp32']} | "
                     f"{b['update_cos_vs_fp32']} |")
    if report["errors"]:
        lines += ["", "Errors / skipped: " + " || ".join(e.strip().splitlines()[-1] for e in report["errors"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
