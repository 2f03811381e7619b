"""Full-size DiT + InfiniteTalk adapter forward on a GPU, random weights (issue 2, issue 5).

Builds WanInfiniteTalk(RELEASED) on the meta device, materialises it in bf16 on the GPU with random
weights (weights do not change kernel speed), and times forwards at the given buckets with CUDA
events (median of --repeat after --warmup). Prints one JSON line per bucket and a table.

    python bench/bench_dit.py --bucket 448x896 --frames 81 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_dit  # noqa: E402
from engine import dit  # noqa: E402


def inputs(cfg: dit.DiTConfig, h: int, w: int, frames: int, speakers: int, dtype: torch.dtype) -> dict:
    F = (frames - 1) // 4 + 1
    lh, lw = h // 8, w // 8
    dev = "cuda"
    return dict(
        x=torch.randn(1, cfg.out_dim, F, lh, lw, device=dev),
        t=torch.tensor([900.0], device=dev),
        context=torch.randn(1, 120, cfg.text_dim, device=dev, dtype=dtype),
        clip_fea=torch.randn(1, 257, cfg.clip_dim, device=dev, dtype=dtype),
        y=torch.randn(1, cfg.in_dim - cfg.out_dim, F, lh, lw, device=dev, dtype=dtype),
        audio=torch.randn(1, speakers, frames, cfg.audio_window, cfg.audio_feature_dim, device=dev, dtype=dtype),
        ref_target_masks=(torch.ones(1, 3, lh, lw, device=dev, dtype=dtype) if speakers == 2 else None),
    )


def backend_first(name: str):
    """SDPA with one backend tried first and the others as fallbacks (the audio attention's 32 keys)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "auto":
        return contextlib.nullcontext()
    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    first = order.pop(name)
    return sdpa_kernel([first, *order.values(), SDPBackend.MATH], set_priority=True)


def time_forward(model: torch.nn.Module, kw: dict, warmup: int, repeat: int) -> tuple[float, float]:
    for _ in range(warmup):
        model(**kw)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = model(**kw)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
        assert torch.isfinite(out).all(), "non-finite output"
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", action="append", default=None, help="HxW, repeatable (default 448x896)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--speakers", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--attn", action="append", default=None,
                    help="SDPA backend to put first: auto (torch's order), cudnn, flash, efficient; repeatable")
    args = ap.parse_args()
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    model = random_dit(dit.RELEASED, "cuda", dtype)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    rows = []
    with torch.inference_mode():
        for bucket in args.bucket or ["448x896"]:
            h, w = (int(v) for v in bucket.split("x"))
            kw = inputs(dit.RELEASED, h, w, args.frames, args.speakers, dtype)
            for attn in args.attn or ["auto"]:
                with backend_first(attn):
                    sec, peak = time_forward(model, kw, args.warmup, args.repeat)
                tokens = ((args.frames - 1) // 4 + 1) * (h // 16) * (w // 16)
                row = dict(bucket=bucket, frames=args.frames, tokens=tokens, speakers=args.speakers, attn=attn,
                           seconds_per_forward=round(sec, 3), peak_gib=round(peak, 2))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                          weights_gib=round(weights_gib, 2), build_s=round(build_s, 1))))
    print("| bucket | frames | tokens | attention | s / forward | peak GiB |")
    for r in rows:
        print(f"| {r['bucket']} | {r['frames']} | {r['tokens']} | {r['attn']} | {r['seconds_per_forward']} "
              f"| {r['peak_gib']} |")


if __name__ == "__main__":
    main()
