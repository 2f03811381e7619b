"""CLIP ViT-H/14 vision tower (Wan 2.1's image encoder) as transformers' ``CLIPVisionModelWithProjection``.

The library model is used as it is: its state-dict names equal the HF spelling of
``clip_vision_h.safetensors`` (docs/formats.md §9: ``vision_model.*``, ``visual_projection.weight``).
:func:`normalize_keys` also converts the open_clip spelling (``visual.transformer.resblocks.N...``).

How :func:`encode_image` matches the official Wan ``CLIPModel.visual`` (docs/model.md §4 and §12,
Wan ``wan/modules/clip.py``): the whole frame is resized bicubic (``align_corners=False``, no antialias,
no crop) to the model's square input size, mapped from [-1, 1] to [0, 1], normalised with the OpenAI
CLIP mean/std, and the output is the hidden states after block ``num_layers - 1`` (block 31 of 32,
Wan's ``use_31_block=True``; ComfyUI's ``penultimate_hidden_states``) **without** the post-LayerNorm:
[B, 257, 1280] for ViT-H/14. ViT-H uses exact GELU and LayerNorm eps 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPVisionConfig

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "TINY_CONFIG",
    "config_from_shapes",
    "normalize_keys",
    "build",
    "encode_image",
]

T = TypeVar("T")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

HEAD_DIM = 80  # ViT-H/14: 1280 / 16 heads; the head count is not in the weights


def _make_config(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    image_size: int,
    patch_size: int,
    projection_dim: int,
    num_channels: int = 3,
) -> CLIPVisionConfig:
    """The one place that fixes the non-derivable facts, so TINY and released configs agree on them."""
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=max(1, hidden_size // HEAD_DIM),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
        num_channels=num_channels,
        hidden_act="gelu",  # exact GELU (the transformers default, quick_gelu, is OpenAI ViT-L's)
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    )


# The tiny test model: 28 px / patch 14 = 2x2 patches + CLS = 5 tokens.
TINY_CONFIG: CLIPVisionConfig = _make_config(
    hidden_size=80, intermediate_size=160, num_hidden_layers=3, image_size=28, patch_size=14, projection_dim=16
)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> CLIPVisionConfig:
    """Read the config from tensor shapes (HF names, as :func:`normalize_keys` returns them).

    The image size comes from the position table (1 + (image / patch)^2 rows); heads = hidden // 80.
    """

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"CLIP vision weights: missing key {key!r}; is this a CLIP vision (HF naming) file?")
        return tuple(shapes[key])

    (hidden,) = need("vision_model.embeddings.class_embedding")
    _, channels, patch, _ = need("vision_model.embeddings.patch_embedding.weight")
    positions = need("vision_model.embeddings.position_embedding.weight")[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ValueError(f"CLIP vision weights: {positions} positions is not 1 + a square number of patches")
    intermediate = need("vision_model.encoder.layers.0.mlp.fc1.weight")[0]
    projection = need("visual_projection.weight")[0]
    prefix = "vision_model.encoder.layers."
    layers = 1 + max(int(k[len(prefix) :].split(".")[0]) for k in shapes if k.startswith(prefix))
    return _make_config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        image_size=side * patch,
        patch_size=patch,
        projection_dim=projection,
        num_channels=channels,
    )


# --------------------------------------------------------------------------------------------------------
# Key spellings


def _rows(v: T, part: int, parts: int) -> T:
    """Row block ``part`` of ``parts`` equal blocks of a tensor or of a shape tuple."""
    if isinstance(v, tuple):
        return (v[0] // parts, *v[1:])  # type: ignore[return-value]
    assert isinstance(v, Tensor)
    n = v.shape[0] // parts
    return v[part * n : (part + 1) * n]  # type: ignore[return-value]


def _transposed(v: T) -> T:
    if isinstance(v, tuple):
        return tuple(reversed(v))  # type: ignore[return-value]
    assert isinstance(v, Tensor)
    return v.t().contiguous()  # type: ignore[return-value]


# open_clip name -> HF name (one-to-one renames; the fused attention and the projection are special).
_OPEN_CLIP_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCKS = "visual.transformer.resblocks."


def _from_open_clip(sd: dict[str, T]) -> dict[str, T]:
    out: dict[str, T] = {}
    for k, v in sd.items():
        if not k.startswith("visual."):
            continue  # the text tower of a full open_clip checkpoint
        if k in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[k]] = v
        elif k == "visual.proj":  # [hidden, projection], used as x @ proj -> Linear weight [projection, hidden]
            out["visual_projection.weight"] = _transposed(v)
        elif k.startswith(_RESBLOCKS):
            n, rest = k[len(_RESBLOCKS) :].split(".", 1)
            base = f"vision_model.encoder.layers.{n}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for i, qkv in enumerate(("q_proj", "k_proj", "v_proj")):  # fused rows are [q; k; v]
                    out[f"{base}self_attn.{qkv}.{kind}"] = _rows(v, i, 3)
            else:
                module, param = rest.rsplit(".", 1)
                out[base + _OPEN_CLIP_BLOCK.get(module, module) + "." + param] = v
        else:
            out[k] = v  # unknown: left for the strict load to report
    return out


def normalize_keys(sd: dict[str, T]) -> dict[str, T]:
    """HF or open_clip spelling -> ``CLIPVisionModelWithProjection`` names; tensors or shape tuples.

    Drops what the vision tower does not hold: ``position_ids`` (a non-persistent buffer, stored by old
    HF exports), the text tower (``text_model.*``, ``text_projection``) and ``logit_scale``.
    """
    if any(k.startswith(_RESBLOCKS) or k == "visual.conv1.weight" for k in sd):
        sd = _from_open_clip(sd)
    out: dict[str, T] = {}
    for k, v in sd.items():
        if k == "vision_model.embeddings.position_ids" or k == "logit_scale":
            continue
        if k.startswith(("text_model.", "text_projection.")):
            continue
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------------------
# Build


def _restore_position_ids(module: nn.Module, incompatible_keys: object) -> None:
    """Load post-hook: (re)create the non-persistent ``position_ids`` next to the loaded position table.

    Covers a module built with ``device="meta"`` and a load that puts the weights on another device.
    """
    weight = module.position_embedding.weight
    ids = module.position_ids
    if not weight.is_meta and (ids.is_meta or ids.device != weight.device):
        module.position_ids = torch.arange(module.num_positions, device=weight.device).expand((1, -1))


def build(cfg: CLIPVisionConfig, device: torch.device | str) -> nn.Module:
    """``CLIPVisionModelWithProjection`` with parameters on meta and ``position_ids`` real on ``device``."""
    from transformers import CLIPVisionModelWithProjection  # heavy import, only when a model is built

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg)
    emb = model.vision_model.embeddings
    device = torch.device(device)
    # [1, num_positions] = arange, as transformers creates it (a buffer, not stored in the file)
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
    emb.register_load_state_dict_post_hook(_restore_position_ids)
    others = [
        name
        for mod_name, mod in model.named_modules()
        for name in (f"{mod_name}.{b}" for b in mod._non_persistent_buffers_set)
        if name != "vision_model.embeddings.position_ids"
    ]
    if others:  # a transformers upgrade added state build() does not know how to place
        raise RuntimeError(f"CLIP vision: unexpected non-persistent buffers {others}")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------
# Runtime


def encode_image(model: nn.Module, frames: Tensor) -> Tensor:
    """frames [B, 3, H, W] in [-1, 1] -> penultimate-block hidden states [B, 1 + patches, hidden], float32.

    Preprocessing in float32 on the model's device; the network runs in its own dtype.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [B, 3, H, W], got {tuple(frames.shape)}")
    param = next(model.parameters())
    size = int(model.config.image_size)
    x = frames.to(device=param.device, dtype=torch.float32)
    if tuple(x.shape[-2:]) != (size, size):
        # whole frame, no crop, no antialias (official: F.interpolate bicubic, align_corners=False)
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5  # [-1, 1] -> [0, 1]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.inference_mode():
        out = model(pixel_values=x.to(param.dtype), output_hidden_states=True)
    # hidden_states = (embeddings after pre_layrnorm, block 1, ..., block N); [-2] = after block N-1
    return out.hidden_states[-2].float()
