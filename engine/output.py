"""Where a render's frames go: one mp4 (:class:`SingleFile`), or, when the render is resumable, one closed segment
per chunk plus a checkpoint after each (:class:`Segments`, engine/checkpoint.py; the directory's layout and validity
rules: docs/formats.md §12). :func:`open_output` picks the sink and, for a resumable render, the chunk to continue
at: after the newest valid checkpoint in the directory, or for a redo after the original job's chunks before the
redo, taken from its kept checkpoints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import checkpoint as ckpt
from engine.api import InputError
from engine.events import emit
from engine.job import OUTPUT_AUDIO_RATE, JobPlan
from engine.writer import FPS, VideoWriter, join_segments

__all__ = ["Output", "Segments", "SingleFile", "Where", "consistent", "open_output"]


@dataclass(frozen=True)
class Where:
    """Where a render keeps its checkpoints (engine.api.Renderer.render's keywords)."""

    directory: Path | None
    keep_all: bool
    base: Path | None


def consistent(found: ckpt.Checkpoint | str, plan: JobPlan) -> ckpt.Checkpoint | str:
    """``found`` unless it contradicts the job's plan (more chunks or frames than the job has, no context for a
    chunk that follows)."""
    if isinstance(found, str):
        return found
    if found.next_chunk > len(plan.chunks) or found.written_frames > plan.n_frames:
        return "inconsistent with the job's chunks"
    if found.context is None and found.next_chunk < len(plan.chunks):
        return "no context for the next chunk"
    return found


class Output:
    """The sink of one render and what the loop carries between chunks: frames written, motion context."""

    def __init__(self, sink: VideoWriter | Segments, first_chunk: int = 0) -> None:
        self.sink: SingleFile | Segments = SingleFile(sink) if isinstance(sink, VideoWriter) else sink
        self.first_chunk = first_chunk  # > 0 when resumed from a checkpoint
        self.written = 0
        self.chunks_rendered = 0  # chunks this call rendered to completion
        self.context: torch.Tensor | None = None  # [16, k, h, w] fp32 clean context latents for the next chunk, CPU

    def write(self, frames: np.ndarray) -> None:
        self.sink.write(frames)
        self.written += len(frames)


class SingleFile:
    """Not resumable: every chunk's frames go to one mp4 writer (with the audio) at the output path."""

    def __init__(self, writer: VideoWriter) -> None:
        self.writer = writer

    @property
    def encode_s(self) -> float:
        return self.writer.encode_s

    def write(self, frames: np.ndarray) -> None:
        self.writer.write(frames)

    def end_chunk(self, index: int, written: int, context: torch.Tensor | None, seconds: float) -> None:
        emit("engine.chunk_done", chunk=index, next_chunk=index + 1, written_frames=written, seconds=round(seconds, 3))

    def settle(self) -> None:
        pass

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


class Segments:
    """Resumable: each chunk's frames go to their own mp4 segment (video only, encoded in a background thread),
    closed and renamed into place, then the checkpoint of the chunk is written (engine/checkpoint.py). Closing a
    segment waits for its encoding, so it happens after the next chunk's first step (:meth:`settle`), when the
    encoding has had time to finish, or when the render ends or stops. ``close`` joins the segments into the
    output with the audio, without re-encoding. Every render uses the same segmentation, so interrupted and
    uninterrupted renders give the same frames."""

    def __init__(self, directory: Path, plan: JobPlan, recipes: ckpt.Recipes, out_path: Path, *,
                 keep_all: bool) -> None:
        self.dir, self.plan, self.recipes, self.out_path = directory, plan, recipes, out_path
        self.keep_all = keep_all  # keep every chunk's checkpoint, not only the newest
        self.writer: VideoWriter | None = None  # the segment of the chunk being written
        # the finished chunk whose segment is still encoding, and the seconds it took to render
        self.pending: tuple[VideoWriter, ckpt.Checkpoint, float] | None = None
        self.encode_s = 0.0

    def write(self, frames: np.ndarray) -> None:
        if self.writer is None:
            self.writer = VideoWriter(self.dir / "seg.part", width=self.plan.width, height=self.plan.height,
                                      fps=FPS, crf=self.plan.req.crf, background=True)
        self.writer.write(frames)

    def end_chunk(self, index: int, written: int, context: torch.Tensor | None, seconds: float) -> None:
        assert self.writer is not None
        self.settle()
        point = ckpt.Checkpoint(self.recipes.for_next_chunk(index + 1), index + 1, written, context)
        self.pending = (self.writer, point, seconds)
        self.writer = None

    def settle(self) -> None:
        """Close the finished chunk's segment, rename it into place, then write its checkpoint."""
        if self.pending is None:
            return
        writer, point, seconds = self.pending
        self.pending = None
        t0 = time.perf_counter()
        writer.close()
        self.encode_s += writer.encode_s
        ckpt.fsync_file(writer.path)  # the segment's data is durable before its name and checkpoint count
        writer.path.replace(ckpt.segment_path(self.dir, point.next_chunk - 1))
        t1 = time.perf_counter()
        path = ckpt.save_checkpoint(self.dir, point, keep_previous=self.keep_all)
        emit("engine.chunk_done", chunk=point.next_chunk - 1, next_chunk=point.next_chunk,
             written_frames=point.written_frames, seconds=round(seconds, 3), segment_close_s=round(t1 - t0, 4),
             checkpoint_s=round(time.perf_counter() - t1, 4), checkpoint_bytes=path.stat().st_size)

    def close(self) -> None:
        self.settle()
        done = ckpt.load(self.dir, self.recipes.for_next_chunk)
        n = done.next_chunk if isinstance(done, ckpt.Checkpoint) else 0
        t0 = time.perf_counter()
        join_segments([ckpt.segment_path(self.dir, i) for i in range(n)], self.out_path, audio=self.plan.out_audio,
                      audio_rate=OUTPUT_AUDIO_RATE)
        self.encode_s += time.perf_counter() - t0

    def abort(self) -> None:
        """Keep every finished chunk (its segment and checkpoint); drop the chunk in progress."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        try:
            self.settle()
        except Exception as e:  # the original failure matters more; the chunk is rendered again on resume
            emit("engine.checkpoint_failed", logging.WARNING, directory=str(self.dir), error=str(e))


def open_output(plan: JobPlan, out_path: Path, where: Where, engine_identity: str) -> Output:
    """The render's output: one mp4 writer, or (resumable) segments in the checkpoint directory, continuing
    after the newest checkpoint found there when it is valid for this job (or, for a redo, after the original
    job's chunks before the redo, taken from its directory)."""
    req = plan.req
    if where.directory is None:
        # background: a chunk's x264 encoding runs in the writer's thread while the next chunk denoises
        return Output(VideoWriter(out_path, width=plan.width, height=plan.height, fps=FPS, crf=req.crf,
                                   audio=plan.out_audio, audio_rate=OUTPUT_AUDIO_RATE, background=True))
    directory = where.directory
    directory.mkdir(parents=True, exist_ok=True)
    recipes = ckpt.recipes(engine_identity, req)
    found = consistent(ckpt.load(directory, recipes.for_next_chunk), plan)
    if isinstance(found, str) and found != "none":
        emit("engine.checkpoint_discarded", logging.WARNING, directory=str(directory), reason=found)
    if isinstance(found, str) and where.base is not None and req.redo_from_chunk > 0:
        n = req.redo_from_chunk
        found = consistent(ckpt.seed_from(where.base, directory, n, recipes.prefix,
                                                with_earlier=where.keep_all), plan)
        if isinstance(found, str):
            raise InputError(f"redo from chunk {n}: {where.base} holds no usable checkpoint of the original "
                             f"job's chunk {n - 1} ({found}); a redo needs the original job's kept "
                             "checkpoints, of the same inputs, settings, seed and engine")
        emit("engine.redo_seeded", directory=str(directory), base=str(where.base), next_chunk=n)
    sink = Segments(directory, plan, recipes, out_path, keep_all=where.keep_all)
    if isinstance(found, str):
        ckpt.clear(directory)
        return Output(sink)
    ckpt.prune(directory, found.next_chunk)
    emit("engine.resumed", directory=str(directory), next_chunk=found.next_chunk,
         chunks=len(plan.chunks), written_frames=found.written_frames)
    out = Output(sink, first_chunk=found.next_chunk)
    out.written, out.context = found.written_frames, found.context
    return out
