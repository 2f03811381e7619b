"""Low-memory mode: the DiT's blocks streamed from pinned host memory under a 24 / 16 GiB cap (engine/offload.py).

The decision it informs: can a 24 GB (or 16 GB) card render 480p, and at what cost against the resident model.
One DiT (random weights), the same inputs throughout, eager, torch's SDPA order:

  resident          every weight on the GPU: seconds per forward (--repeat after a warm-up), peak; the reference
  set-up            ``stream_blocks`` packs the blocks into pinned host memory; one block's host-to-device copy rate
  streamed, cap N   ``set_per_process_memory_fraction(N GiB)``: seconds per forward, peak, ratio to resident,
                    max |out - resident| (streaming must be bit-identical)
  VAE decode        one chunk's latents decoded as the render does (``decode_iter``, frames kept in fp32) under the
                    smallest cap with the streamed DiT still loaded, at --vae-buckets: the other big allocation

The cap limits torch's allocator only: a real card also loses ~0.5 GiB to the CUDA context, and its PCIe link is
slower than the H100's (bench/RESULTS.md says what that means for the figures).

    python -m bench.lowmem --out $OUT
    python -m bench.lowmem --size tiny   # any machine (on a CPU the cap is not enforced)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch

from bench import common as c
from engine import dit
from engine.offload import stream_blocks

BENCH = "lowmem"


def copy_rate(streamer: Any, n: int = 5) -> float:
    """GB/s of one block's host -> device copy (pinned source, one DMA), on the streamer's own buffers."""
    src, dst = streamer._host_flat[1], streamer._dev_flat[1]
    dst.copy_(src, non_blocking=True)
    sec, _ = c.wall_once(lambda: [dst.copy_(src, non_blocking=True) for _ in range(n)])
    return n * src.numel() / sec / 1e9


def _forwards(model: dit.WanInfiniteTalk, kw: dict[str, Any], repeat: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(max(1, repeat)):
        sec, out = c.wall_once(lambda: c.dit_forward(model, kw))
        times.append(round(sec, 3))
    assert out is not None
    return times, out


def run(size: c.Size, device: str, report: c.Report, *, repeat: int, caps: list[float],
        vae_buckets: list[str]) -> None:
    dtype = torch.bfloat16
    cfg = dataclasses.replace(size.dit, num_layers=4) if size is c.TINY else size.dit  # 4 blocks: 2 slots cycle
    model = c.random_dit(cfg, device, dtype)
    kw = c.dit_inputs(cfg, size.height, size.width, size.frames, device, dtype, seed=2)
    base = dict(bucket=f"{size.height}x{size.width}", tokens=size.tokens)
    with torch.inference_mode():
        with c.case(report, BENCH, "resident", "s/forward") as row:
            c.dit_forward(model, kw)  # warm-up: kernel selection
            c.reset_peak()
            times, ref = _forwards(model, kw, repeat)
            row.seconds, row.peak_gib = min(times), c.peak_gib()
            row.metrics.update(base, runs=times)
        resident = row.seconds
        with c.case(report, BENCH, "set-up: blocks to pinned host memory", "s") as row:
            sec, streamer = c.wall_once(lambda: stream_blocks(model, device))
            row.seconds = round(sec, 1)
            if device.startswith("cuda"):
                rate = copy_rate(streamer)
                row.metrics.update(h2d_gb_s=round(rate, 1), block_copy_ms=round(streamer.slot_bytes / rate / 1e6, 1))
            row.metrics.update(pinned=streamer.pinned, host_gib=round(streamer.host_bytes / c.GIB, 2),
                               block_gib=round(streamer.slot_bytes / c.GIB, 3), slots=streamer.num_slots)
        for cap in caps:
            with c.case(report, BENCH, f"streamed, {cap:g} GiB cap", "s/forward") as row:
                c.set_memory_cap(cap)
                c.reset_peak()
                times, out = _forwards(model, kw, repeat)
                row.seconds, row.peak_gib = min(times), c.peak_gib()
                row.metrics.update(base, runs=times, max_abs_diff_vs_resident=float((out - ref).abs().max()))
                if resident:
                    row.metrics["x_vs_resident"] = round(min(times) / resident, 3)
        c.set_memory_cap(min(caps) if caps else None)
        v = c.random_vae(size.vae, device, dtype)
        for vb in vae_buckets:
            vh, vw = c.parse_bucket(vb) if size is c.FULL else (size.height, size.width)
            with c.case(report, BENCH, f"VAE decode {vh}x{vw} under the cap", "s") as row:
                z = torch.randn(1, size.vae.z_dim, (size.frames - 1) // 4 + 1, vh // 8, vw // 8, device=device)
                before = (torch.cuda.memory_allocated() / c.GIB) if device.startswith("cuda") else 0.0
                c.reset_peak()
                sec, frames = c.wall_once(lambda z=z: torch.cat([f.float() for f in v.decode_iter(z.to(dtype))], 2))
                row.seconds, row.peak_gib = round(sec, 2), c.peak_gib()
                row.metrics.update(frames=int(frames.shape[2]),
                                   peak_over_loaded_gib=None if row.peak_gib is None else round(row.peak_gib - before,
                                                                                                 2))
        c.set_memory_cap(None)


def suite(size: c.Size, device: str, report: c.Report, *, repeat: int = 2) -> None:
    """What ``make bench`` runs from this entry point."""
    run(size, device, report, repeat=repeat, caps=[24.0, 16.0], vae_buckets=["448x896"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lowmem", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="auto", choices=["auto", "full", "tiny"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--caps", default="24,16", help="GiB caps for the streamed runs, comma separated")
    ap.add_argument("--vae-buckets", default="448x896,960x960", help="empty to skip the VAE decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = c.default_device()
    size = c.pick_size(args.size, device)
    report = c.Report(BENCH, c.command_line(), {**c.environment(device), "size": size.name})
    try:
        run(size, device, report, repeat=args.repeat, caps=[float(x) for x in args.caps.split(",") if x],
            vae_buckets=[b for b in args.vae_buckets.split(",") if b])
    finally:
        c.finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
