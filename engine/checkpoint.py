"""Resumable renders: the state a render carries from one chunk to the next, written after every chunk.

A checkpoint directory (layout and validity rules: docs/formats.md §12) holds the video as one closed mp4 segment
per finished chunk (``seg_00000.mp4``, ...; engine/output.py writes them) and checkpoint files
``ckpt_<next_chunk>.safetensors``: the clean context latents the next chunk pins at the front of its window
(exactly the tensor the chunk loop carries, so a resumed render computes the same frames bit for bit), plus in the
safetensors header's metadata the format ``version``, the ``recipe`` (what the frames so far depend on),
``next_chunk``, ``written_frames`` and a ``digest`` over all of it. Each file is written atomically (temporary
file, fsync, os.replace, directory fsync). By default only the newest is kept; with ``keep_previous`` every
chunk's checkpoint stays, so a redo can start at any chunk (:func:`seed_from`).

A checkpoint that cannot be read, fails its digest, is of another recipe or format, or whose segments are missing
is reported by :func:`load` as a reason string; the caller then starts over.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch as st
import torch
from safetensors import SafetensorError

from engine.api import RenderRequest
from engine.events import emit

__all__ = ["VERSION", "Checkpoint", "Recipes", "checkpoint_path", "clear", "fsync_file", "load", "load_at", "prune",
           "recipe_id", "recipes", "save_checkpoint", "seed_from", "segment_path"]

VERSION = 2
_CHUNK = 1 << 20
_NAME = re.compile(r"ckpt_(\d{5,})\.safetensors")
_LEGACY = "checkpoint.safetensors"  # version 1 (one file, the motion frames as pixels): removed by clear()
# What a filesystem answers when it cannot fsync a directory (NFS, SMB/CIFS, some FUSE mounts): the rename is
# then as durable as that filesystem makes it, and there is nothing more to do.
_DIR_FSYNC_REFUSED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EISDIR}


def segment_path(directory: Path, chunk: int) -> Path:
    """Where the finished chunk ``chunk``'s video segment lives."""
    return directory / f"seg_{chunk:05d}.mp4"


def checkpoint_path(directory: Path, next_chunk: int) -> Path:
    """Where the checkpoint written after chunk ``next_chunk - 1`` lives."""
    return directory / f"ckpt_{next_chunk:05d}.safetensors"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _recipe(engine_identity: str, params: dict[str, object], inputs: list[str]) -> str:
    blob = json.dumps({"engine": engine_identity, "params": params, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _input_hashes(req: RenderRequest) -> list[str]:
    inputs: list[str] = []
    for value in vars(req).values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Path):
                inputs.append(_file_sha256(item))
    return inputs


@dataclass(frozen=True)
class Recipes:
    """The recipes of one request's checkpoints: the chunks before ``redo_from`` depend on the request without
    its redo fields (``prefix``), the later ones on all of it (``full``); equal when there is no redo."""

    prefix: str
    full: str
    redo_from: int

    def for_next_chunk(self, next_chunk: int) -> str:
        """The recipe of the checkpoint written after chunk ``next_chunk - 1``."""
        return self.prefix if next_chunk <= self.redo_from else self.full


def recipes(engine_identity: str, req: RenderRequest) -> Recipes:
    """sha256 over everything the frames depend on: the engine identity (model files, numerics), the request's
    settings (seed included; paths by bare name) and the content of every input file."""
    inputs = _input_hashes(req)
    full = _recipe(engine_identity, req.params(), inputs)
    prefix = _recipe(engine_identity, req.without_redo().params(), inputs)
    return Recipes(prefix=prefix, full=full, redo_from=req.redo_from_chunk)


def recipe_id(engine_identity: str, req: RenderRequest) -> str:
    """The recipe of the whole request (:func:`recipes`' ``full``)."""
    return recipes(engine_identity, req).full


@dataclass(frozen=True)
class Checkpoint:
    """What the chunk loop needs to continue at ``next_chunk``."""

    recipe: str
    next_chunk: int
    written_frames: int
    # [16, k, h, w] float32 on the CPU: the clean context latents the next chunk pins (the VAE encoding of the
    # previous chunk's last motion frames); None after the last chunk, when no chunk follows
    context: torch.Tensor | None


def _digest(meta: dict[str, str], tensor_bytes: bytes) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(tensor_bytes)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor | None) -> bytes:
    return b"" if t is None else t.contiguous().numpy().tobytes()


def save_checkpoint(directory: Path, ckpt: Checkpoint, *, keep_previous: bool = False) -> Path:
    """Write ``ckpt`` atomically; then, unless ``keep_previous``, remove the directory's other checkpoints.
    Returns its path."""
    context = None if ckpt.context is None else ckpt.context.detach().to("cpu", torch.float32).contiguous()
    meta = {"version": str(VERSION), "recipe": ckpt.recipe, "next_chunk": str(ckpt.next_chunk),
            "written_frames": str(ckpt.written_frames)}
    meta["digest"] = _digest(meta, _tensor_bytes(context))
    data = st.save({} if context is None else {"context": context}, metadata=meta)
    path = checkpoint_path(directory, ckpt.next_chunk)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
    if not keep_previous:  # a crash before this leaves two: load() takes the newest valid one
        for other in _numbered(directory):
            if other[1] != path:
                other[1].unlink(missing_ok=True)
    return path


def fsync_file(path: Path) -> None:
    """Make ``path``'s data durable before a rename makes it count (a power loss must not leave a renamed but
    empty segment behind a checkpoint that names it)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power loss must not bring back the previous name). Filesystems
    that refuse to fsync a directory (network shares) are left to their own guarantees."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as e:
        if e.errno in _DIR_FSYNC_REFUSED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_REFUSED:
            raise
    finally:
        os.close(fd)


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's metadata (the 8-byte little-endian header length, then the JSON header)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return {str(k): str(v) for k, v in meta.items()}


def _numbered(directory: Path) -> list[tuple[int, Path]]:
    """The directory's checkpoint files as (next_chunk from the name, path), newest first."""
    found = []
    for p in directory.glob("ckpt_*.safetensors"):
        m = _NAME.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _read(path: Path, next_chunk: int, recipe: str) -> Checkpoint | str:
    """The checkpoint at ``path`` if it is intact, says ``next_chunk``, is of ``recipe`` and its segments exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "none"
    except OSError as e:
        return f"unreadable: {e}"
    try:
        meta = _metadata(data)
        context = st.load(data).get("context")
        stored = meta.pop("digest")
        if stored != _digest(meta, _tensor_bytes(context)):
            return "damaged: digest mismatch"
        if meta.get("version") != str(VERSION):
            return f"format version {meta.get('version')}, expected {VERSION}"
        if int(meta["next_chunk"]) != next_chunk:
            return f"damaged: {path.name} says next_chunk {meta['next_chunk']}"
        if meta["recipe"] != recipe:
            return "another recipe (other settings, seed, inputs or engine)"
        ckpt = Checkpoint(recipe=meta["recipe"], next_chunk=next_chunk, written_frames=int(meta["written_frames"]),
                          context=context)
    except (SafetensorError, ValueError, KeyError, UnicodeDecodeError, RuntimeError) as e:
        return f"damaged: {type(e).__name__}: {e}"
    missing = [i for i in range(ckpt.next_chunk) if not segment_path(path.parent, i).is_file()]
    if ckpt.next_chunk < 1 or missing:
        return f"segments missing: {missing[:5]}"
    return ckpt


def load(directory: Path, recipe: str | Callable[[int], str]) -> Checkpoint | str:
    """The newest valid checkpoint in ``directory`` (``recipe``: the expected recipe, or a function of the
    checkpoint's next_chunk giving it, e.g. :meth:`Recipes.for_next_chunk`), else why the newest one is not
    valid (``"none"`` when there is no checkpoint at all). Newer invalid ones skipped on the way are logged."""
    expect = recipe if callable(recipe) else (lambda _n: recipe)
    skipped: list[tuple[Path, str]] = []
    for n, path in _numbered(directory):
        found = _read(path, n, expect(n))
        if isinstance(found, Checkpoint):
            for p, reason in skipped:
                emit("engine.checkpoint_skipped", logging.WARNING, path=str(p), reason=reason)
            return found
        skipped.append((path, found))
    return skipped[0][1] if skipped else "none"


def load_at(directory: Path, next_chunk: int, recipe: str) -> Checkpoint | str:
    """The checkpoint of ``next_chunk`` in ``directory`` if it is valid for ``recipe``, else why not."""
    return _read(checkpoint_path(directory, next_chunk), next_chunk, recipe)


def prune(directory: Path, next_chunk: int) -> None:
    """Before continuing at ``next_chunk``: remove what a later chunk left (newer checkpoints that were not
    valid, segments of chunks to be rendered again, temporary files)."""
    for n, path in _numbered(directory):
        if n > next_chunk:
            path.unlink(missing_ok=True)
    for p in directory.glob("seg_*.mp4"):
        m = re.fullmatch(r"seg_(\d+)\.mp4", p.name)
        if m and int(m.group(1)) >= next_chunk:
            p.unlink(missing_ok=True)
    for p in [*directory.glob("*.tmp"), *directory.glob("seg*.part")]:
        p.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content: a hard link where the filesystem allows (segments and checkpoints are
    never modified in place, only replaced, so sharing the inode is safe), else a copy; atomically either way."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
    os.replace(tmp, dst)


def seed_from(base: Path, directory: Path, next_chunk: int, recipe: str, *,
              with_earlier: bool = False) -> Checkpoint | str:
    """Start ``directory`` (emptied first) with the first ``next_chunk`` chunks of ``base``: their segments and
    the checkpoint of ``next_chunk`` when it is valid for ``recipe``; else, touching nothing, why not. With
    ``with_earlier``, base's earlier checkpoints come along too (so a redo of this redo can start earlier; they
    are checked when used). The checkpoint of ``next_chunk`` comes last, so a crash part-way leaves none and the
    next attempt seeds again."""
    found = load_at(base, next_chunk, recipe)
    if isinstance(found, str):
        return found
    clear(directory)
    for i in range(next_chunk):
        _link_or_copy(segment_path(base, i), segment_path(directory, i))
    for n, path in _numbered(base) if with_earlier else []:
        if n < next_chunk:
            _link_or_copy(path, checkpoint_path(directory, n))
    _fsync_dir(directory)
    _link_or_copy(checkpoint_path(base, next_chunk), checkpoint_path(directory, next_chunk))
    _fsync_dir(directory)
    return load_at(directory, next_chunk, recipe)


def clear(directory: Path) -> None:
    """Remove every checkpoint and segment (a fresh start in ``directory``)."""
    for p in [directory / _LEGACY, *(p for _, p in _numbered(directory)), *directory.glob("*.tmp"),
              *directory.glob("seg_*.mp4"), *directory.glob("seg*.part")]:
        p.unlink(missing_ok=True)
