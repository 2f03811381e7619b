"""The inbox contract, as pure functions: names, grouping, stability, checks, fingerprint, request.

A job is ``<stem>.<image or video>`` + ``<stem>.<audio>`` (+ ``<stem>.yaml``, + ``<stem>.ready``).
The inbox is hostile (docs/daemon.md §7): names in a sidecar must be bare file names in the
inbox; symlinks and non-regular files are refused; YAML is parsed with a size cap and without
aliases; images are opened with a format allow-list and a pixel cap; magic bytes must match the
extension. Every refusal is an :class:`engine.api.InputError` with a one-line message.

Nothing here touches the database or moves files; :mod:`daemon.watcher` does that.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from PIL import Image, UnidentifiedImageError

from engine.api import InputError, RenderRequest
from engine.settings import request_from_settings
from engine.sniff import sniff

__all__ = [
    "IMAGE_EXTS", "VIDEO_EXTS", "AUDIO_EXTS", "SIDECAR_EXTS", "MARKER_EXT",
    "Entry", "Group", "Parts", "Limits", "Prepared", "StabilityTracker",
    "is_ignored", "split_name", "list_inbox", "group_entries", "parts_of", "sidecar_refs",
    "load_sidecar", "check_bare_name", "check_file", "check_image", "check_audio", "check_video",
    "sha256_file", "prepare", "one_line", "StillWriting", "wav_duration",
]

IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "webp"})
VIDEO_EXTS = frozenset({"mp4", "mov", "mkv", "webm"})
AUDIO_EXTS = frozenset({"wav", "flac", "mp3", "m4a", "aac", "ogg", "opus"})
SIDECAR_EXTS = frozenset({"yaml", "yml"})
MARKER_EXT = "ready"
_KNOWN_EXTS = IMAGE_EXTS | VIDEO_EXTS | AUDIO_EXTS | SIDECAR_EXTS | {MARKER_EXT}

# Temporary names of browsers, download managers, editors, sync tools and NAS/OS metadata.
_IGNORED_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", ".!qb",
                     ".!ut", ".opdownload", ".swp", ".swx", ".lock", "~")
_IGNORED_NAMES = frozenset({"desktop.ini", "thumbs.db", "icon\r"})
_IGNORED_PARTS = ("-tdarrcachefile-", "~syncthing~", ".syncthing.")


class StillWriting(InputError):
    """A file whose own header says more is coming (a WAV's data size beyond the end of the file):
    the scanner waits for the rest, up to ``watch.incomplete_after_s``, then refuses it."""


# Settings are small numbers; an integer this long in a sidecar is an error in any key, and
# int -> float conversion or printing it would fail later (OverflowError, ValueError) instead.
_MAX_SIDECAR_INT = 2**63


def one_line(text: str) -> str:
    """Collapse whitespace so a reason fits on one log/error line."""
    return " ".join(str(text).split())


def is_ignored(name: str) -> bool:
    """Names that are never (yet) part of a job: dot-files, partial downloads, sync temp names."""
    low = name.lower()
    return (
        name.startswith((".", "~", "@", "#"))  # dot-files (rsync .name.XXXXXX), ~$office, @eaDir, #emacs#
        or low.endswith(_IGNORED_SUFFIXES)
        or low in _IGNORED_NAMES
        or any(p in low for p in _IGNORED_PARTS)
    )


def split_name(name: str) -> tuple[str, str] | None:
    """``"alice.PNG"`` -> ``("alice", "png")``; None for ignored names and unknown extensions."""
    if is_ignored(name) or "." not in name:
        return None
    stem, ext = name.rsplit(".", 1)
    ext = ext.lower()
    if not stem or ext not in _KNOWN_EXTS:
        return None
    return stem, ext


# --------------------------------------------------------------------------------------------
# Listing and grouping
# --------------------------------------------------------------------------------------------

EntryKind = Literal["file", "symlink", "other"]


@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    mtime_ns: int
    kind: EntryKind


def _entry(name: str, st: os.stat_result) -> Entry:
    if stat.S_ISLNK(st.st_mode):
        kind: EntryKind = "symlink"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    else:
        kind = "other"
    return Entry(name, st.st_size, st.st_mtime_ns, kind)


def list_inbox(inbox: Path) -> list[Entry]:
    """Top-level entries of the inbox (lstat: symlinks are reported as such). Folders are skipped."""
    out = []
    with os.scandir(inbox) as it:
        for de in it:
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or is_ignored(de.name):
                continue
            out.append(_entry(de.name, st))
    return out


def stat_entry(inbox: Path, name: str) -> Entry | None:
    try:
        return _entry(name, os.lstat(inbox / name))
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass
class Group:
    """The files of one stem, by extension."""

    stem: str
    entries: dict[str, Entry] = field(default_factory=dict)  # name -> entry
    by_ext: dict[str, list[str]] = field(default_factory=dict)

    def names(self, exts: Iterable[str]) -> list[str]:
        return sorted(n for e in exts for n in self.by_ext.get(e, []))


def group_entries(entries: Iterable[Entry]) -> dict[str, Group]:
    groups: dict[str, Group] = {}
    for e in entries:
        split = split_name(e.name)
        if split is None:
            continue
        stem, ext = split
        g = groups.setdefault(stem, Group(stem))
        g.entries[e.name] = e
        g.by_ext.setdefault(ext, []).append(e.name)
    return groups


@dataclass(frozen=True)
class Parts:
    """What a group holds. ``problem`` is a reason to refuse it; ``missing`` what it still lacks."""

    image: str | None
    video: str | None
    audio: str | None
    sidecar: str | None
    marker: str | None
    problem: str | None
    missing: tuple[str, ...]


def parts_of(g: Group) -> Parts:
    images, videos = g.names(IMAGE_EXTS), g.names(VIDEO_EXTS)
    audios, sidecars, markers = g.names(AUDIO_EXTS), g.names(SIDECAR_EXTS), g.names([MARKER_EXT])
    problem = None
    for what, names in (("portrait images", images), ("source videos", videos), ("speech files", audios),
                        ("sidecars", sidecars)):
        if len(names) > 1:
            problem = f"stem '{g.stem}' has several {what} ({', '.join(names)}); keep one per job"
    if images and videos and problem is None:
        problem = f"stem '{g.stem}' has both an image and a video ({images[0]}, {videos[0]}); keep one"
    missing = []
    if not images and not videos:
        missing.append("a portrait image (.png/.jpg/.webp) or source video (.mp4/.mov/.mkv/.webm)")
    if not audios:
        missing.append("a speech file (.wav/.flac/.mp3/.m4a/.aac/.ogg/.opus)")
    return Parts(
        image=images[0] if images else None,
        video=videos[0] if videos else None,
        audio=audios[0] if audios else None,
        sidecar=sidecars[0] if sidecars else None,
        marker=markers[0] if markers else None,
        problem=problem,
        missing=tuple(missing),
    )


class StabilityTracker:
    """Remembers each group's signature and since when it has not changed.

    A signature is the sorted (name, size, mtime_ns) of all its files; any change restarts the
    clock. The window must exceed a network filesystem's attribute cache (NFS acregmax, CIFS actimeo).
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[Any, ...], float]] = {}

    def observe(self, key: str, signature: tuple[Any, ...], now: float) -> float:
        """Record the signature; returns how many seconds it has been unchanged."""
        prev = self._seen.get(key)
        if prev is None or prev[0] != signature:
            self._seen[key] = (signature, now)
            return 0.0
        return now - prev[1]

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)

    def keep_only(self, keys: Iterable[str]) -> None:
        keep = set(keys)
        for k in list(self._seen):
            if k not in keep:
                del self._seen[k]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: a few hundred bytes of ``*a`` references can expand into
    gigabytes when the document is walked or logged (the "billion laughs" of YAML)."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
        return super().compose_node(parent, index)


def load_sidecar(path: Path, max_bytes: int) -> dict[str, object]:
    """Parse a sidecar: at most ``max_bytes``, UTF-8, YAML without aliases, a mapping with text keys."""
    name = path.name
    st = check_file(path, max_bytes=max_bytes, allow_empty=True, what="sidecar")
    del st
    with open(path, "rb") as f:  # size already checked; symlinks refused by check_file
        data = f.read(max_bytes + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{name}: the sidecar is not UTF-8 text") from None
    try:
        doc = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{name}: YAML error{where}: {one_line(exc.problem or exc.context or 'invalid')}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise InputError(f"{name}: YAML error: {one_line(str(exc)) or 'nested too deeply'}") from None
    except ValueError as exc:  # e.g. an integer beyond Python's int-from-text digit limit
        raise InputError(f"{name}: a value cannot be read ({one_line(str(exc))[:200]})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"{name}: the sidecar must be a mapping of setting: value lines, not {type(doc).__name__}")
    for key in doc:
        if not isinstance(key, str):
            raise InputError(f"{name}: setting names must be text (got {_short_repr(key)})")
        _check_numbers(name, key, doc[key])
    return doc


def _short_repr(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _MAX_SIDECAR_INT:
        return f"a {value.bit_length() * 30103 // 100000 + 1}-digit number"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_numbers(name: str, key: str, value: object, depth: int = 0) -> None:
    """Refuse integers no setting could accept, with the key's name, before any conversion."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _MAX_SIDECAR_INT:
        raise InputError(f"{name}: setting '{key}': {_short_repr(value)} is out of range")
    if depth < 4 and isinstance(value, (list, dict)):
        for v in (value.values() if isinstance(value, dict) else value):
            _check_numbers(name, key, v, depth + 1)


def sidecar_refs(settings: Mapping[str, object]) -> list[tuple[str, str]]:
    """The (key, file name) pairs a sidecar names: ``audio2`` and each of ``masks``."""
    refs: list[tuple[str, str]] = []
    a2 = settings.get("audio2")
    if isinstance(a2, str):
        refs.append(("audio2", a2))
    masks = settings.get("masks")
    if isinstance(masks, list):
        refs.extend(("masks", m) for m in masks if isinstance(m, str))
    return refs


def check_bare_name(key: str, name: str) -> str:
    """A file name given in a sidecar must name a file directly in the inbox."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or name.startswith(".") or len(name.encode("utf-8", "surrogateescape")) > 255):
        raise InputError(f"setting '{key}': {name!r} must be a bare file name in the inbox "
                         "(no folders, no '..', not absolute, not hidden)")
    return name


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def check_file(path: Path, *, max_bytes: int, allow_empty: bool = False, what: str = "file") -> os.stat_result:
    """lstat + open with O_NOFOLLOW: a readable, non-empty regular file, not a symlink, not too big."""
    name = path.name
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{name}: {what} not found in the inbox") from None
    if stat.S_ISLNK(st.st_mode):
        raise InputError(f"{name} is a symbolic link; copy the file itself into the inbox")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{name} is not a regular file")
    if st.st_size == 0 and not allow_empty:
        raise InputError(f"{name} is empty (0 bytes)")
    if st.st_size > max_bytes:
        raise InputError(f"{name} is {_size(st.st_size)}, more than the limit of {_size(max_bytes)}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        raise InputError(f"{name} cannot be read (permission denied)") from None
    except OSError as exc:
        raise InputError(f"{name} cannot be opened ({exc.strerror})") from None
    try:
        fst = os.fstat(fd)
    finally:
        os.close(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        raise InputError(f"{name} was replaced while it was being checked")
    return st


_IMAGES = ("png", "jpeg", "webp")
_EXPECTED = {
    "png": _IMAGES, "jpg": _IMAGES, "jpeg": _IMAGES, "webp": _IMAGES,
    "wav": ("wav",), "flac": ("flac",), "mp3": ("mp3", "aac"), "aac": ("aac", "mp3"), "m4a": ("isobmff",),
    "ogg": ("ogg",), "opus": ("ogg",),
    "mp4": ("isobmff",), "mov": ("isobmff",), "mkv": ("matroska",), "webm": ("matroska",),
}


def _check_magic(path: Path) -> str:
    """The file's kind by the shared sniffer (engine/sniff.py); it must fit the extension."""
    ext = path.suffix.lower().lstrip(".")
    try:
        kind = sniff(path, follow_symlinks=False)
    except OSError as exc:
        raise InputError(f"{path.name} cannot be read ({exc.strerror})") from None
    if kind not in _EXPECTED.get(ext, ()):
        looks = "an unknown format" if kind is None else kind
        raise InputError(f"{path.name} is not a .{ext} file (its first bytes look like {looks})")
    return kind


_IMAGE_FORMATS = ["PNG", "JPEG", "WEBP"]
# A portrait is framed by cover-resizing to a video bucket (aspect between 1:2 and 2:1); an image
# far outside that is a strip of pixels, and its resize would need memory out of all proportion.
MAX_IMAGE_ASPECT = 8


def check_image(path: Path, max_pixels: int) -> tuple[int, int]:
    """Magic bytes, Pillow with a format allow-list, a pixel cap before decoding, then a full decode."""
    _check_magic(path)
    name = path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_IMAGE_FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise InputError(f"{name} is {w}x{h} = {w * h} pixels, more than "
                                     f"jobs.max_image_pixels = {max_pixels}")
                if max(w, h) > MAX_IMAGE_ASPECT * max(1, min(w, h)):
                    raise InputError(f"{name} is {w}x{h}: more than {MAX_IMAGE_ASPECT} times as wide as high "
                                     "(or high as wide); crop it to the portrait")
                if getattr(im, "n_frames", 1) > 1:
                    raise InputError(f"{name} is animated; give a single still image")
                im.verify()
            with Image.open(path, formats=_IMAGE_FORMATS) as im:
                # verify() does not decode pixel data; a truncated file fails only here. JPEG decodes
                # at a reduced scale (draft): every DCT block is still read, at 1/64 of the memory.
                im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{name} has too many pixels (decompression bomb)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{name} is not a readable PNG, JPEG or WebP image ({one_line(str(exc))})") from None
    return w, h


_STREAMING_SIZES = (0, 0xFFFFFFFF)  # data sizes written by tools that stream to a pipe (size unknown)


def wav_duration(path: Path) -> float | None:
    """Seconds of audio in a RIFF/WAVE file, from its fmt chunk and its real data length.

    A data size of 0 or 0xFFFFFFFF (written by tools that stream to a pipe and never seek back) means
    "to the end of the file". A size beyond the end of the file raises :class:`StillWriting`: the
    file is still being written, or was cut short. None when the header is not plain PCM-style
    RIFF (RF64 or unusual layouts: the renderer decodes it and enforces max_duration_s).
    """
    name = path.name
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        byte_rate = 0
        pos = 12
        for _ in range(64):  # a WAV has a handful of chunks before its data
            f.seek(pos)
            hdr = f.read(8)
            if len(hdr) < 8:
                raise InputError(f"{name} is not a readable WAV file (no audio data chunk)")
            cid, csize = hdr[:4], int.from_bytes(hdr[4:8], "little")
            if cid == b"fmt ":
                fmt = f.read(min(csize, 40))
                if len(fmt) < 16:
                    raise InputError(f"{name} is not a readable WAV file (truncated header)")
                rate = int.from_bytes(fmt[4:8], "little")
                if rate <= 0:
                    raise InputError(f"{name} is not a readable WAV file (sample rate {rate})")
                byte_rate = int.from_bytes(fmt[8:12], "little")
            elif cid == b"data":
                if byte_rate <= 0:
                    return None
                have = size - (pos + 8)
                if csize in _STREAMING_SIZES:
                    csize = have
                elif csize > have:
                    raise StillWriting(f"{name} is truncated or still being written: its header announces "
                                       f"{csize} bytes of audio, the file holds {have}")
                return csize / byte_rate
            pos += 8 + csize + (csize & 1)
            if pos >= size:
                raise InputError(f"{name} is not a readable WAV file (no audio data chunk)")
    return None


def check_audio(path: Path) -> float | None:
    """Magic bytes; for WAV also the duration from the header (None when not cheaply known)."""
    kind = _check_magic(path)
    if kind != "wav":
        return None  # other containers (and RF64): the renderer decodes and enforces max_duration_s
    return wav_duration(path)


def check_video(path: Path) -> None:
    _check_magic(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Building the job
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_input_bytes: int
    max_sidecar_bytes: int
    max_image_pixels: int


@dataclass(frozen=True)
class Prepared:
    stem: str
    request: RenderRequest
    inputs: list[dict[str, Any]]  # role, name, size, mtime_ns, sha256 for every file of the job
    params: dict[str, Any]
    fingerprint: str

    @property
    def names(self) -> list[str]:
        return [str(i["name"]) for i in self.inputs]

    @property
    def signature(self) -> tuple[tuple[str, int, int], ...]:
        return tuple(sorted((str(i["name"]), int(i["size"]), int(i["mtime_ns"])) for i in self.inputs))


# Parameters that name files: the fingerprint covers those files by content and role instead.
_PATH_PARAMS = ("audio", "image", "video", "masks")


def fingerprint(inputs: list[dict[str, Any]], params: Mapping[str, Any], identity: str) -> str:
    content = sorted((str(i["role"]), str(i["sha256"])) for i in inputs if i["role"] not in ("sidecar", "marker"))
    doc = {
        "inputs": content,
        "params": {k: v for k, v in params.items() if k not in _PATH_PARAMS},
        "engine": identity,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def prepare(inbox: Path, stem: str, parts: Parts, *, defaults: Mapping[str, object], identity: str,
            limits: Limits) -> Prepared:
    """Validate a complete group and build its request. Raises InputError with a one-line reason."""
    if parts.problem:
        raise InputError(parts.problem)
    if parts.missing or parts.audio is None:
        raise InputError(f"stem '{stem}' is missing {' and '.join(parts.missing)}")
    files: list[tuple[str, Path, os.stat_result]] = []  # (role, path, stat)

    def add(role: str, name: str, *, allow_empty: bool = False, max_bytes: int = limits.max_input_bytes) -> Path:
        path = inbox / name
        files.append((role, path, check_file(path, max_bytes=max_bytes, allow_empty=allow_empty)))
        return path

    settings: dict[str, object] = {}
    if parts.sidecar:
        sidecar = add("sidecar", parts.sidecar, allow_empty=True, max_bytes=limits.max_sidecar_bytes)
        settings = load_sidecar(sidecar, limits.max_sidecar_bytes)
    if parts.marker:
        add("marker", parts.marker, allow_empty=True)
    audio = add("audio", parts.audio)
    durations = [(audio.name, check_audio(audio))]
    image = video = None
    if parts.image:
        image = add("image", parts.image)
        check_image(image, limits.max_image_pixels)
    else:
        assert parts.video is not None
        video = add("video", parts.video)
        check_video(video)

    own = {p.name for _, p, _ in files}

    def resolve(key: str, name: str) -> Path:
        check_bare_name(key, name)
        if name in own:
            raise InputError(f"setting '{key}': {name!r} is already one of the job's own files")
        # masks keep their order (mask i belongs to speaker i), so the role carries the index
        role = "audio2" if key == "audio2" else f"mask{sum(r.startswith('mask') for r, _, _ in files) + 1}"
        path = add(role, name)
        own.add(name)
        if path.resolve().parent != inbox.resolve():  # belt and braces: bare names cannot escape
            raise InputError(f"setting '{key}': {name!r} is outside the inbox")
        if key == "audio2":
            durations.append((name, check_audio(path)))
        else:
            check_image(path, limits.max_image_pixels)
        return path

    request = request_from_settings(settings, audio=audio, image=image, video=video, resolve=resolve,
                                    defaults=defaults)
    for name, seconds in durations:
        if seconds is not None and seconds > request.max_duration_s:
            raise InputError(f"{name} is {seconds:.1f} s long, more than max_duration_s = {request.max_duration_s:g} s")

    inputs = [
        {"role": role, "name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
        for role, path, st in files
    ]
    params = request.params()
    return Prepared(stem=stem, request=request, inputs=inputs, params=params,
                    fingerprint=fingerprint(inputs, params, identity))
