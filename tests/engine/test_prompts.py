"""The prompt-embedding cache: memory first, then disk, the encoder only on a miss."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.prompts import PromptCache


class Counting:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[torch.Tensor]:
        self.calls.append(list(texts))
        return [torch.full((len(t), 4), float(len(t))) for t in texts]


def test_memory_then_disk_then_encoder(tmp_path: Path) -> None:
    enc = Counting()
    cache = PromptCache(enc, "umt5:abc", tmp_path)
    a, b = cache.get(["hello", "negative words"])
    assert a.shape == (5, 4) and b.shape == (14, 4)
    assert enc.calls == [["hello", "negative words"]]
    cache.get(["hello"])
    assert len(enc.calls) == 1  # memory hit

    fresh = PromptCache(enc, "umt5:abc", tmp_path)  # a new process: disk hit
    (again,) = fresh.get(["hello"])
    assert torch.equal(again, a) and len(enc.calls) == 1

    other = PromptCache(enc, "umt5:other-file", tmp_path)  # another text encoder: no reuse
    other.get(["hello"])
    assert len(enc.calls) == 2


def test_damaged_cache_file_is_re_encoded(tmp_path: Path) -> None:
    enc = Counting()
    PromptCache(enc, "id", tmp_path).get(["x"])
    for f in (tmp_path / "prompts").glob("*.safetensors"):
        f.write_bytes(b"not a tensor")
    (x,) = PromptCache(enc, "id", tmp_path).get(["x"])
    assert x.shape == (1, 4) and len(enc.calls) == 2


def test_duplicates_in_one_call_encode_once() -> None:
    enc = Counting()
    PromptCache(enc, "id", None).get(["same", "same"])
    assert enc.calls == [["same"]]
