"""``infinitetalkd redo JOB --from-chunk N [--seed S]``: re-render a finished job from chunk N with another
seed, keeping chunks 0..N-1 (docs/daemon.md §4.8).

A redo is a job of its own: a new row (stem ``<stem>.redo-c<N>-s<S>``, so its result is published under
that name and the original's stays) with ``redo_of``, ``redo_from_chunk`` and ``redo_seed`` set, whose
inputs are a copy of the original's archived inputs in ``outbox/.tmp/.redo/<key>/`` (``inputs_dir``),
never the inbox: the scanner does not see them, and nothing the user drops into the inbox meanwhile is
touched by the redo. The worker renders it with the original's kept checkpoints as the base
(``base_checkpoint_dir``), which exist only while ``jobs.keep_checkpoints_h`` keeps them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from daemon import files as fl
from daemon import outbox as ob
from daemon import resume
from daemon.config import Config
from daemon.jobs import Job, JobStatus
from daemon.store import Store

__all__ = ["RedoError", "REDO_INPUTS", "redo_stem", "redo_fingerprint", "archived_inputs", "request_redo"]

REDO_INPUTS = ".redo"  # under outbox/.tmp, beside .checkpoints; never a worker's folder (a leading dot)


class RedoError(Exception):
    """The redo cannot be queued; the message says why and which setting or file to look at."""


def redo_stem(stem: str, from_chunk: int, seed: int) -> str:
    return f"{stem}.redo-c{from_chunk}-s{seed}"


def redo_fingerprint(original: Job, from_chunk: int, seed: int) -> str:
    """The redo's identity: the same redo asked twice is one job."""
    key = f"{original.fingerprint}:{from_chunk}:{seed}".encode()
    return "redo:" + hashlib.sha256(key).hexdigest()


def archived_inputs(config: Config, job: Job) -> Path:
    """The folder in archive/ holding exactly the job's inputs (size and sha256 as recorded at ingest)."""
    if config.jobs.after_success == "delete":
        raise RedoError(f"the inputs of job #{job.id} were deleted after it finished (jobs.after_success: delete "
                        f"in {config.source}); a redo needs them in the archive: drop them again instead")
    root = config.paths.archive
    found = fl.holding_folder([root], job.stem, job.id, job.inputs)
    if found is not None:
        return found
    raise RedoError(f"the inputs of job #{job.id} ({', '.join(str(i['name']) for i in job.inputs)}) are not in "
                    f"{root}/{job.stem}/ any more (moved or removed?); drop them again instead")


def _chunks(config: Config, job: Job) -> int | None:
    """The original's number of chunks, from its published result document (None if unreadable)."""
    name = job.outputs.get("json")
    if not name:
        return None
    try:
        doc = json.loads((config.paths.outbox / str(name)).read_text(encoding="utf-8"))
        return int(doc["output"]["chunks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check(config: Config, job: Job, from_chunk: int) -> None:
    if job.status is not JobStatus.DONE or job.rejected:
        raise RedoError(f"job #{job.id} is {job.status.value}; only a finished (done) job can be redone")
    if job.redo_of is not None:
        raise RedoError(f"job #{job.id} is itself a redo of job #{job.redo_of}; redo job #{job.redo_of} instead")
    if from_chunk < 1:
        raise RedoError("--from-chunk must be 1 or more (chunk 0 is the start: drop the inputs again with "
                        "another seed in the sidecar to re-render everything)")
    chunks = _chunks(config, job)
    if chunks is not None and from_chunk >= chunks:
        raise RedoError(f"job #{job.id} has {chunks} chunks (0 to {chunks - 1}); --from-chunk must be 1 to "
                        f"{chunks - 1}")
    if config.jobs.keep_checkpoints_h <= 0:
        raise RedoError(f"a redo starts from the original's kept checkpoints, and none are kept: set "
                        f"jobs.keep_checkpoints_h (hours, e.g. 24) in {config.source}, restart the daemon, and "
                        f"redo jobs that finish from then on")
    if not resume.checkpoint_dir(config, job.id).is_dir():
        raise RedoError(f"the checkpoints of job #{job.id} are gone (removed after jobs.keep_checkpoints_h = "
                        f"{config.jobs.keep_checkpoints_h:g} h, or it finished while they were not kept); "
                        "drop its inputs again with another seed instead")


def request_redo(config: Config, store: Store, job: Job, from_chunk: int, seed: int) -> tuple[Job, bool]:
    """Queue the redo of ``job`` (checks first, then the inputs' copy, then the row: the worker never claims
    a redo whose inputs are still being copied). Returns (redo job, created)."""
    _check(config, job, from_chunk)
    fingerprint = redo_fingerprint(job, from_chunk, seed)
    existing = store.by_fingerprint(fingerprint)
    if existing is not None:
        return existing, False
    source = archived_inputs(config, job)
    dest = config.paths.tmp / REDO_INPUTS / fingerprint.removeprefix("redo:")[:16]
    staging = dest.with_name(dest.name + ".partial")
    for d in (staging, dest):  # left by a redo command that died before its row was written
        if d.exists():
            shutil.rmtree(d)
    fl.snapshot(source, [str(i["name"]) for i in job.inputs], staging)
    os.replace(staging, dest)
    ob.fsync_dir(dest.parent)
    return store.add_redo(job, fingerprint=fingerprint, stem=redo_stem(job.stem, from_chunk, seed),
                          from_chunk=from_chunk, seed=seed, inputs_dir=str(dest))
