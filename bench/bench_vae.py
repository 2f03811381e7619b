"""Wan VAE at full size on a GPU, random weights: the per-chunk VAE work of the render loop (issue 5).

Times (CUDA events, median of --repeat after one warm-up) the encode of the 81-frame conditioning clip, the
encode of 9 motion frames and of 1 frame, and the decode of 21 latents, at the given bucket, in bf16 and fp32.

    python3 bench/bench_vae.py --bucket 448x896 [--cudnn-benchmark]

``--cudnn-benchmark`` sets ``torch.backends.cudnn.benchmark`` (cuDNN times its Conv3d algorithms per shape and
keeps the fastest; the engine does not set it): run both ways to decide whether the engine should, and watch the
extra peak memory (workspaces) next to a 16/24 GiB cap. Added in session 3, not yet run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import vae  # noqa: E402


def build(dtype: torch.dtype) -> vae.WanVAE:
    model = vae.build(vae.RELEASED, "meta").to(dtype).to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim > 1:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5, generator=gen)
            else:
                p.zero_()
    return model.eval()


def timed(fn, repeat: int) -> tuple[float, float]:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", default="448x896")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "both"], default="both")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    h, w = (int(v) for v in args.bucket.split("x"))
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, bucket {h}x{w}, "
          f"cudnn.benchmark={args.cudnn_benchmark}")
    print("| dtype | operation | s | extra peak GiB |")
    dtypes = {"bf16": (torch.bfloat16,), "fp32": (torch.float32,), "both": (torch.bfloat16, torch.float32)}
    for dtype in dtypes[args.dtype]:
        run(dtype, h, w, args.repeat)
        torch.cuda.empty_cache()


def run(dtype: torch.dtype, h: int, w: int, repeat: int) -> None:
    model = build(dtype)
    clip81 = torch.rand(1, 3, 81, h, w, device="cuda", dtype=dtype) * 2 - 1
    z = torch.randn(1, 16, 21, h // 8, w // 8, device="cuda", dtype=dtype)
    ops = [("encode 81 frames", lambda: model.encode(clip81)),
           ("encode 9 frames", lambda: model.encode(clip81[:, :, :9])),
           ("encode 1 frame", lambda: model.encode(clip81[:, :, :1])),
           ("decode 21 latents (decode_iter)", lambda: [None for _ in model.decode_iter(z)])]
    for name, fn in ops:
        with torch.no_grad():
            sec, peak = timed(fn, repeat)
        print(f"| {str(dtype).removeprefix('torch.')} | {name} | {sec:.3f} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
