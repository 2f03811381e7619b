"""Files out of the daemon: work-in-progress folders, atomic publishing, failed/ and archive/.

Rules (docs/daemon.md §3.4 and §7):
- a render writes into ``outbox/.tmp/<job id>/`` (same filesystem as the outbox), every file is
  fsynced, then renamed into the outbox: readers never see a partial file. The json is renamed
  first (it names the job, so a set interrupted by a crash is recognised as this job's and
  finished under the same name), the mp4 last, so a consumer that waits for the mp4 finds its
  json and log already there; a job that fails after such a crash removes its partial set;
- names fit the filesystem: a stem near the 255-byte limit is shortened (with a hash of the
  whole stem, so different long stems stay apart) before an id or extension is appended;
- nothing is silently overwritten: a name taken by a different result gets the job id appended
  (``alice.17.mp4``); failed/ and archive/ folders get the same treatment;
- error.txt is one line: the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "RESULT_EXTS",
    "fresh_tmp_dir",
    "clean_tmp",
    "choose_base",
    "candidate_names",
    "find_published",
    "write_json",
    "publish",
    "unique_dir",
    "move_files",
    "write_error",
    "fsync_dir",
    "fit_name",
    "remove_partial",
]

RESULT_EXTS = ("json", "log", "mp4")  # publishing order: the json (it names the job) first, the mp4 last
NAME_MAX = 255  # bytes in one file name on every filesystem the daemon supports (ext4, xfs, btrfs, NFS, SMB)
_LONGEST_EXT = ".json"


def fit_name(base: str, suffix: str = "") -> str:
    """``base + suffix``, with ``base`` shortened when the whole would exceed :data:`NAME_MAX`
    bytes: cut on a character boundary and marked with 8 hex digits of the base's sha256."""
    name = base + suffix
    if len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX:
        return name
    tag = "~" + hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    budget = NAME_MAX - len((tag + suffix).encode("utf-8", "surrogateescape"))
    cut = base
    while len(cut.encode("utf-8", "surrogateescape")) > budget:
        cut = cut[:-1]
    return cut + tag + suffix


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_tmp_dir(tmp_root: Path, job_id: int | str) -> Path:
    """An empty work folder for one attempt of one job (left-overs of an earlier attempt removed)."""
    d = tmp_root / str(job_id)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def clean_tmp(tmp_root: Path) -> list[str]:
    """Remove every work folder (at start no job is running). Returns what was removed."""
    removed = []
    if tmp_root.is_dir():
        for child in sorted(tmp_root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
            removed.append(child.name)
    tmp_root.mkdir(parents=True, exist_ok=True)
    return removed


def _candidates(stem: str, job_id: int) -> Iterable[str]:
    """Base names to try, each short enough for the longest extension appended to it."""
    def fit(tail: str) -> str:
        return fit_name(stem, tail + _LONGEST_EXT)[: -len(_LONGEST_EXT)]

    yield fit("")
    yield fit(f".{job_id}")
    n = 2
    while True:
        yield fit(f".{job_id}.{n}")
        n += 1


def candidate_names(stem: str, job_id: int, limit: int = 20) -> list[str]:
    """The first ``limit`` names :func:`unique_dir` and :func:`choose_base` try for a job, in order."""
    out: list[str] = []
    for name in _candidates(stem, job_id):
        if len(out) >= limit:
            break
        out.append(name)
    return out


def _json_job_id(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("job_id")
    except (OSError, ValueError, AttributeError):
        return None


def choose_base(outbox: Path, stem: str, job_id: int, exclude: Collection[str] = ()) -> str:
    """The first base name whose mp4/json/log are all free (or are this job's own unfinished publish),
    skipping ``exclude`` (names the job database gave to other jobs)."""
    for base in _candidates(stem, job_id):
        if base in exclude:
            continue
        taken = [ext for ext in RESULT_EXTS if (outbox / f"{base}.{ext}").exists()]
        if not taken:
            return base
        # A crash between the renames of an earlier attempt: json (and log) there, no mp4 yet.
        if "mp4" not in taken and "json" in taken and _json_job_id(outbox / f"{base}.json") == job_id:
            return base
    raise AssertionError("unreachable")


def remove_partial(outbox: Path, stem: str, job_id: int) -> list[str]:
    """Remove this job's interrupted publish (its json, with the log, and no mp4): called when the
    job ends without publishing, so no partial set stays visible. Returns the names removed."""
    removed: list[str] = []
    for i, base in enumerate(_candidates(stem, job_id)):
        if i > 20:
            break
        j = outbox / f"{base}.json"
        try:
            if os.path.lexists(outbox / f"{base}.mp4") or not os.path.lexists(j) or _json_job_id(j) != job_id:
                continue
            for ext in ("log", "json"):
                p = outbox / f"{base}.{ext}"
                p.unlink(missing_ok=True)
                removed.append(p.name)
        except OSError:
            continue  # a failing outbox: the set stays, and is finished or removed at the job's next end
    return removed


def find_published(outbox: Path, stem: str, job_id: int, run: str) -> dict[str, Any] | None:
    """The result document of this run of the job if an earlier attempt published it completely
    (and the process died before the database said done). ``run`` tells a re-render of the same job
    (redo_finished: render) from a retry of this one. Looks at the names :func:`choose_base` gives."""
    for i, base in enumerate(_candidates(stem, job_id)):
        if i > 20:
            break
        j = outbox / f"{base}.json"
        if not j.exists():
            continue
        try:
            doc = json.loads(j.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(doc, dict) and doc.get("job_id") == job_id and doc.get("run") == run
                and (outbox / f"{base}.mp4").exists()):
            return doc
    return None


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write and fsync (a full disk raises here, before anything is published)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def publish(tmp_dir: Path, outbox: Path, base: str, files: dict[str, Path]) -> dict[str, str]:
    """fsync and rename ``files`` ({ext: path in tmp_dir}) to ``outbox/<base>.<ext>``, mp4 last."""
    out: dict[str, str] = {}
    for ext in RESULT_EXTS:
        src = files.get(ext)
        if src is None:
            continue
        _fsync_file(src)
        dst = outbox / f"{base}.{ext}"
        os.replace(src, dst)  # same filesystem: atomic; choose_base made sure dst is ours to take
        out[ext] = str(dst)
    fsync_dir(outbox)
    return out


def unique_dir(parent: Path, stem: str, job_id: int) -> Path:
    """Create ``parent/<stem>`` or, if taken, ``parent/<stem>.<job id>[.n]`` (mkdir is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    for name in _candidates(stem, job_id):
        d = parent / name
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def move_files(paths: Iterable[Path], dest: Path) -> list[str]:
    """Move files (symlinks as links) into ``dest``; names that are gone are skipped."""
    moved = []
    for p in paths:
        if not os.path.lexists(p):
            continue
        target = dest / p.name
        if os.path.lexists(target):
            raise FileExistsError(f"{target} exists")
        shutil.move(str(p), str(target))  # a rename on one filesystem, copy + delete across
        moved.append(p.name)
    fsync_dir(dest)
    return moved


def write_error(dest: Path, reason: str) -> Path:
    """``dest/error.txt``: the reason on one line, written aside and renamed into place, so whoever
    watches failed/ never reads it empty or half written."""
    path, tmp = dest / "error.txt", dest / ".error.txt.tmp"
    try:
        tmp.write_text(" ".join(reason.split()) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path
