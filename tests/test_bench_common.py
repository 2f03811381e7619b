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


def test_round_to_file_fp8_makes_the_weights_a_files_and_feeds_enable_fp8() -> None:
    from bench.common import round_to_file_fp8
    from engine import dit, fast

    torch.manual_seed(0)
    model = dit.WanInfiniteTalk(dit.TINY).eval().requires_grad_(False)
    targets = fast.fp8_targets(adapter_swap=True)
    stored = round_to_file_fp8(model, targets)
    assert len(stored) == len(targets) * len(model.blocks)
    q, scale = stored["blocks.1.ffn.0"]
    assert q.dtype == torch.float8_e4m3fn and scale.ndim == 0
    assert torch.equal(model.blocks[1].ffn[0].weight, q.float() * scale)  # fp32 model: the dequantised file
    assert q.float().abs().max() == fast.FP8_MAX  # the per-tensor absmax maps to 448
    assert fast.enable_fp8(model, targets=targets, weights_fp8=stored) == len(stored)
    layer = model.blocks[1].ffn[0]
    assert isinstance(layer, fast.Fp8Linear) and torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))


def test_folder_fp8_payload_is_the_files_bytes(tiny_models: Path) -> None:
    from safetensors import safe_open

    from bench.common import folder_fp8_payload
    from engine import fast

    stored = folder_fp8_payload(tiny_models, 2, fast.FP8_TARGETS, "cpu")
    assert len(stored) == 2 * 12 and "blocks.1.audio_cross_attn.q_linear" not in stored  # adapter: the patch's
    base = tiny_models / "diffusion_models" / "Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ.safetensors"
    with safe_open(str(base), "pt") as f:
        raw = f.get_tensor("blocks.1.self_attn.o.weight")
    assert torch.equal(stored["blocks.1.self_attn.o"][0].view(torch.uint8), raw.view(torch.uint8))
