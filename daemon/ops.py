"""Operator actions shared by ``infinitetalkd retry`` and the web API, so both move the same files
and make the same store transitions."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config
from daemon.jobs import Job, JobStatus
from daemon.snapshot import source_dir
from daemon.store import Store

__all__ = ["OpError", "Retried", "restore_inputs", "retry_job"]


class OpError(Exception):
    """The action cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Retried:
    job: Job
    moved: list[str]
    rescan: bool  # a job refused at ingest: its row is gone and the scanner judges the files afresh


def restore_inputs(cfg: Config, job: Job) -> list[str]:
    """Move a failed job's inputs from its failed/ folder back where the job reads them: the inbox, or a
    redo's own folder (docs/daemon.md §4.8), which the scanner does not watch."""
    if not job.failed_dir:
        return []
    src = Path(job.failed_dir)
    home = source_dir(cfg, job)
    if job.inputs_dir:
        home.mkdir(parents=True, exist_ok=True)
    moved = []
    for i in job.inputs:
        name = str(i["name"])
        p, dst = src / name, home / name
        if os.path.lexists(p):
            if os.path.lexists(dst):
                raise OpError(f"{dst} exists; remove it or move it away, then retry again")
            shutil.move(str(p), str(dst))
            moved.append(name)
    return moved


def retry_job(cfg: Config, store: Store, job: Job) -> Retried:
    """failed | cancelled -> queued, with the inputs moved back into the inbox first."""
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise OpError(f"job #{job.id} is {job.status.value}; only failed or cancelled jobs can be retried")
    # Inputs first, then the row: the worker never claims a job whose files are still moving.
    moved = restore_inputs(cfg, job)
    if job.rejected:
        store.delete(job.id)  # refused at ingest: the scanner judges the files afresh
        return Retried(job, moved, rescan=True)
    new = store.retry(job.id)
    if new is None:
        raise OpError(f"job #{job.id} changed meanwhile; see infinitetalkd status")
    return Retried(new, moved, rescan=False)
