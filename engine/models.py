"""The resident networks of one engine: what engine.models_dir.load_models returns and engine.render.Engine runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.dit import WanInfiniteTalk
    from engine.text_encoder import Tokenizer
    from engine.vae import WanVAE


@dataclass
class Models:
    """The resident networks, as loaded by models_dir.load_models."""

    dit: WanInfiniteTalk
    vae: WanVAE
    text_encoder: torch.nn.Module
    tokenizer: Tokenizer
    audio_encoder: torch.nn.Module
    clip: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype
    identities: dict[str, str] = field(default_factory=dict)
    text_device: torch.device | None = None  # where umT5 lives and runs (the CPU in "low" memory mode)
    speakers_supported: tuple[int, ...] = (1, 2)
    lora_strength: float | None = None  # strength merged at load, None when no LoRA
    # switches the resident DiT between the single- and two-speaker adapter weights (both patch files present)
    swap_patch: Callable[[int], None] | None = None
    tokenizer_source: str = ""  # where the umT5 tokenizer came from (the text-encoder file or engine.files)
