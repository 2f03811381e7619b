"""Shared by the benchmark scripts: a full-size DiT with random weights, built straight on the device."""

from __future__ import annotations

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
