"""The mp4 writer next to GPU work: encoding in the caller's thread vs in the background (engine/media.py).

The decision it informs: whether a chunk's encoding overlaps the next chunk's denoising. Writes --chunks chunks of
81 frames with 48 kHz audio, each chunk preceded by --gpu-s seconds of work in the caller's thread (bf16 matmuls on
the GPU when there is one, a sleep otherwise) standing in for the next chunk's denoising; reports the total, the time
the caller was blocked in write() and in close(), foreground and background writer alternating --repeat times.

    python -m bench.writer --chunks 3 --gpu-s 3 [--content noise] [--from-model] --out $OUT
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common as c
from engine.media import VideoWriter

BENCH = "writer"


def busy(seconds: float) -> None:
    """Keep the caller's thread (and the GPU, if any) busy for ``seconds``, as a chunk's denoising does."""
    import torch

    if torch.cuda.is_available():
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()
        return
    time.sleep(seconds)


def chunk_frames(h: int, w: int, content: str, frames: int = 81) -> np.ndarray:
    """[frames, h, w, 3] uint8: a random texture moving 4 px a frame, or fresh noise (x264's worst case, like the
    output of a random-weight model)."""
    rng = np.random.default_rng(0)
    if content == "noise":
        return (rng.random((frames, h, w, 3)) * 255).astype(np.uint8)
    base = (rng.random((h, w + frames * 4, 3)) * 255).astype(np.uint8)
    return np.stack([base[:, 4 * i: 4 * i + w] for i in range(frames)])


def one_run(path: Path, chunk: np.ndarray, audio: np.ndarray, *, background: bool, chunks: int, gpu_s: float,
            from_model: bool) -> dict[str, float]:
    blocked = 0.0
    t0 = time.perf_counter()
    h, w = chunk.shape[1:3]
    writer = VideoWriter(path, width=w, height=h, audio=audio, audio_rate=48000, background=background)
    for _ in range(chunks):
        busy(gpu_s)
        frames = chunk
        if from_model:  # as engine/render.py makes them: a float video on the device -> uint8 on the host
            import torch

            from engine.frames import from_model as convert

            frames = convert(torch.from_numpy(chunk).to(c.default_device()).permute(3, 0, 1, 2).float() / 127.5 - 1)
        t1 = time.perf_counter()
        writer.write(frames)
        blocked += time.perf_counter() - t1
    t1 = time.perf_counter()
    writer.close()
    close_s = time.perf_counter() - t1
    return {"total_s": time.perf_counter() - t0, "blocked_in_write_s": blocked, "close_s": close_s}


def run(report: c.Report, *, size: str, chunks: int, gpu_s: float, repeat: int, content: str,
        from_model: bool, frames: int = 81) -> None:
    h, w = c.parse_bucket(size)
    chunk = chunk_frames(h, w, content, frames)
    audio = (np.random.default_rng(1).standard_normal(int(48000 * frames / 25 * chunks)) * 0.1).astype(np.float32)
    runs: dict[str, list[dict[str, float]]] = {"foreground": [], "background": []}
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
        for _ in range(max(1, repeat)):
            for mode in runs:
                runs[mode].append(one_run(Path(tmp) / f"{mode}.mp4", chunk, audio, background=mode == "background",
                                          chunks=chunks, gpu_s=gpu_s, from_model=from_model))
    for mode, rs in runs.items():
        with c.case(report, BENCH, f"{mode} writer, {chunks} x {frames} frames {h}x{w} {content}", "s/job") as row:
            med = {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
            row.seconds = med["total_s"]
            row.metrics.update(blocked_in_write_s=med["blocked_in_write_s"], close_s=med["close_s"],
                               gpu_s_per_chunk=gpu_s, runs=[round(r["total_s"], 2) for r in rs])


def suite(size: c.Size, device: str, report: c.Report, *, repeat: int = 2) -> None:
    """What ``make bench`` runs from this entry point: 3 chunks at 480p on a GPU, 2 small ones on a CPU."""
    if size is c.FULL:
        run(report, size="448x896", chunks=3, gpu_s=3.0, repeat=repeat, content="noise", from_model=True)
    else:
        run(report, size=f"{size.height}x{size.width}", chunks=2, gpu_s=0.05, repeat=1, content="noise",
            from_model=True, frames=size.frames)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.writer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--gpu-s", type=float, default=3.0)
    ap.add_argument("--size", default="448x896", help="HxW of the frames")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--content", choices=["texture", "noise"], default="texture")
    ap.add_argument("--from-model", action="store_true",
                    help="convert each chunk through engine.frames.from_model from a float tensor first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    report = c.Report(BENCH, c.command_line(), c.environment(c.default_device()))
    try:
        run(report, size=args.size, chunks=args.chunks, gpu_s=args.gpu_s, repeat=args.repeat, content=args.content,
            from_model=args.from_model)
    finally:
        c.finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
