"""bench/common.py's real-weights path: the benchmarks' DiT is the one the engine loads from the same folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bench.common import bench_dit, folder_dit
from engine.api import EngineOptions
from engine.models_dir import load_models


def test_folder_dit_is_the_engines_dit(tiny_models: Path) -> None:
    mine = folder_dit(tiny_models, "cpu", torch.float32)
    engine = load_models(EngineOptions(models_dir=tiny_models, device="cpu", dtype="float32", preset="quality")).dit
    a, b = mine.state_dict(), engine.state_dict()
    assert a.keys() == b.keys() and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in mine.parameters()) and not mine.training
    assert bench_dit(tiny_models, "cpu", torch.float32).cfg == mine.cfg


def test_folder_without_the_patch_is_named(tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(tiny_models, copy, symlinks=True)
    for p in copy.rglob("*infiniteTalk_single*"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="no patch_single file"):
        folder_dit(copy, "cpu", torch.float32)


def test_teacache_schedule_reads_the_dits_own_modulations(tiny_models: Path) -> None:
    from bench.teacache_schedule import modulations
    from engine import sampling

    base = tiny_models / "diffusion_models" / "Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ.safetensors"
    e0s = modulations(base, steps=6, shift=7.0)
    model = folder_dit(tiny_models, "cpu", torch.float32)
    for t, e0 in zip(sampling.timesteps(6, 7.0), e0s, strict=False):
        torch.testing.assert_close(e0, model.embed_time(torch.tensor([t]), 1)[1], rtol=1e-5, atol=1e-6)
