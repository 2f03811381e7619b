"""A claimed job's inputs: where they are, the snapshot the render reads, and the request built from it.

A job's inputs are in the inbox, except a redo's (``infinitetalkd redo``, docs/daemon.md §4.8): those are
its own copy of the original's archived inputs in ``inputs_dir``, outside the inbox, so the scanner never
sees them as a new drop and nothing the user drops there is touched by the redo.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from daemon import files as fl
from daemon import inbox as ib
from daemon.config import Config
from daemon.jobs import Job
from engine.api import InputError

__all__ = ["InputsGone", "InboxGone", "InputsChanged", "source_dir", "reprepare"]


class InputsGone(Exception):
    pass


class InboxGone(Exception):
    pass


class InputsChanged(Exception):
    pass


def source_dir(config: Config, job: Job) -> Path:
    """The folder the job's inputs are in (and go back to on ``retry``)."""
    return Path(job.inputs_dir) if job.inputs_dir else config.paths.inbox


def reprepare(config: Config, job: Job, snap: Path, *, identity: str, limits: ib.Limits,
              fingerprint: str) -> ib.Prepared:
    """Snapshot the inputs into the job's work folder, then validate and hash the snapshot: the render
    reads exactly the bytes that were fingerprinted. ``fingerprint``: what the snapshot must hash to
    (the job's own; for a redo, its original's). A redo's request gets its first chunk and seed."""
    inbox = source_dir(config, job)
    redo = job.inputs_dir is not None
    if not inbox.is_dir() and not redo:
        raise InboxGone(f"the inbox {inbox} is missing")
    names = [str(i["name"]) for i in job.inputs]
    gone = [n for n in names if not os.path.lexists(inbox / n)]
    if gone:
        if not inbox.is_dir() and not redo:
            raise InboxGone(f"the inbox {inbox} is missing")
        raise InputsGone(f"input files disappeared from {'the inbox' if not redo else inbox} before the render: "
                         f"{', '.join(gone)}")
    try:
        fl.snapshot(inbox, names, snap)
    except FileNotFoundError:
        if not inbox.is_dir() and not redo:
            raise InboxGone(f"the inbox {inbox} is missing") from None
        raise InputsGone("input files disappeared from the inbox while the job started") from None
    roles = {str(i["role"]): str(i["name"]) for i in job.inputs}
    parts = ib.Parts(image=roles.get("image"), video=roles.get("video"), audio=roles.get("audio"),
                     sidecar=roles.get("sidecar"), marker=roles.get("marker"), problem=None, missing=())
    prepared = ib.prepare(snap, job.stem, parts, defaults=config.render, identity=identity, limits=limits)
    if prepared.fingerprint != fingerprint:
        if redo:
            raise InputError(f"the render settings (config.yaml's render:) or the engine changed since job "
                                f"#{job.redo_of} was rendered; a redo needs the same ones")
        raise InputsChanged("the inputs or the engine changed after the job was queued; "
                            "the current files are scanned as a new job")
    if redo:
        request = dataclasses.replace(prepared.request, redo_from_chunk=job.redo_from_chunk or 0,
                                      redo_seed=job.redo_seed)
        prepared = dataclasses.replace(prepared, request=request)
    return prepared
