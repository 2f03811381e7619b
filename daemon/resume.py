"""Resumable jobs on the daemon's side: each job's checkpoint folder, who may remove it and when, and
the count of chunks rendered over all attempts (docs/daemon.md §4.8).

A job's checkpoints live in ``outbox/.tmp/.checkpoints/<job id>/`` (engine/checkpoint.py owns what is
inside): on the outbox's filesystem, so that any worker of a fleet that claims the job next continues
it, and outside every worker's own work folder (``outbox/.tmp/<worker>/``, which its worker empties at
start; a worker name never begins with a dot, see daemon/instance.py ``safe_name``).

Rules:
- only the process holding a job touches its folder while the job is queued or running: a requeue
  (SIGTERM, kill -9 and recovery, device fault, full disk, missing inbox) keeps it, and a worker that
  lost its lease leaves it to the new holder;
- the holder removes it when the job fails or is cancelled, and when it is published unless
  ``jobs.keep_checkpoints_h`` > 0 (then every chunk's checkpoint is kept for ``infinitetalkd redo``);
- the ingest leader's sweep removes kept folders once ``finished_at + keep_checkpoints_h`` has passed
  on the database clock, and folders of jobs that ended without their holder (recovery, the sweeper).
  Only then: a queued or running job's folder belongs to whoever holds or will hold the job.
"""

from __future__ import annotations

import contextlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.jobs import Job
from daemon.log import get_logger
from daemon.store import Store
from engine.api import Progress

__all__ = ["CHECKPOINTS", "checkpoint_dir", "checkpoints_root", "render_options", "keep_after", "remove",
           "sweep", "ChunkTracker"]

log = get_logger("infinitetalkd.resume")

CHECKPOINTS = ".checkpoints"  # under outbox/.tmp; the leading dot keeps it apart from worker folders


def checkpoints_root(config: Config) -> Path:
    return config.paths.tmp / CHECKPOINTS


def checkpoint_dir(config: Config, job_id: int) -> Path:
    """The job's checkpoint folder, the same for every worker and attempt."""
    return checkpoints_root(config) / str(job_id)


def render_options(config: Config, job: Job) -> dict[str, Any]:
    """The resume keywords of ``Renderer.render`` for this job (engine/api.py). Keywords at their
    default are left out."""
    out: dict[str, Any] = {"checkpoint_dir": checkpoint_dir(config, job.id)}
    if config.jobs.keep_checkpoints_h > 0:
        out["keep_all_checkpoints"] = True
    if job.redo_of is not None:
        out["base_checkpoint_dir"] = checkpoint_dir(config, job.redo_of)
    return out


def keep_after(config: Config, outcome: str) -> bool:
    """Whether the holder keeps the job's folder after an attempt that ended with ``outcome`` (the
    worker's outcome kinds, daemon/worker.py): everything that requeues keeps it; a lost job is not
    ours to touch; a published job keeps it only for ``jobs.keep_checkpoints_h``."""
    if outcome == "done":
        return config.jobs.keep_checkpoints_h > 0
    return outcome not in ("failed", "cancelled", "superseded")


def remove(config: Config, job_id: int) -> None:
    """Delete the job's checkpoint folder (and the parent when it is empty). Errors are logged only:
    a stray folder costs disk space until the next sweep, nothing more."""
    d = checkpoint_dir(config, job_id)
    try:
        if d.exists():
            shutil.rmtree(d)
            log.info("job.checkpoints_removed", job_id=job_id, directory=str(d))
    except OSError as exc:
        log.warning("job.checkpoints_remove_failed", job_id=job_id, directory=str(d), error=str(exc))
    with contextlib.suppress(OSError):
        checkpoints_root(config).rmdir()  # only when empty: no trace in outbox/.tmp when idle


def sweep(config: Config, store: Store) -> list[int]:
    """Remove the folders of jobs that ended (failed, cancelled, or done longer ago than
    ``jobs.keep_checkpoints_h``). Run by the ingest leader only.
    Returns the job ids whose folders were removed."""
    root = checkpoints_root(config)
    try:
        ids = {int(p.name): p for p in root.iterdir() if p.name.isdigit() and p.is_dir()}
    except OSError:
        return []  # no folder (nothing kept) or an outbox that cannot be read now: the next sweep
    if not ids:
        return []
    gone = store.finished_before(list(ids), keep_s=config.jobs.keep_checkpoints_h * 3600)
    # A folder of an id the database does not know stays: nothing wrote it in this database's life (a
    # restored or replaced database); a job that gets that id later finds a checkpoint of another recipe,
    # which the engine discards.
    removed = [i for i in sorted(ids) if gone.get(i, False)]
    for job_id in removed:
        remove(config, job_id)
    return removed


class ChunkTracker:
    """Counts the chunks one attempt renders from its progress reports (a report of chunk c + 1, or the
    final mux, means chunk c is finished) and stores the total over all attempts, with the chunk the
    attempt resumed at, in the job database as it goes: what survives a kill -9. The total is a lower bound
    (a chunk whose end no report showed is counted once a later attempt resumes after it) and the
    engine's own figures replace this attempt's count when the render returns.

    The render thread only hands over numbers; the writes run on a thread of their own, so a slow or
    locked database never stalls a render. Each write is fenced (only while this worker holds this
    attempt) and absolute (the earlier attempts' total + this attempt's), so order and retries are
    harmless."""

    def __init__(self, store: Store, job: Job, worker_id: str) -> None:
        self.store, self.job, self.worker_id = store, job, worker_id
        self.before = job.chunks_rendered  # earlier attempts
        self.first: int | None = None  # the first chunk (1-based) this attempt reported
        self.last = 0
        self.muxed = False
        self._engine: tuple[int, int | None] | None = None  # (chunks rendered, resumed from) of the result
        self._written: tuple[int, int | None] = (self.before, None)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"chunks {job.id}")

    @property
    def resumed_from(self) -> int | None:
        """The first chunk (0-based) this attempt rendered after a checkpoint; None: it began at 0."""
        if self._engine is not None:
            return self._engine[1]
        return None if self.first is None or self.first <= 1 else self.first - 1

    @property
    def finished(self) -> int:
        """Chunks this attempt rendered to completion."""
        if self._engine is not None:
            return self._engine[0]
        if self.first is None:
            return 0
        return self.last - self.first + (1 if self.muxed else 0)

    @property
    def total(self) -> int:
        return self.before + self.finished

    def progress(self, p: Progress) -> None:
        if p.stage in ("denoise", "decode") and p.chunk > 0:
            if self.first is None:
                self.first = self.last = p.chunk
                # The earlier attempts rendered at least the chunks this one resumed after (a redo's first
                # chunks come from its original): a clean stop right after a chunk's decode, before any report
                # of the next, is not seen as that chunk's end.
                self.before = max(self.before, p.chunk - 1 - (self.job.redo_from_chunk or 0))
            elif p.chunk > self.last:
                self.last = p.chunk
                log.info("job.chunk_finished", chunk=p.chunk - 2, chunks=p.chunks, total=self.total)
        elif p.stage == "mux" and self.first is not None and not self.muxed:
            self.muxed = True
            log.info("job.chunk_finished", chunk=self.last - 1, chunks=p.chunks, total=self.total)
        self._store()

    def settle(self, chunks_rendered: int, resumed_from: int | None) -> None:
        """The engine's own figures at the end of a render (engine/api.py RenderResult) win over the
        count from progress; an engine that reports none (0 chunks) leaves the count as it is."""
        if chunks_rendered > 0:
            self._engine = (chunks_rendered, resumed_from)

    def _store(self) -> None:
        now = (self.total, self.resumed_from)
        if now == self._written:
            return
        self._written = now
        self._pool.submit(self._write, *now)

    def _write(self, total: int, resumed_from: int | None) -> None:
        try:
            self.store.record_chunks(self.job, self.worker_id, total, resumed_from)
        except Exception as exc:  # noqa: BLE001 - best effort: the next chunk, or the finish, writes it again
            log.warning("job.chunks_not_recorded", error=str(exc))

    def close(self) -> None:
        """Wait for the writes handed over so far (the finish that follows must not be overtaken)."""
        self._pool.shutdown(wait=True)
