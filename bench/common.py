"""Shared by the benchmark scripts: the full-size DiT, with random weights built straight on the device, or read
from a real ComfyUI models folder through the engine's own loader."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import dit


def random_dit(cfg: dit.DiTConfig, device: str, dtype: torch.dtype) -> dit.WanInfiniteTalk:
    """Built on meta, materialised once on ``device`` in ``dtype`` (no fp32 copy, no host copy), then filled:
    matrices ~ N(0, 1/fan_in), norm weights 1, other vectors N(0, 0.02). Weight values do not change kernel speed."""
    model = dit.build(cfg, "meta").to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5, generator=gen)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def folder_dit(models_dir: Path, device: str, dtype: torch.dtype, *, speakers: int = 1) -> dit.WanInfiniteTalk:
    """The DiT + InfiniteTalk patch (single- or multi-speaker) of a ComfyUI models folder, loaded the way the
    engine loads it (engine.models_dir.load_dit: fp8-scaled files dequantised, strict key check), no LoRA.

    Raises FileNotFoundError naming the role when the folder lacks the DiT or the patch."""
    from engine import weights as wt
    from engine.models_dir import load_dit, locate

    found = locate(models_dir)
    patch_role = "patch_single" if speakers == 1 else "patch_multi"
    for role in ("dit", patch_role):
        if found[role] is None:
            raise FileNotFoundError(f"{models_dir}: no {role} file (run 'infinitetalkd doctor --models-dir "
                                    f"{models_dir}' to see what is expected where)")
    base, patch = wt.read_header(found["dit"]), wt.read_header(found[patch_role])  # type: ignore[arg-type]
    model, _ = load_dit(base, patch, device=torch.device(device), dtype=dtype)
    assert isinstance(model, dit.WanInfiniteTalk)
    return model.eval().requires_grad_(False)


def bench_dit(models_dir: Path | None, device: str, dtype: torch.dtype) -> dit.WanInfiniteTalk:
    """Real weights from ``models_dir`` when given, else the released shapes with random weights."""
    if models_dir is not None:
        return folder_dit(models_dir, device, dtype)
    return random_dit(dit.RELEASED, device, dtype)
