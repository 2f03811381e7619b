"""Prompt embeddings, cached by text so umT5 need not run (or sit on the GPU) for every job.

Two levels: an in-memory dict for this process, and ``<cache_dir>/prompts/<sha256>.pt`` on disk,
keyed by the text encoder's file identity and the exact prompt text. The encoder is called only on
a miss, through a callable the engine supplies (it moves umT5 to the device for that call).
Files are safetensors (no pickles are ever read back); a damaged file is re-encoded and replaced.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EncodeFn = Callable[[list[str]], list[torch.Tensor]]


class PromptCache:
    def __init__(self, encode: EncodeFn, encoder_identity: str, cache_dir: Path | None, max_items: int = 64):
        self._encode = encode
        self._identity = encoder_identity
        self._dir = cache_dir / "prompts" if cache_dir is not None else None
        self._mem: dict[str, torch.Tensor] = {}
        self._max = max_items
        self.misses = 0  # encoder calls, for tests and logs

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self._identity}\0{text}".encode()).hexdigest()

    def get(self, texts: list[str]) -> list[torch.Tensor]:
        """Embeddings [L_i, d] (CPU) for each text, encoding only the ones not cached."""
        out: dict[str, torch.Tensor] = {}
        todo: list[str] = []
        for text in texts:
            key = self._key(text)
            if key in self._mem:
                out[text] = self._mem[key]
                continue
            disk = self._load(key)
            if disk is not None:
                self._remember(key, disk)
                out[text] = disk
            elif text not in todo:
                todo.append(text)
        if todo:
            self.misses += len(todo)
            for text, emb in zip(todo, self._encode(todo), strict=True):
                emb = emb.detach().to("cpu")
                key = self._key(text)
                self._remember(key, emb)
                self._store(key, emb)
                out[text] = emb
        return [out[t] for t in texts]

    def _remember(self, key: str, emb: torch.Tensor) -> None:
        if len(self._mem) >= self._max:
            self._mem.pop(next(iter(self._mem)))
        self._mem[key] = emb

    def _load(self, key: str) -> torch.Tensor | None:
        if self._dir is None:
            return None
        path = self._dir / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["embedding"]
        except Exception:  # noqa: BLE001 - any damage means "not cached": re-encode and overwrite
            return None

    def _store(self, key: str, emb: torch.Tensor) -> None:
        if self._dir is None:
            return
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._dir, suffix=".tmp")
            os.close(fd)
            save_file({"embedding": emb.contiguous()}, tmp)
            os.replace(tmp, self._dir / f"{key}.safetensors")
        except OSError:
            pass  # a read-only or full cache dir only costs speed, never a job
