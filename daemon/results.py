"""The result document published as outbox/<stem>.json beside the mp4 and the job's log.

Shape (one name per thing): ``params`` are the render settings as requested (``params.video`` is
the source video of a dubbing job, null for a portrait); ``output`` describes the video written;
``timings`` has the queue wait, the whole render and the engine's per-stage seconds;
``resumed_from_chunk`` / ``chunks_rendered`` say how the job survived interruptions and ``redo`` names the
job a redo re-rendered (docs/daemon.md §4.8).
"""

from __future__ import annotations

import platform
import time
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from daemon import inbox as ib
from daemon import outbox as ob
from daemon.jobs import Job
from engine.api import RenderResult

__all__ = ["result_doc", "run_key", "program_version"]

# The writer's encode time runs in its own thread, overlapped with the next chunk's denoising: it is
# not a stage of the render, and beside the stage "encode" (VAE encode of the context frames) it
# reads as a second figure for the same thing. The result keeps the stages only.
_NOT_STAGES = frozenset({"mp4_encode"})


def run_key(job: Job) -> str:
    """Names one queueing of a job (a re-render after redo_finished: render is a new run)."""
    return f"{job.id}:{job.created_at!r}"


def program_version() -> str:
    try:
        return metadata.version("infinitetalkd")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def result_doc(job: Job, prepared: ib.Prepared, result: RenderResult, base: str, render_s: float,
               identity: str, *, chunks_rendered: int, resumed_from_chunk: int | None) -> dict[str, Any]:
    """``chunks_rendered``: chunks rendered to completion over all attempts (more than ``output.chunks``
    when a kill lost a chunk in progress); ``resumed_from_chunk``: where the last attempt continued after a
    checkpoint (docs/daemon.md §4.8)."""
    now = time.time()
    stages = {k: v for k, v in result.timings.items() if k not in _NOT_STAGES}
    return {
        "job_id": job.id,
        "stem": job.stem,
        "fingerprint": job.fingerprint,
        "run": run_key(job),
        "attempt": job.attempts,
        "outputs": {ext: f"{base}.{ext}" for ext in ob.RESULT_EXTS},
        "params": prepared.params,
        "seed": result.seed,
        "output": {"frames": result.frames, "fps": result.fps, "width": result.width, "height": result.height,
                   "duration_s": result.duration_s, "chunks": result.chunks,
                   "dit_calls": result.dit_calls, "blocks_skipped": result.blocks_skipped},
        "resumed_from_chunk": resumed_from_chunk,
        "chunks_rendered": chunks_rendered,
        "redo": None if job.redo_of is None else {"of_job": job.redo_of, "from_chunk": job.redo_from_chunk,
                                                  "seed": job.redo_seed},
        "timings": {"queued_s": round((job.started_at or now) - job.created_at, 3),
                    "render_s": round(render_s, 3), **stages},
        "inputs": prepared.inputs,
        "models": {"engine": identity, "files": dict(result.model_files), "kernels": dict(result.kernels)},
        "versions": {"infinitetalkd": program_version(), "python": platform.python_version(),
                     "platform": platform.platform()},
        "created_at": _iso(job.created_at),
        "finished_at": _iso(now),
    }
