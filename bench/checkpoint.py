"""What a resumable render costs: writing a checkpoint after every chunk, as a share of the chunk's time, and the
checkpoint's size at the real frame sizes (engine/checkpoint.py; the directory: docs/formats.md §12).

- ``render``: one job of --chunks chunks through the whole engine (the tiny models folder unless --models),
  resumable (``checkpoint_dir``) and not, alternating --repeat times. Per chunk, from the engine's
  ``engine.chunk_done`` events: the chunk's render time, the time to close its video segment (waiting for its
  x264 flush) and to write its checkpoint (serialise, digest, write, fsync, rename, directory fsync). The headline
  is the checkpoint writes' share of the chunk time; the whole job's wall time both ways is reported beside it.
- ``size``: ``save_checkpoint`` of the context latents at real buckets (9 motion frames), into --dir (default: a
  temporary folder; point it at the outbox share to measure there): bytes and write seconds (median of
  --repeat). No model is needed: the saved tensor's shape is all that matters.

    python -m bench.checkpoint [--only render,size] [--chunks 4] [--size 64x64] [--window 33] [--repeat 3]
                               [--warmup 1] [--dir DIR] [--models DIR] --out $OUT
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import common as c
from bench.render import portrait, speech
from engine import checkpoint as ckpt
from engine.events import LOGGER_NAME

BENCH = "checkpoint"
PARTS = ("render", "size")
# the 480p 16:9 bucket, a 480p square, the 720p square, the 720p 16:9 bucket (h, w)
BUCKETS = ((448, 896), (640, 640), (960, 960), (704, 1280))
MOTION = 9  # motion frames (upstream's); the size part's latents follow from it


class _ChunkEvents(logging.Handler):
    """Collects the fields of the engine's ``engine.chunk_done`` events."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.done: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "engine.chunk_done":
            self.done.append(dict(getattr(record, "fields", {})))


def _render_once(engine: Any, req: Any, work: Path, resumable: bool) -> tuple[float, list[dict[str, Any]], int]:
    """Wall seconds of one render, its chunk events and the bytes of its last checkpoint (0 when not resumable)."""
    import shutil

    ck = work / "ck"
    shutil.rmtree(ck, ignore_errors=True)
    handler, log = _ChunkEvents(), logging.getLogger(LOGGER_NAME)
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        engine.render(req, work / "o.mp4", lambda p: None, lambda: False, checkpoint_dir=ck if resumable else None)
        seconds = time.perf_counter() - t0
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    sizes = [e.get("checkpoint_bytes", 0) for e in handler.done]
    return seconds, handler.done, max(sizes[:-1] or sizes or [0])


def run_render(report: c.Report, *, device: str, models: Path | None, chunks: int, hw: tuple[int, int],
               repeat: int, window: int, warmup: int = 1) -> None:
    from engine import load_engine
    from engine.api import EngineOptions
    from engine.settings import request_from_settings
    from engine.tiny import write_tiny_models

    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        work = Path(tmp)
        if models is None:
            models = work / "models"
            write_tiny_models(models)
        engine = load_engine(EngineOptions(models_dir=models, device=device, preset="lightx2v"))
        engine.warmup()
        frames = window + (window - MOTION) * (chunks - 1)
        req = request_from_settings({"preset": "fast1", "size": [hw[1], hw[0]], "frame_window": window,
                                     "motion_frames": MOTION}, audio=speech(work / "s.wav", frames / 25),
                                    image=portrait(work / "p.png", hw[0], hw[1]))
        for _ in range(warmup):  # untimed: kernel selection, the prompt cache
            _render_once(engine, req, work, True)
        walls: dict[bool, list[float]] = {True: [], False: []}
        events: list[dict[str, Any]] = []
        ck_bytes = 0
        for _ in range(max(1, repeat)):
            for resumable in (True, False):
                sec, done, size = _render_once(engine, req, work, resumable)
                walls[resumable].append(sec)
                if resumable:
                    events += done
                    ck_bytes = size
        with c.case(report, BENCH, f"render {hw[0]}x{hw[1]}, {chunks} chunks of {window} frames: checkpoint "
                                   "writes / chunk time", "share") as row:
            chunk_s = sum(e["seconds"] for e in events)
            write_s = sum(e["checkpoint_s"] for e in events)
            close_s = sum(e["segment_close_s"] for e in events)
            row.seconds = round(write_s / chunk_s, 5)
            row.metrics.update(
                checkpoint_write_ms=round(1000 * statistics.median(e["checkpoint_s"] for e in events), 2),
                chunk_s=round(statistics.median(e["seconds"] for e in events), 3),
                segment_close_share=round(close_s / chunk_s, 4), checkpoint_bytes=ck_bytes,
                job_s_resumable=round(statistics.median(walls[True]), 3),
                job_s_single_file=round(statistics.median(walls[False]), 3),
                chunks_timed=len(events), device=device)


def run_size(report: c.Report, *, directory: Path | None, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-size-") as tmp:
        where = directory or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        k = (MOTION - 1) // 4 + 1
        for h, w in BUCKETS:
            with c.case(report, BENCH, f"checkpoint at {h}x{w} ({MOTION} motion frames)", "s/write") as row:
                latents = torch.randn(16, k, h // 8, w // 8)
                times, path = [], None
                for n in range(1, max(1, repeat) + 2):  # the first write is not timed (page cache, imports)
                    t0 = time.perf_counter()
                    path = ckpt.save_checkpoint(where, ckpt.Checkpoint("bench", n, 0, latents))
                    if n > 1:
                        times.append(time.perf_counter() - t0)
                assert path is not None
                size = path.stat().st_size
                row.seconds = round(statistics.median(times), 5)
                row.metrics.update(bytes=size, mb=round(size / 1e6, 3),
                                   bytes_per_output_pixel=round(size / (h * w), 3), directory=str(where))
                ckpt.clear(where)


def suite(size: c.Size, device: str, report: c.Report) -> None:
    """What ``make bench`` runs from this entry point: the size part, and at the tiny size the render part on the
    tiny models (at full size the share needs a full models folder: ``--models DIR``)."""
    run_size(report, directory=None, repeat=3)
    if size is c.TINY:
        run_render(report, device=device, models=None, chunks=3, hw=(32, 32), repeat=1, window=17)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", type=lambda s: [p for p in s.split(",") if p], default=list(PARTS),
                    help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--size", type=c.parse_bucket, default=(64, 64), help="render part: HxW")
    ap.add_argument("--window", type=int, default=33, help="render part: frames per chunk (upstream: 81)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="render part: untimed renders first")
    ap.add_argument("--dir", type=Path, default=None, help="size part: where to write (default: a temp folder)")
    ap.add_argument("--models", type=Path, default=None, help="render part: a models folder (default: tiny)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    unknown = [p for p in args.only if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    device = c.default_device()
    report = c.Report(BENCH, c.command_line(), {**c.environment(device), "size": "tiny" if args.models is None
                                                else str(args.models), "render_hw": list(args.size)})
    try:
        if "size" in args.only:
            run_size(report, directory=args.dir, repeat=args.repeat)
        if "render" in args.only:
            run_render(report, device=device, models=args.models, chunks=args.chunks, hw=args.size,
                       repeat=args.repeat, window=args.window, warmup=args.warmup)
    finally:
        c.finish(report, args.out)
    return 1 if any(r.error for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
