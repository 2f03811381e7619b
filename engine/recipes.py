"""What a render is made of, as data: resolution buckets, sampling presets, default prompts.

Torch-free, so the daemon's config and the settings schema (engine/settings.py) can check values against
the same tables the engine renders with. engine/frames.py chooses among the buckets; engine/render.py
applies a preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "BUCKET_TABLES",
    "WARM_BUCKETS",
    "Resolution",
    "PresetName",
    "Preset",
    "PRESETS",
    "DEFAULT_PROMPT",
    "DEFAULT_NEGATIVE_PROMPT",
]

# --------------------------------------------------------------------------------------------
# Resolution buckets
# --------------------------------------------------------------------------------------------

Resolution = Literal["480p", "720p"]

# (ratio key, (h, w)) in the order of upstream's dicts. The bucket is chosen by comparing the
# source h/w ratio with the *rounded key* (e.g. 0.26 for 320/1216 = 0.263), not with the exact
# h/w of the bucket, so the keys are kept verbatim. Source: MeiGen-AI/InfiniteTalk
# wan/utils/multitalk_utils.py, ASPECT_RATIO_627 ("infinitetalk-480") and ASPECT_RATIO_960
# ("infinitetalk-720").
_BUCKETS_480: tuple[tuple[float, tuple[int, int]], ...] = (
    (0.26, (320, 1216)), (0.38, (384, 1024)), (0.50, (448, 896)), (0.67, (512, 768)),
    (0.82, (576, 704)), (1.00, (640, 640)), (1.22, (704, 576)), (1.50, (768, 512)),
    (1.86, (832, 448)), (2.00, (896, 448)), (2.50, (960, 384)), (2.83, (1088, 384)),
    (3.60, (1152, 320)), (3.80, (1216, 320)), (4.00, (1280, 320)),
)
_BUCKETS_720: tuple[tuple[float, tuple[int, int]], ...] = (
    (0.22, (448, 2048)), (0.29, (512, 1792)), (0.36, (576, 1600)), (0.45, (640, 1408)),
    (0.55, (704, 1280)), (0.63, (768, 1216)), (0.76, (832, 1088)), (0.88, (896, 1024)),
    (1.00, (960, 960)), (1.14, (1024, 896)), (1.31, (1088, 832)), (1.50, (1152, 768)),
    (1.58, (1216, 768)), (1.82, (1280, 704)), (1.91, (1344, 704)), (2.20, (1408, 640)),
    (2.30, (1472, 640)), (2.67, (1536, 576)), (2.89, (1664, 576)), (3.62, (1856, 512)),
    (3.75, (1920, 512)),
)
BUCKET_TABLES: dict[str, tuple[tuple[float, tuple[int, int]], ...]] = {"480p": _BUCKETS_480, "720p": _BUCKETS_720}
assert set(BUCKET_TABLES) == set(get_args(Resolution))

# Buckets the fast engine compiles at start (EngineOptions.warm_buckets): the 16:9 landscape one of 480p.
WARM_BUCKETS: tuple[tuple[int, int], ...] = ((448, 896),)

# --------------------------------------------------------------------------------------------
# Sampling presets
# --------------------------------------------------------------------------------------------

PresetName = Literal["lightx2v", "fast1", "quality"]


@dataclass(frozen=True)
class Preset:
    """Sampling defaults (docs/model.md §8)."""

    steps: int
    shift: float
    text_guidance: float
    audio_guidance: float
    use_lora: bool


# "quality" = the official defaults; "lightx2v" = the step-distill LoRA with 4 steps, text
# guidance 1 (so 2 passes per step: cond and drop-audio) and audio guidance 2, as the official
# README recommends for the lightx2v LoRA; shift 7 is the official 480 schedule. "fast1" is the
# 1-pass variant (audio guidance 1) used by the ComfyUI templates.
PRESETS: dict[str, Preset] = {
    "lightx2v": Preset(steps=4, shift=7.0, text_guidance=1.0, audio_guidance=2.0, use_lora=True),
    "fast1": Preset(steps=4, shift=7.0, text_guidance=1.0, audio_guidance=1.0, use_lora=True),
    "quality": Preset(steps=40, shift=7.0, text_guidance=5.0, audio_guidance=4.0, use_lora=False),
}
assert tuple(PRESETS) == get_args(PresetName)

# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

DEFAULT_PROMPT = (
    "A person is talking to the camera, natural facial expressions and lip movements, "
    "steady head, realistic, high quality."
)

# The official negative prompt (InfiniteTalk wan/configs/shared_config.py), in English.
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)
