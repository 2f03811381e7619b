"""Moving a job's files: the snapshot at claim, archive/ after success, failed/ after a refusal or a
failure. The one module that moves the user's bytes (the scanner and the worker call it).

Rules that keep "nothing the user dropped is ever lost" true on full, failing or vanishing disks:
- a move of several files is all or nothing: when one fails (ENOSPC, EIO, EACCES) the files
  already moved go back where they were and the error propagates; the caller retries later;
- error.txt is written before the inputs move, so a folder in failed/ always says why;
- a job renders a snapshot of its inputs taken at claim (a hard link into its work folder, a copy
  across filesystems), so a file replaced or edited in the inbox afterwards is never archived as
  the input of a render that did not read it: it stays in the inbox and becomes a job of its own;
- a job's inputs are settled once: when they are gone from the inbox and a folder named for the job
  in archive/ or failed/ already holds them (another holder of the job, stopped past its lease
  after its last ownership check, settled them), nothing is moved or made a second time
  (docs/daemon.md §4.3).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon import outbox as ob
from daemon.inbox import sha256_file

__all__ = ["is_storage_fault", "snapshot", "settle", "to_failed", "dispose_after_success", "same_file",
           "changed_in_inbox", "holding_folder", "already_settled"]

# Faults of the storage rather than of the job: ENOSPC/EDQUOT (full), EIO (failing disk or a dropped
# share), EROFS (remounted read-only), EACCES/EPERM (a folder the daemon writes made unwritable).
# The job goes back to the queue and the daemon waits; failing every job instead would move every
# drop to failed/ for one fault of the machine. (Unreadable inputs are refused earlier, by the
# ingest checks, as input errors.)
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM})


def is_storage_fault(exc: BaseException) -> bool:
    """An OSError of the storage (full, quota, I/O error, read-only, permissions), looking through
    a few causes."""
    seen: BaseException | None = exc
    for _ in range(8):  # follow "raise ... from" chains a little way
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def same_file(path: Path, recorded: Mapping[str, Any]) -> bool:
    """``path`` is still the file recorded at ingest (size and mtime unchanged, a regular file)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (os.path.isfile(path) and not os.path.islink(path)
            and (st.st_size, st.st_mtime_ns) == (int(recorded["size"]), int(recorded["mtime_ns"])))


def snapshot(inbox: Path, names: Iterable[str], dest: Path) -> None:
    """Hard-link (or, across filesystems, copy) each inbox file into ``dest``. Raises OSError
    (FileNotFoundError when an input is gone; ENOSPC for a copy on a full disk)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = inbox / name, dest / name
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES):
                raise
            shutil.copy2(src, dst, follow_symlinks=False)


def _move_all(moves: list[tuple[Path, Path]]) -> None:
    """Move each (src, dst); on any error move the done ones back and re-raise."""
    done: list[tuple[Path, Path]] = []
    try:
        for src, dst in moves:
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, "exists", str(dst))
            shutil.move(str(src), str(dst))  # a rename on one filesystem, copy + delete across
            done.append((src, dst))
    except OSError:
        for src, dst in reversed(done):
            with contextlib.suppress(OSError):  # if this fails too, the file stays in dst (kept)
                shutil.move(str(dst), str(src))
        raise


def _holds_input(path: Path, recorded: Mapping[str, Any]) -> bool:
    """``path`` holds the input as recorded: size and sha256, or (a refused drop is not hashed) size
    and mtime, which a move keeps."""
    if "sha256" not in recorded:
        return same_file(path, recorded)
    try:
        return (path.is_file() and path.stat().st_size == int(recorded["size"])
                and sha256_file(path) == recorded["sha256"])
    except (OSError, KeyError, ValueError):
        return False


def holding_folder(roots: Iterable[Path], stem: str, job_id: int, inputs: list[dict[str, Any]]) -> Path | None:
    """A folder named for this job (as :func:`daemon.outbox.unique_dir` names them) under one of
    ``roots`` that holds every input as recorded at ingest."""
    for root in roots:
        for name in ob.candidate_names(stem, job_id):
            d = root / name
            if d.is_dir() and all(_holds_input(d / str(i["name"]), i) for i in inputs):
                return d
    return None


def already_settled(roots: Iterable[Path], stem: str, job_id: int, inbox: Path,
                    inputs: list[dict[str, Any]]) -> Path | None:
    """Where the job's inputs were settled already: none of them is in the inbox any more and a folder
    for this job under ``roots`` holds them all. A second holder's snapshot is then not moved too."""
    if any(os.path.lexists(inbox / str(i["name"])) for i in inputs):
        return None
    return holding_folder(roots, stem, job_id, inputs)


def changed_in_inbox(inbox: Path, inputs: list[dict[str, Any]]) -> bool:
    """Some input in the inbox is no longer the recorded file (replaced or edited since the claim)."""
    return any(os.path.lexists(inbox / str(i["name"])) and not same_file(inbox / str(i["name"]), i) for i in inputs)


def settle(inbox: Path, inputs: list[dict[str, Any]], snap: Path | None, dest: Path) -> list[str]:
    """Move a job's inputs into ``dest``: the inbox files while they are still the recorded ones;
    when one was replaced or edited since the claim, the snapshot's copies (the bytes the job used)
    instead, and the inbox files all stay, to be scanned as a new job."""
    from_snap = snap is not None and changed_in_inbox(inbox, inputs)
    moves: list[tuple[Path, Path]] = []
    for i in inputs:
        name = str(i["name"])
        src = inbox / name
        if not from_snap and os.path.lexists(src):
            moves.append((src, dest / name))
        elif snap is not None and os.path.lexists(snap / name):
            moves.append((snap / name, dest / name))
    _move_all(moves)
    ob.fsync_dir(dest)
    return [d.name for _, d in moves]


def _undo_dir(d: Path) -> None:
    """Remove a folder this module just made, unless a user's file is still in it."""
    try:
        (d / "error.txt").unlink(missing_ok=True)
        d.rmdir()
    except OSError:
        pass  # not empty: a file that could not be moved back stays there, never deleted


def to_failed(failed_root: Path, stem: str, job_id: int, inbox: Path, inputs: list[dict[str, Any]], reason: str,
              *, settled_in: Iterable[Path], snap: Path | None = None, log_file: Path | None = None) -> Path:
    """failed/<stem>/: error.txt (one line), the inputs, and the job's log when given; or the folder
    under ``settled_in`` (archive/, failed/) already holding them (:func:`already_settled`).

    All or nothing for error.txt and the inputs: on an OSError nothing moved stays moved, the new
    folder is removed, and the error propagates (the caller tries again later). The log is a
    copy and best effort (the reason is in error.txt and the database)."""
    if (settled := already_settled(settled_in, stem, job_id, inbox, inputs)) is not None:
        return settled
    dest = ob.unique_dir(failed_root, stem, job_id)
    try:
        ob.write_error(dest, reason)
        settle(inbox, inputs, snap, dest)
    except OSError:
        _undo_dir(dest)
        raise
    if log_file is not None and log_file.exists():
        with contextlib.suppress(OSError):
            shutil.copyfile(log_file, dest / ob.fit_name(stem, ".log"))
    return dest


def dispose_after_success(inbox: Path, inputs: list[dict[str, Any]], snap: Path | None, *, after_success: str,
                          archive_root: Path, stem: str, job_id: int, settled_in: Iterable[Path]) -> str:
    """After success: the inputs to archive/<stem>/, or deleted (jobs.after_success); nothing when
    a folder under ``settled_in`` (archive/, failed/) already holds them (:func:`already_settled`)."""
    if (settled := already_settled(settled_in, stem, job_id, inbox, inputs)) is not None:
        return f"already in {settled}"
    present = [i for i in inputs if os.path.lexists(inbox / str(i["name"]))
               or (snap is not None and os.path.lexists(snap / str(i["name"])))]
    if not present:
        return "already gone"
    if after_success == "delete":
        if snap is not None and changed_in_inbox(inbox, present):
            return "deleted (the changed files in the inbox stay, as a new job)"
        for i in present:
            p = inbox / str(i["name"])
            if os.path.lexists(p):
                p.unlink()
        return "deleted"
    dest = ob.unique_dir(archive_root, stem, job_id)
    try:
        settle(inbox, present, snap, dest)
    except OSError:
        _undo_dir(dest)
        raise
    return str(dest)
