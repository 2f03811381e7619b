"""The models folder: the tiny folder in the real layout, doctor's verdicts, and loading through it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine import models_dir as md
from engine import weights as wt
from tests.engine.forward import fwd


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
    assert len(lines) == len(md.ROLES) + 1  # one per file, and where the tokenizer comes from
    assert all(line.startswith("ok") for line in lines), "\n".join(lines)
    assert any("tokenizer" in line and "spiece_model tensor" in line for line in lines)
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


def _dit_files(folder: Path) -> tuple[wt.FileInfo, wt.FileInfo, wt.FileInfo]:
    return (wt.read_header(folder / "diffusion_models" / md.ROLE_BY_NAME["dit"].default),
            wt.read_header(folder / "model_patches" / md.ROLE_BY_NAME["patch_single"].default),
            wt.read_header(folder / "loras" / md.ROLE_BY_NAME["lora"].default))


@pytest.mark.parametrize("mode", ["resident", "low"])
def test_fp8_load_keeps_the_files_own_fp8_weights(tiny_models: Path, mode: str) -> None:
    """engine.fp8 on an fp8-scaled DiT without LoRA: the GEMMs get the file's bytes and scale, not a re-rounding."""
    from engine import fast

    base, patch, _ = _dit_files(tiny_models)
    dit, _ = md.load_dit(base, patch, device=torch.device("cpu"), dtype=torch.float32, memory_mode=mode,
                         fp8_targets=fast.FP8_TARGETS)
    block = dit.blocks[1]
    with safe_open(str(base.path), "pt") as f:
        for rel in ("self_attn.q", "cross_attn.k_img", "ffn.2"):
            layer = block.get_submodule(rel)
            assert isinstance(layer, fast.Fp8Linear)
            raw = f.get_tensor(f"blocks.1.{rel}.weight")
            scale = f.get_tensor(f"blocks.1.{rel}.scale_weight").float()
            assert torch.equal(layer.weight.view(torch.uint8), raw.view(torch.uint8))
            assert torch.equal(layer.weight_scale, scale.expand(raw.shape[0]))
    # the audio adapter comes from the fp16 patch: quantised per output channel (one scale per row)
    audio = block.audio_cross_attn.q_linear
    assert isinstance(audio, fast.Fp8Linear) and audio.weight_scale.unique().numel() > 1


def test_fp8_load_with_lora_quantises_the_merged_weight(tiny_models: Path) -> None:
    from engine import fast

    base, patch, lora = _dit_files(tiny_models)
    args = dict(device=torch.device("cpu"), dtype=torch.float32, lora=lora, lora_strength=1.0)
    merged, _ = md.load_dit(base, patch, **args)  # type: ignore[arg-type]
    dit, _ = md.load_dit(base, patch, fp8_targets=fast.FP8_TARGETS, **args)  # type: ignore[arg-type]
    layer = dit.blocks[1].self_attn.q
    want = merged.blocks[1].self_attn.q.weight
    assert isinstance(layer, fast.Fp8Linear) and layer.weight_scale.unique().numel() > 1  # per row, not the file's
    got = layer.weight.float() * layer.weight_scale[:, None]
    assert ((got - want).norm() / want.norm()).item() < 0.05  # the merged weight, rounded once to fp8


def test_fp8_from_the_file_is_closer_than_requantised(tiny_models: Path) -> None:
    """Against the float32 DiT of the same file, the fp8 forward that uses the file's fp8 weights is closer than
    one that re-quantises the dequantised weights per channel (the only added rounding is the activations')."""
    from engine import fast
    from tests.conftest import dit_inputs

    base, patch, _ = _dit_files(tiny_models)
    # the layers the base file holds (the audio adapter comes from the fp16 patch and is re-quantised either way;
    # with both patches present the engine leaves it in 16 bits: fast.fp8_targets(adapter_swap=True))
    targets = fast.fp8_targets(adapter_swap=True)
    args = dict(device=torch.device("cpu"), dtype=torch.float32)
    ref, _ = md.load_dit(base, patch, **args)  # type: ignore[arg-type]
    exact, _ = md.load_dit(base, patch, fp8_targets=targets, **args)  # type: ignore[arg-type]
    requant, _ = md.load_dit(base, patch, **args)  # type: ignore[arg-type]
    fast.enable_fp8(requant, targets=targets, fast_accum=True)
    kw = dit_inputs(ref.cfg)
    with torch.inference_mode():
        want = fwd(ref, **kw)
        err = {name: ((fwd(m, **kw) - want).norm() / want.norm()).item() for name, m in (("exact", exact),
                                                                                 ("requant", requant))}
    assert 0 < err["exact"] < 0.8 * err["requant"], err


@pytest.mark.parametrize(("preset", "from_file"), [("quality", True), ("lightx2v", False)])
def test_load_models_applies_engine_fp8(tiny_models: Path, monkeypatch: pytest.MonkeyPatch, preset: str,
                                        from_file: bool) -> None:
    """The wiring in load_models, on the CPU: pretend the device has fp8 GEMMs (Fp8Linear then runs its float32
    reference). Without LoRA the file's bytes are used; with the lightx2v LoRA merged, per-channel scales."""
    from engine import fast
    from engine.api import EngineOptions

    monkeypatch.setattr(fast, "supports_fp8", lambda *_: True)
    models = md.load_models(EngineOptions(models_dir=tiny_models, device="cpu", dtype="float32", preset=preset,
                                          fp8=True, fast=True))
    layer = models.dit.blocks[0].ffn[0]
    assert isinstance(layer, fast.Fp8Linear)
    # both patches are in the folder: the swapped audio layers stay 16-bit
    assert not isinstance(models.dit.blocks[0].audio_cross_attn.q_linear, fast.Fp8Linear)
    base, _, _ = _dit_files(tiny_models)
    with safe_open(str(base.path), "pt") as f:
        raw = f.get_tensor("blocks.0.ffn.0.weight")
    assert torch.equal(layer.weight.view(torch.uint8), raw.view(torch.uint8)) is from_file


def test_engine_identity_names_fp8(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 output differs from bf16, so it is part of the identity that job fingerprints include."""
    from engine import fast
    from engine.api import EngineOptions
    from engine.render import Engine

    opts = dict(models_dir=tiny_models, device="cpu", dtype="float32", preset="quality")
    plain = Engine(md.load_models(EngineOptions(**opts))).identity()  # type: ignore[arg-type]
    monkeypatch.setattr(fast, "supports_fp8", lambda *_: True)
    fp8 = Engine(md.load_models(EngineOptions(fp8=True, **opts))).identity()  # type: ignore[arg-type]
    assert "dit_gemm=fp8" not in plain and fp8 == plain + ";dit_gemm=fp8"


def test_fa3_is_a_kernel_not_part_of_the_identity_and_needs_the_fast_path(tiny_models: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """FA3 gives other bits than SDPA but the same error against fp32: it is reported with the kernels (the result
    JSON), not in the identity (a job ingested on one GPU type may be rendered on another); asking for it where
    the fast path does not run (CPU) is an error at start, before loading, that says what to use instead."""
    from engine import attention, fast, load_engine
    from engine.api import EngineOptions
    from engine.render import Engine

    opts = dict(models_dir=tiny_models, device="cpu", dtype="float32", preset="quality")
    with pytest.raises(ValueError, match="engine.attention: fa3 needs the fast path on a CUDA GPU.*auto or sdpa"):
        load_engine(EngineOptions(attention="fa3", **opts))  # type: ignore[arg-type]
    models = md.load_models(EngineOptions(**opts))  # type: ignore[arg-type]
    plain = Engine(models).identity()
    assert Engine(models).kernels() == {"dit_attention": "sdpa"}
    monkeypatch.setattr(attention, "flash3_available", lambda device=None: True)
    fast.use_flash3(models.dit)
    assert "dit_attention" not in plain and Engine(models).identity() == plain
    assert Engine(models).kernels() == {"dit_attention": "fa3"}


def test_tiny_model_files_follow_the_umask(tiny_models: Path) -> None:
    """safetensors alone writes 0600; a models folder is usually read by other users (the daemon's account)."""
    want = wt.file_mode()
    assert want & 0o777 == 0o666 & ~_umask()
    files = [p for p in tiny_models.rglob("*.safetensors")]
    assert len(files) == len(md.ROLES)
    for p in files:
        assert p.stat().st_mode & 0o777 == want, p


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _without_spiece(models: Path) -> Path:
    """Rewrite the tiny umT5 file without its spiece_model tensor (as some text-encoder files come)."""
    path = models / "text_encoders" / md.ROLE_BY_NAME["text_encoder"].default
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "spiece_model"}  # noqa: SIM118 (safe_open is not iterable)
        meta = f.metadata()
    wt.save_tensors(path, tensors, meta)
    return path


def test_tokenizer_from_engine_files_when_the_umt5_file_has_none(models: Path, tmp_path: Path) -> None:
    from engine.api import EngineOptions
    from engine.text_encoder import TINY_CONFIG, Tokenizer, make_tiny_spiece

    te = _without_spiece(models)
    ok, lines = md.doctor(models)
    assert not ok and any(ln.startswith("MISSING") and "tokenizer" in ln and te.name in ln for ln in lines)
    spiece = tmp_path / "spiece.model"
    spiece.write_bytes(make_tiny_spiece(TINY_CONFIG.vocab_size))  # a real SentencePiece model file
    files = {"tokenizer": str(spiece)}
    ok, lines = md.doctor(models, files)
    assert ok, "\n".join(lines)
    assert any(ln.startswith("ok") and "tokenizer" in ln and str(spiece) in ln and "engine.files.tokenizer" in ln
               for ln in lines)
    m = md.load_models(EngineOptions(models_dir=models, device="cpu", dtype="float32", preset="quality", files=files))
    assert str(spiece) in m.tokenizer_source
    text = "a person speaks calmly"
    assert m.tokenizer.encode(text) == Tokenizer.from_file(spiece).encode(text)

    spiece.write_bytes(b"not a sentencepiece model")
    ok, lines = md.doctor(models, files)
    assert not ok and any(ln.startswith("BAD") and str(spiece) in ln for ln in lines)
    with pytest.raises(wt.WeightsError, match=r"spiece\.model"):
        md.load_models(EngineOptions(models_dir=models, device="cpu", dtype="float32", preset="quality", files=files))


def test_tokenizer_inside_the_file_wins_and_is_named(tiny_models: Path) -> None:
    from engine.api import EngineOptions

    m = md.load_models(EngineOptions(models_dir=tiny_models, device="cpu", dtype="float32", preset="quality",
                                     files={"tokenizer": "/nonexistent/spiece.model"}))
    assert "spiece_model tensor" in m.tokenizer_source


def test_engine_log_records_are_events_with_fields(tiny_models: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every engine record is an event name plus fields (for the daemon's JSON logs), never prose with values
    formatted into it; a field may be called like a LogRecord attribute."""
    import logging

    from engine.api import EngineOptions
    from engine.events import LOGGER_NAME, emit

    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        md.load_models(EngineOptions(models_dir=tiny_models, device="cpu", dtype="float32", preset="lightx2v",
                                     memory_mode="auto"))
        emit("engine.test", name="x", module="y")
    records = [r for r in caplog.records if r.name == LOGGER_NAME]
    events = [getattr(r, "event", None) for r in records]
    assert {"engine.memory_mode", "engine.load_dit", "engine.lora_merged", "engine.test"} <= set(events), events
    for r in records:
        assert r.getMessage() == r.event and isinstance(r.fields, dict), r.getMessage()
    merged = next(r for r in records if r.event == "engine.lora_merged")
    assert merged.fields["weights"] > 0 and merged.fields["strength"] == 1.0
    assert records[-1].fields == {"name": "x", "module": "y"}
