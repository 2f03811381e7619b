"""Tests' shorthand for a DiT forward from raw inputs (the keyword dicts the tests build)."""

from __future__ import annotations

from torch import Tensor

from engine.dit import BlockCache, WanInfiniteTalk


def fwd(model: WanInfiniteTalk, x: Tensor, t: Tensor, context: Tensor, clip_fea: Tensor | None, y: Tensor,
        audio: Tensor, ref_target_masks: Tensor | None = None, block_cache: BlockCache | None = None) -> Tensor:
    """``model`` on raw context / CLIP features / audio: embedded by the model itself (WanInfiniteTalk.condition)."""
    return model(x, t, y, model.condition(context, clip_fea, audio), ref_target_masks, block_cache=block_cache)
