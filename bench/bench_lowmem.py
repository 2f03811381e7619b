"""Low-memory mode on a GPU: the full-size DiT with its blocks streamed from pinned host memory (issue 5, part 4).

Builds WanInfiniteTalk(RELEASED) in bf16 with random weights on the GPU (the init of bench_dit.py), then on the
same inputs (448x896, 81 frames, one speaker, eager, torch's SDPA order):

  (a) resident: every weight on the GPU; s/forward (wall clock around a synchronised forward, --repeat after one
      warm-up), peak allocated GiB; its output is the reference.
  then ``engine.offload.stream_blocks(model, "cuda")`` packs the 40 blocks into pinned host memory (the GPU copies
  are released) and the host-to-device copy rate of one block is measured on the same buffers;
  (b) streamed under a 24 GiB cap: ``torch.cuda.set_per_process_memory_fraction(24 GiB / total)``: s/forward,
      peak allocated and reserved GiB, max |out - reference|;
  (c) the same under a 16 GiB cap;
  (d) the Wan VAE (bf16, random weights) decoding 21 latents as the render loop does (``decode_iter``, frames
      concatenated in fp32) at 448x896 and at the 960x960 (720p) bucket, under the 16 GiB cap with the streamed
      DiT still loaded: peak GiB over what was allocated before, seconds.

The cap limits torch's caching allocator only; a real 24 GB card also loses ~0.5 GiB to the CUDA context, and its
PCIe link and compute speed differ from the H100's (see bench/RESULTS.md).

    python bench/bench_lowmem.py                     # on the GPU
    python bench/bench_lowmem.py --tiny --device cpu # dry run of the script with the tiny DiT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_dit  # noqa: E402
from engine import dit, vae  # noqa: E402
from engine.offload import stream_blocks  # noqa: E402

GIB = 2**30


def build_vae(cfg: vae.VAEConfig, device: str, dtype: torch.dtype) -> vae.WanVAE:
    model = vae.build(cfg, "meta").to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / max(1, p[0].numel()) ** 0.5, generator=gen)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    return model.eval()


def inputs(cfg: dit.DiTConfig, h: int, w: int, frames: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    f = (frames - 1) // 4 + 1
    lh, lw = h // 8, w // 8
    g = torch.Generator(device=device).manual_seed(2)
    return dict(
        x=torch.randn(1, cfg.out_dim, f, lh, lw, device=device, generator=g),
        t=torch.tensor([900.0], device=device),
        context=torch.randn(1, 120, cfg.text_dim, device=device, generator=g).to(dtype),
        clip_fea=torch.randn(1, 257, cfg.clip_dim, device=device, generator=g).to(dtype),
        y=torch.randn(1, cfg.in_dim - cfg.out_dim, f, lh, lw, device=device, generator=g).to(dtype),
        audio=torch.randn(1, 1, frames, cfg.audio_window, cfg.audio_feature_dim, device=device, generator=g).to(dtype),
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peaks(device: str) -> tuple[float, float]:
    if not device.startswith("cuda"):
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def set_cap(device: str, cap_gib: float | None) -> None:
    if not device.startswith("cuda"):
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total))


def copy_rate(streamer: Any, device: str, n: int = 5) -> float:
    """GB/s of one block's host -> device copy (pinned source, one DMA), on the streamer's own buffers."""
    src, dst = streamer._host_flat[1], streamer._dev_flat[1]
    dst.copy_(src, non_blocking=True)
    sec, _ = timed(lambda: [dst.copy_(src, non_blocking=True) for _ in range(n)], device)
    return n * src.numel() / sec / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", default="448x896")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--caps", default="24,16", help="GiB caps for the streamed runs, comma separated")
    ap.add_argument("--vae-buckets", default="448x896,960x960", help="empty to skip the VAE decode peaks")
    ap.add_argument("--tiny", action="store_true", help="tiny DiT/VAE (dry run of the script)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device, dtype = args.device, torch.bfloat16
    cfg = dataclasses.replace(dit.TINY, num_layers=4) if args.tiny else dit.RELEASED
    vcfg = vae.TINY if args.tiny else vae.RELEASED
    h, w = (int(v) for v in args.bucket.split("x"))
    if args.tiny:
        h, w, args.frames = 32, 64, 9
    caps = [float(c) for c in args.caps.split(",") if c]
    info: dict[str, Any] = dict(torch=torch.__version__, python=platform.python_version(), device=device)
    if device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(), total_gib=round(torch.cuda.get_device_properties(0)
                                                                       .total_memory / GIB, 2))
    print(json.dumps(info), flush=True)
    rows: list[dict[str, Any]] = []

    build_s, model = timed(lambda: random_dit(cfg, device, dtype), device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    kw = inputs(cfg, h, w, args.frames, device, dtype)
    tokens = ((args.frames - 1) // 4 + 1) * (h // 16) * (w // 16)
    print(json.dumps(dict(build_s=round(build_s, 1), weights_gib=round(weights, 2), tokens=tokens)), flush=True)

    with torch.inference_mode():
        # (a) resident
        model(**kw)  # warm-up: kernel selection
        reset_peak(device)
        times = []
        ref = None
        for _ in range(args.repeat):
            sec, ref = timed(lambda: model(**kw), device)
            times.append(sec)
        alloc, reserved = peaks(device)
        resident = min(times)
        rows.append(dict(mode="resident", cap="none", times=[round(t, 3) for t in times], peak_alloc=alloc,
                         peak_reserved=reserved, ratio=1.0, max_abs_diff=0.0))
        print(json.dumps(rows[-1]), flush=True)

        # streaming set-up: blocks -> pinned host memory
        setup_s, streamer = timed(lambda: stream_blocks(model, device), device)
        rate = copy_rate(streamer, device)
        setup = dict(setup_s=round(setup_s, 1), pinned=streamer.pinned, host_gib=round(streamer.host_bytes / GIB, 2),
                     block_gib=round(streamer.slot_bytes / GIB, 3), slots=streamer.num_slots,
                     h2d_gb_s=round(rate, 1), block_copy_ms=round(streamer.slot_bytes / rate / 1e6, 1),
                     gpu_alloc_after_gib=round(torch.cuda.memory_allocated() / GIB, 2)
                     if device.startswith("cuda") else 0.0)
        print(json.dumps(setup), flush=True)

        # (b), (c) streamed under caps
        for cap in caps:
            set_cap(device, cap)
            reset_peak(device)
            copies0 = streamer.copies
            try:
                times, out = [], None
                for _ in range(args.repeat):
                    sec, out = timed(lambda: model(**kw), device)
                    times.append(sec)
                alloc, reserved = peaks(device)
                assert ref is not None and out is not None
                diff = (out - ref).abs().max().item()
                rows.append(dict(mode="streamed", cap=f"{cap:g} GiB", times=[round(t, 3) for t in times],
                                 peak_alloc=alloc, peak_reserved=reserved, ratio=min(times) / resident,
                                 max_abs_diff=diff, copies=streamer.copies - copies0))
            except torch.OutOfMemoryError as e:
                rows.append(dict(mode="streamed", cap=f"{cap:g} GiB", error=str(e).splitlines()[0][:160]))
            print(json.dumps(rows[-1]), flush=True)

        # (d) VAE decode peaks under the smallest cap, the streamed DiT still loaded
        vae_rows = []
        vbuckets = [b for b in args.vae_buckets.split(",") if b]
        if vbuckets:
            set_cap(device, min(caps) if caps else None)
            v = build_vae(vcfg, device, dtype)
            for vb in vbuckets:
                vh, vw = (int(x) for x in vb.split("x"))
                if args.tiny:
                    vh, vw = vh // 16, vw // 16
                z = torch.randn(1, vcfg.z_dim, (args.frames - 1) // 4 + 1, vh // 8, vw // 8, device=device)
                sync(device)
                base = torch.cuda.memory_allocated() / GIB if device.startswith("cuda") else 0.0
                reset_peak(device)
                try:
                    sec, frames = timed(lambda z=z: torch.cat(list(v.decode_iter(z.to(dtype))), dim=2), device)
                    alloc, _ = peaks(device)
                    vae_rows.append(dict(bucket=vb, frames=int(frames.shape[2]), seconds=round(sec, 2),
                                         peak_over_base_gib=round(alloc - base, 2), peak_alloc_gib=round(alloc, 2)))
                    del frames
                except torch.OutOfMemoryError as e:
                    vae_rows.append(dict(bucket=vb, error=str(e).splitlines()[0][:160]))
                print(json.dumps(vae_rows[-1]), flush=True)
        set_cap(device, None)

    print(f"\nGPU {info.get('gpu', device)}, torch {info['torch']}; bucket {args.bucket} x {args.frames} frames "
          f"({tokens} tokens), bf16 eager, {weights:.2f} GiB of DiT weights; pinned={setup['pinned']}, "
          f"{setup['host_gib']} GiB host arenas, {setup['slots']} slots x {setup['block_gib']} GiB, "
          f"H2D {setup['h2d_gb_s']} GB/s ({setup['block_copy_ms']} ms per block), set-up {setup['setup_s']} s\n")
    print("| mode | GPU cap | s / forward (each run) | vs resident | peak allocated GiB | peak reserved GiB "
          "| max abs diff vs resident |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['cap']} | OOM: {r['error']} | | | | |")
            continue
        print(f"| {r['mode']} | {r['cap']} | {' / '.join(str(t) for t in r['times'])} | {r['ratio']:.3f}x "
              f"| {r['peak_alloc']:.2f} | {r['peak_reserved']:.2f} | {r['max_abs_diff']:.3g} |")
    if vae_rows:
        print("\n| VAE decode (21 latents, bf16, frames kept in fp32) | frames | s | peak GiB over the loaded models "
              "| peak allocated GiB |")
        print("|---|---|---|---|---|")
        for r in vae_rows:
            if "error" in r:
                print(f"| {r['bucket']} | OOM: {r['error']} | | | |")
            else:
                print(f"| {r['bucket']} | {r['frames']} | {r['seconds']} | {r['peak_over_base_gib']} "
                      f"| {r['peak_alloc_gib']} |")


if __name__ == "__main__":
    main()
