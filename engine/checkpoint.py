"""Resumable renders: the state a render carries from one chunk to the next, written after every chunk.

A checkpoint directory holds the video as one closed mp4 segment per finished chunk (``seg_00000.mp4``, ...;
engine/render.py writes them) and one checkpoint file, ``checkpoint.safetensors``: the motion context the next
chunk is conditioned on (the colour-matched float frames exactly as the loop keeps them, so a resumed render
computes the same clean latents bit for bit), plus in the safetensors header's metadata the format ``version``,
the ``recipe`` (what the frames depend on), ``next_chunk``, ``written_frames`` and a ``digest`` over all of it.
Only the last checkpoint is kept: each one replaces the previous atomically (temporary file, fsync, os.replace).

A checkpoint that cannot be read, fails its digest, is of another recipe or format, or whose segments are missing
is reported by :func:`load` as a reason string; the caller then starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch as st
import torch
from safetensors import SafetensorError

from engine.api import RenderRequest

__all__ = ["CHECKPOINT_NAME", "VERSION", "Checkpoint", "clear", "load", "recipe_id", "save_checkpoint",
           "segment_path"]

VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"
_CHUNK = 1 << 20


def segment_path(directory: Path, chunk: int) -> Path:
    """Where the finished chunk ``chunk``'s video segment lives."""
    return directory / f"seg_{chunk:05d}.mp4"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def recipe_id(engine_identity: str, req: RenderRequest) -> str:
    """sha256 over everything the frames depend on: the engine identity (model files, numerics), the request's
    settings (seed included; paths by bare name) and the content of every input file."""
    inputs: list[str] = []
    for value in vars(req).values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, Path):
                inputs.append(_file_sha256(item))
    blob = json.dumps({"engine": engine_identity, "params": req.params(), "inputs": inputs}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """What the chunk loop needs to continue at ``next_chunk``."""

    recipe: str
    next_chunk: int
    written_frames: int
    context_frames: torch.Tensor  # [3, motion, H, W] float32 in [-1, 1], CPU: the next chunk's motion context


def _digest(meta: dict[str, str], tensor_bytes: bytes) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(tensor_bytes)
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically, replacing the previous checkpoint; returns its path."""
    frames = ckpt.context_frames.detach().to("cpu", torch.float32).contiguous()
    meta = {"version": str(VERSION), "recipe": ckpt.recipe, "next_chunk": str(ckpt.next_chunk),
            "written_frames": str(ckpt.written_frames)}
    meta["digest"] = _digest(meta, _tensor_bytes(frames))
    data = st.save({"context_frames": frames}, metadata=meta)
    path = directory / CHECKPOINT_NAME
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a power loss must not bring back the previous name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
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


def load(directory: Path, recipe: str) -> Checkpoint | str:
    """The checkpoint in ``directory`` if it is intact, of ``recipe`` and its segments exist, else why not
    (``"none"`` when there is no checkpoint at all)."""
    path = directory / CHECKPOINT_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "none"
    except OSError as e:
        return f"unreadable: {e}"
    try:
        meta = _metadata(data)
        tensors = st.load(data)
        frames = tensors["context_frames"]
        stored = meta.pop("digest")
        if stored != _digest(meta, _tensor_bytes(frames)):
            return "damaged: digest mismatch"
        if meta.get("version") != str(VERSION):
            return f"format version {meta.get('version')}, expected {VERSION}"
        if meta["recipe"] != recipe:
            return "another recipe (other settings, seed, inputs or engine)"
        ckpt = Checkpoint(recipe=meta["recipe"], next_chunk=int(meta["next_chunk"]),
                          written_frames=int(meta["written_frames"]), context_frames=frames)
    except (SafetensorError, ValueError, KeyError, UnicodeDecodeError, RuntimeError) as e:
        return f"damaged: {type(e).__name__}: {e}"
    missing = [i for i in range(ckpt.next_chunk) if not segment_path(directory, i).is_file()]
    if ckpt.next_chunk < 1 or missing:
        return f"segments missing: {missing[:5]}"
    return ckpt


def clear(directory: Path) -> None:
    """Remove the checkpoint and every segment (a fresh start in ``directory``)."""
    for p in [directory / CHECKPOINT_NAME, *directory.glob("*.tmp"), *directory.glob("seg_*.mp4"),
              *directory.glob("seg*.part")]:
        p.unlink(missing_ok=True)
