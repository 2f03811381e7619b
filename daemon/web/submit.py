"""A submission from the page or the API becomes ordinary files in the inbox.

Every file is first written under a name the scanner ignores (a dot-file, see
:func:`daemon.inbox.is_ignored`), then renamed to ``<stem>.<ext>`` without replacing anything,
and the job is committed with an empty ``<stem>.ready`` created last: the daemon's ingest
(validation, fingerprint, dedupe) is the only way a job is created. The sidecar and the second
speech file land before the speech and the portrait, so the group is never complete without its
settings. On any error every file of the submission is removed again.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from daemon.inbox import AUDIO_EXTS, IMAGE_EXTS, MARKER_EXT, VIDEO_EXTS, split_name
from engine.api import InputError
from engine.settings import request_from_settings

__all__ = ["Upload", "SubmitError", "TooLarge", "sanitize_stem", "choose_stem", "check_settings", "write_submission"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_STEM = 80
# Settings the page and the API do not take: files are uploads, not names of inbox files.
FILE_SETTINGS = ("audio2", "masks")


class SubmitError(ValueError):
    """A bad submission (400); the message names the field."""


class TooLarge(SubmitError):
    """An uploaded file is over jobs.max_input_mb (413)."""


@dataclass(frozen=True)
class Upload:
    role: str  # "portrait" | "speech" | "speech2"
    filename: str  # as the client named it (only its extension is used)
    file: BinaryIO


def sanitize_stem(raw: str) -> str:
    """Letters, digits, '-' and '_' only (anything else becomes '_'), at most MAX_STEM characters."""
    stem = _UNSAFE.sub("_", raw).strip("_-")[:MAX_STEM].strip("_-")
    return stem or "job"


def choose_stem(wanted: str, inbox: Path, taken: Callable[[str], bool]) -> str:
    """``wanted`` or ``wanted-2``, ``-3``, ...: a stem no inbox file and no job (``taken``) uses yet."""
    in_inbox = set()
    with os.scandir(inbox) as it:
        for de in it:
            split = split_name(de.name)
            if split is not None:
                in_inbox.add(split[0])
    n = 1
    while True:
        stem = wanted if n == 1 else f"{wanted}-{n}"
        if stem not in in_inbox and not taken(stem):
            return stem
        n += 1


def _ext(upload: Upload, allowed: frozenset[str], what: str) -> str:
    ext = upload.filename.rsplit(".", 1)[-1].lower() if "." in upload.filename else ""
    if ext not in allowed:
        raise SubmitError(f"{upload.role}: {upload.filename!r} is not a {what} "
                          f"(allowed: {', '.join('.' + e for e in sorted(allowed))})")
    return ext


def check_settings(settings: Mapping[str, object], defaults: Mapping[str, object]) -> None:
    """Validate settings with the code that validates sidecars (file names are the inbox's business)."""
    for key in FILE_SETTINGS:
        if key in settings:
            raise SubmitError(f"settings: '{key}' names inbox files; upload the second speech file as speech2 "
                              "(masks are not taken here: drop them into the inbox with a sidecar)")
    try:
        request_from_settings(settings, audio=Path("speech.wav"), image=Path("portrait.png"),
                              resolve=lambda _k, name: Path(name), defaults=defaults)
    except InputError as exc:
        raise SubmitError(f"settings: {exc}") from None


def _copy(src: BinaryIO, dst: Path, max_bytes: int, role: str) -> int:
    n = 0
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(1 << 20):
            n += len(chunk)
            if n > max_bytes:
                raise TooLarge(f"{role}: the file is larger than jobs.max_input_mb = {max_bytes >> 20} MiB")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if n == 0:
        raise SubmitError(f"{role}: the file is empty")
    return n


def _place(tmp: Path, final: Path) -> None:
    """Rename without replacing a file someone else put there meanwhile."""
    try:
        os.link(tmp, final)  # fails with EEXIST instead of replacing
    except FileExistsError:
        raise SubmitError(f"{final.name} appeared in the inbox meanwhile; submit again") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(final):  # a share without hard links: check, then rename
            raise SubmitError(f"{final.name} appeared in the inbox meanwhile; submit again") from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


def write_submission(inbox: Path, stem: str, uploads: list[Upload], settings: Mapping[str, object],
                     max_file_bytes: int) -> list[str]:
    """Write one job into the inbox (see the module docstring). Returns the names written."""
    by_role = {u.role: u for u in uploads}
    portrait, speech, speech2 = by_role.get("portrait"), by_role.get("speech"), by_role.get("speech2")
    if portrait is None or speech is None:
        raise SubmitError("a submission needs a portrait (image or video) and a speech file")
    kinds = IMAGE_EXTS | VIDEO_EXTS
    plan: list[tuple[Upload | None, str]] = []  # (upload or None for the sidecar, final name), in rename order
    doc = dict(settings)
    if speech2 is not None:
        doc["audio2"] = f"{stem}_speaker2.{_ext(speech2, AUDIO_EXTS, 'speech file')}"
    if doc:
        plan.append((None, f"{stem}.yaml"))
    if speech2 is not None:
        plan.append((speech2, str(doc["audio2"])))
    plan.append((speech, f"{stem}.{_ext(speech, AUDIO_EXTS, 'speech file')}"))
    plan.append((portrait, f"{stem}.{_ext(portrait, kinds, 'portrait image or source video')}"))
    tag = secrets.token_hex(6)
    temps: list[Path] = []
    placed: list[Path] = []
    try:
        for upload, name in plan:
            tmp = inbox / f".web-{tag}-{name}"
            temps.append(tmp)
            if upload is None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    yaml.safe_dump(doc, f, allow_unicode=True, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                _copy(upload.file, tmp, max_file_bytes, upload.role)
        for (_, name), tmp in zip(plan, temps):
            _place(tmp, inbox / name)
            placed.append(inbox / name)
        marker = inbox / f"{stem}.{MARKER_EXT}"
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        placed.append(marker)
    except BaseException:
        for p in (*temps, *placed):
            p.unlink(missing_ok=True)
        raise
    return [p.name for p in placed]
