"""One run, one model: the reference-equivalent DiT forward against each of our fast paths (issue 5, items 2-3).

Builds the full-size WanInfiniteTalk(RELEASED) in bf16 with random weights once, then times on the same inputs:

  reference   eager bf16, the FA2-class flash SDPA kernel first (the official code calls flash-attention 2),
              and the single-speaker reference-attention map computed in every block and thrown away, as the
              official ``WanSelfAttention`` does when ``human_num == 1`` (our implementation of the map: softmax
              of q·k_refᵀ over the first frame's tokens, 3 masks, fp32: ``engine.dit.reference_attention_map``)
  eager       eager bf16, cuDNN SDPA first, no map (our eager path; its output is the closeness reference)
  compiled    engine default on CUDA: blocks compiled, cuDNN SDPA first
  +int8 attn  the same with 8-bit self-attention (engine/attention_int8.py; fp8 P·V, or bf16 P·V)
  fp8 ...     fp8 GEMMs in every block Linear (engine.fast.enable_fp8), then the same attention choices and
              fast accumulation

Per variant: s / forward (CUDA events, median of --repeat after a warm-up; compiled variants compile in their
first call, reported as compile s), peak GiB, relative L2 and cosine against the eager output and, with
--fp32-truth, against an fp32 forward; the ratio reference / variant; the FLOP-ideal (performance.md §2: 1.825
PFLOP per 480p forward -> 1.85 s at the bf16 and 0.92 s at the fp8 dense datasheet peaks).

    python bench/bench_speedup.py --out $OUT [--fp32-truth] [--bucket 448x896] [--models DIR]

``--models DIR``: the DiT and single-speaker patch of a real ComfyUI models folder (the engine's loader) instead of
random weights; with real weights the closeness columns judge fp8 and the 8-bit attention for real.
``--fp8-grid``: first round the random block weights onto a per-tensor e4m3 grid, as the users' fp8-scaled files
store them, and give the fp8 variants that stored payload (what the engine does since session 3 when no LoRA is
merged): every variant then computes with the weights a user's file holds. With ``--models`` and an fp8-scaled
file the grid is the file's own and is used the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_fast import (  # noqa: E402
    closeness,
    env_info,
    fp32_forward,
    make_inputs,
    peak_gib,
    reset_peak,
    timed,
    wall_once,
)
from bench.common import bench_dit, folder_fp8_payload, round_to_file_fp8  # noqa: E402
from engine import dit, fast  # noqa: E402
from engine.attention import attention, flash3_available  # noqa: E402

PFLOP_480P = 1.825  # performance.md §2, per forward at 448x896x81
BF16_PEAK_TFS, FP8_PEAK_TFS = 989.0, 1979.0  # H100 SXM dense datasheet


def flash_first() -> Any:
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def with_discarded_map(masks: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Self-attention that first computes the reference-attention map and drops it (official single speaker)."""
    lr = masks.shape[-1]

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dit.reference_attention_map(q, k[:, :lr], masks)
        return attention(q, k, v)

    return kernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", default="448x896")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fp32-truth", action="store_true")
    ap.add_argument("--skip", action="append", default=[], help="variant name prefix to skip")
    ap.add_argument("--out", default=None)
    ap.add_argument("--models", type=Path, default=None, help="a ComfyUI models folder (default: random weights)")
    ap.add_argument("--fp8-grid", action="store_true", help="weights on the fp8-scaled file grid; fp8 uses them")
    args = ap.parse_args()
    out_dir = Path(args.out or os.environ.get("OUT") or "bench/out")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.set_float32_matmul_precision("highest")
    model = bench_dit(args.models, "cuda", torch.bfloat16)
    cfg = model.cfg
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if args.fp8_grid:
        stored = (folder_fp8_payload(args.models, cfg.num_layers, fast.FP8_TARGETS, "cuda") if args.models
                  else round_to_file_fp8(model, fast.FP8_TARGETS))
    h, w = (int(v) for v in args.bucket.split("x"))
    grid = ((args.frames - 1) // 4 + 1, h // 16, w // 16)
    given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report: dict[str, Any] = dict(env=env_info("cuda"), args=given, rows=[], errors=[],
                                  tokens=grid[0] * grid[1] * grid[2])
    torch.cuda.synchronize()
    report["env"]["build_or_load_s"] = round(time.perf_counter() - t_start, 1)
    kw = make_inputs(cfg, h, w, args.frames, "cuda", torch.bfloat16, seed=0)
    truth: dict[str, torch.Tensor] = {}

    def save() -> None:
        (out_dir / "bench_speedup.json").write_text(json.dumps(report, indent=1))

    def record(name: str, sec: float, out: torch.Tensor, peak: float | None, compile_s: float | None) -> None:
        row: dict[str, Any] = dict(variant=name, s_per_forward=round(sec, 3), peak_gib=peak,
                                   compile_s=None if compile_s is None else round(compile_s, 1),
                                   finite=bool(torch.isfinite(out).all()))
        if "eager" in truth:
            c = closeness(out.float(), truth["eager"])
            row.update(rel_l2_vs_eager=round(c["rel_l2"], 5), cos_vs_eager=round(c["cos"], 6))
        if "fp32" in truth:
            c = closeness(out.float(), truth["fp32"])
            row.update(rel_l2_vs_fp32=round(c["rel_l2"], 5), cos_vs_fp32=round(c["cos"], 6))
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    def eager(name: str, ctx: Any) -> torch.Tensor:
        with ctx:
            model(**kw)  # warm-up
            reset_peak()
            sec, out = timed(lambda: model(**kw), args.repeat)
        record(name, sec, out, peak_gib(), None)
        return out

    def compiled(name: str) -> None:
        if any(name.startswith(s) for s in args.skip):
            return
        try:
            torch._dynamo.reset()
            with fast.preferred_attention():
                fast.compile_blocks(model)
                first, _ = wall_once(lambda: model(**kw))
                reset_peak()
                sec, out = timed(lambda: model(**kw), args.repeat)
            record(name, sec, out, peak_gib(), first - sec)
        except Exception:
            report["errors"].append(f"{name}: {traceback.format_exc()}"[-3000:])
            print(report["errors"][-1], flush=True)
            save()

    with torch.no_grad():
        masks = torch.zeros(1, 3, grid[1] * grid[2], device="cuda")
        masks[:, 0] = 1.0  # one speaker covering the frame, as the official single-speaker masks
        fast.enable_int8_attention(model, on=False)
        for block in model.blocks:
            block.self_attn.kernel = with_discarded_map(masks)
        ref_out = eager("reference-equivalent: eager bf16, FA2-class flash, single-speaker map", flash_first())
        ref_out = ref_out.float().clone()
        fast.enable_int8_attention(model, on=False)
        truth["eager"] = eager("eager bf16, cuDNN first", fast.preferred_attention()).float().clone()
        c = closeness(ref_out, truth["eager"])
        report["rows"][0].update(rel_l2_vs_eager=round(c["rel_l2"], 5), cos_vs_eager=round(c["cos"], 6))
        if args.fp32_truth:
            t0 = time.perf_counter()
            truth["fp32"] = fp32_forward(model, kw)
            report["env"]["fp32_forward_s"] = round(time.perf_counter() - t0, 1)
            c = closeness(truth["eager"], truth["fp32"])
            report["rows"][-1].update(rel_l2_vs_fp32=round(c["rel_l2"], 5), cos_vs_fp32=round(c["cos"], 6))

        compiled("compiled bf16 (default)")
        if flash3_available():
            fast.use_flash3(model)
            compiled("compiled bf16 + FA3 (default where installed)")
            fast.use_flash3(model, on=False)
        for pv_fp8, label in ((True, "fp8 PV"), (False, "bf16 PV")):
            fast.enable_int8_attention(model, pv_fp8=pv_fp8)
            compiled(f"compiled bf16 + int8 attention ({label})")
        fast.enable_int8_attention(model, on=False)
        fast.enable_fp8(model, weights_fp8=stored)
        report["env"]["fp8_layers_from_file_grid"] = len(stored)
        compiled("compiled fp8")
        fast.enable_int8_attention(model, pv_fp8=True)
        compiled("compiled fp8 + int8 attention (fp8 PV)")
        for m in model.modules():
            if isinstance(m, fast.Fp8Linear):
                m.fast_accum = True
        compiled("compiled fp8 fast-accum + int8 attention (fp8 PV)")
        fast.enable_int8_attention(model, on=False)
        compiled("compiled fp8 fast-accum")
        if flash3_available():
            fast.use_flash3(model)
            compiled("compiled fp8 fast-accum + FA3")

    ref_s = report["rows"][0]["s_per_forward"]
    for r in report["rows"]:
        r["speedup_vs_reference"] = round(ref_s / r["s_per_forward"], 2)
    report["ideal_s"] = {"bf16_peak": round(PFLOP_480P * 1000 / BF16_PEAK_TFS, 2),
                         "fp8_peak": round(PFLOP_480P * 1000 / FP8_PEAK_TFS, 2)}
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    lines = ["| variant | s / forward | x vs reference | peak GiB | compile s | rel L2 vs eager | rel L2 vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['s_per_forward']} | {r['speedup_vs_reference']} | {r['peak_gib']} | "
                     f"{r['compile_s'] or '–'} | {r.get('rel_l2_vs_eager', '–')} | {r.get('rel_l2_vs_fp32', '–')} |")
    md = "\n".join(lines)
    (out_dir / "bench_speedup.md").write_text(md + "\n")
    print(json.dumps(report["env"]), json.dumps(report["ideal_s"]), f"total {report['total_s']} s")
    print(md)


if __name__ == "__main__":
    main()
