"""The models folder: the tiny folder in the real layout, doctor's verdicts, and loading through it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine import models_dir as md
from engine import weights as wt


@pytest.fixture()
def models(tiny_models: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny folder that a test may damage."""
    dst = tmp_path / "models"
    shutil.copytree(tiny_models, dst)
    return dst


def test_tiny_folder_has_the_real_layout(tiny_models: Path) -> None:
    for role in md.ROLES:
        assert (tiny_models / role.folders[0] / role.default).is_file(), role.name
    dit = wt.read_header(tiny_models / "diffusion_models" / md.ROLE_BY_NAME["dit"].default)
    assert dit.quant == "scaled_fp8" and dit.main_dtype == "F8_E4M3"
    te = wt.read_header(tiny_models / "text_encoders" / md.ROLE_BY_NAME["text_encoder"].default)
    assert te.quant == "scaled_fp8" and "spiece_model" in te.tensors
    lora = wt.read_header(tiny_models / "loras" / md.ROLE_BY_NAME["lora"].default)
    assert any(k.endswith(".lora_down.weight") for k in lora.tensors)
    assert all(k.startswith("diffusion_model.") for k in lora.tensors)


def test_doctor_passes_on_the_tiny_folder(tiny_models: Path) -> None:
    ok, lines = md.doctor(tiny_models)
    assert ok, "\n".join(lines)
    assert len(lines) == len(md.ROLES)
    assert all(line.startswith("ok") for line in lines), "\n".join(lines)
    assert any("fp8-scaled" in line and "dit" in line for line in lines)


def test_doctor_names_a_truncated_file(models: Path) -> None:
    path = models / "diffusion_models" / md.ROLE_BY_NAME["dit"].default
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ok, lines = md.doctor(models)
    assert not ok
    bad = [ln for ln in lines if ln.startswith("BAD")]
    assert len(bad) == 1 and path.name in bad[0] and "dit" in bad[0]


def test_doctor_names_a_missing_file(models: Path) -> None:
    path = models / "vae" / md.ROLE_BY_NAME["vae"].default
    path.rename(path.with_name("renamed.safetensors"))
    ok, lines = md.doctor(models)
    assert not ok
    missing = [ln for ln in lines if ln.startswith("MISSING")]
    assert len(missing) == 1 and path.name in missing[0] and str(models / "vae") in missing[0]


def test_doctor_spots_the_wrong_network_in_a_slot(models: Path) -> None:
    vae = models / "vae" / md.ROLE_BY_NAME["vae"].default
    shutil.copy(vae, models / "audio_encoders" / md.ROLE_BY_NAME["audio_encoder"].default)
    ok, lines = md.doctor(models)
    assert not ok
    assert any(ln.startswith("BAD") and "audio_encoder" in ln for ln in lines), "\n".join(lines)


def test_optional_files_may_be_absent(models: Path) -> None:
    (models / "clip_vision" / md.ROLE_BY_NAME["clip_vision"].default).unlink()
    (models / "model_patches" / md.ROLE_BY_NAME["patch_multi"].default).unlink()
    (models / "loras" / md.ROLE_BY_NAME["lora"].default).unlink()
    ok, lines = md.doctor(models, need_lora=False)
    assert ok, "\n".join(lines)
    assert not md.doctor(models, need_lora=True)[0]


def test_legacy_folder_aliases_are_found(models: Path) -> None:
    (models / "diffusion_models").rename(models / "unet")
    assert md.locate(models)["dit"] == models / "unet" / md.ROLE_BY_NAME["dit"].default


def test_loaded_dit_weight_is_dequantised_fp8_plus_lora(tiny_models: Path) -> None:
    """The real loader's result for one weight equals the hand formula applied to the raw files."""
    base = wt.read_header(tiny_models / "diffusion_models" / md.ROLE_BY_NAME["dit"].default)
    patch = wt.read_header(tiny_models / "model_patches" / md.ROLE_BY_NAME["patch_single"].default)
    lora = wt.read_header(tiny_models / "loras" / md.ROLE_BY_NAME["lora"].default)
    dit, report = md.load_dit(base, patch, device=torch.device("cpu"), dtype=torch.float32, lora=lora,
                              lora_strength=0.5)
    assert report is not None and report.applied > 0 and not report.unknown

    key = "blocks.1.self_attn.q"
    with safe_open(str(base.path), "pt") as f:
        w = f.get_tensor(f"{key}.weight").float() * f.get_tensor(f"{key}.scale_weight").float()
    with safe_open(str(lora.path), "pt") as f:
        up = f.get_tensor(f"diffusion_model.{key}.lora_up.weight").float()
        down = f.get_tensor(f"diffusion_model.{key}.lora_down.weight").float()
        alpha = f.get_tensor(f"diffusion_model.{key}.alpha").float().item()
    expected = w + 0.5 * (alpha / down.shape[0]) * (up @ down)
    got = dict(dit.named_parameters())[f"{key}.weight"]
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    # an untouched adapter weight comes from the fp16 patch file as stored
    with safe_open(str(patch.path), "pt") as f:
        raw = f.get_tensor("audio_proj.proj2.weight").float()
    assert torch.equal(dict(dit.named_parameters())["audio_proj.proj2.weight"], raw)


def test_strict_load_names_the_file_and_key(models: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = models / "model_patches" / md.ROLE_BY_NAME["patch_single"].default
    sd = load_file(str(path))
    sd["audio_proj.proj2.weight_typo"] = sd.pop("audio_proj.proj2.weight")
    save_file(sd, str(path))
    base = wt.read_header(models / "diffusion_models" / md.ROLE_BY_NAME["dit"].default)
    with pytest.raises(wt.WeightsError) as e:
        md.load_dit(base, wt.read_header(path), device=torch.device("cpu"), dtype=torch.float32)
    assert path.name in str(e.value) and "audio_proj.proj2.weight" in str(e.value)


def test_a_patch_that_overlaps_the_base_is_refused(models: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = models / "model_patches" / md.ROLE_BY_NAME["patch_single"].default
    sd = load_file(str(path))
    sd["head.head.bias"] = torch.zeros(64)  # a base key inside the adapter file
    save_file(sd, str(path))
    base = wt.read_header(models / "diffusion_models" / md.ROLE_BY_NAME["dit"].default)
    with pytest.raises(wt.WeightsError) as e:
        md.load_dit(base, wt.read_header(path), device=torch.device("cpu"), dtype=torch.float32)
    assert path.name in str(e.value) and "head.head.bias" in str(e.value)
