"""wav2vec2 speech features (chinese-wav2vec2-base) as transformers' ``Wav2Vec2Model``.

The library model is used as it is; its state-dict names equal the released file's (docs/formats.md §7) once
:func:`normalize_keys` has removed a ``wav2vec2.`` prefix and mapped the positional conv's old weight-norm
spelling (``weight_g``/``weight_v``) to torch's parametrization names.

:func:`audio_features` reproduces the official InfiniteTalk feature path (``src/audio_analysis/wav2vec2.py``
``Wav2Vec2Model.forward`` and ``generate_infinitetalk.py`` ``get_embedding``; docs/model.md §6) with the library's
submodules, step by step:

1. conv feature encoder at 50 Hz -> [1, 512, T50];
2. **linear interpolation of the conv features to the video frame count** (``F.interpolate(...,
   mode="linear", align_corners=True)``, upstream ``torch_utils.linear_interpolation``) *before* the
   transformer, which therefore runs at 25 Hz, one token per video frame;
3. feature projection (LayerNorm 512 + Linear 512 -> 768), positional conv, encoder LayerNorm (post-LN);
4. the 12 transformer layers; the output stacks every layer's output (``hidden_states[1:]``, without the
   input embedding) -> [num_frames, 12, 768] float32.

The official wrapper sets ``config.output_attentions = True`` in its forward, which breaks on recent
transformers (docs/model.md §14a); the math here does not need attentions.

Waveform normalisation: the official code passes the waveform through ``Wav2Vec2FeatureExtractor`` loaded
from the model folder's ``preprocessor_config.json``. For TencentGameMate/chinese-wav2vec2-base that file
has ``do_normalize: false``: ComfyUI's loader says so (``comfy/audio_encoders/audio_encoders.py``,
"chinese-wav2vec2-base has this False"), kijai's wrapper hard-codes the same feature-extractor config
(``multitalk/nodes.py``: do_normalize False, feature_size 1, padding right, padding_value 0.0,
return_attention_mask False, sampling_rate 16000), and that config written as indented JSON is exactly
160 bytes, the size docs/formats.md lists for the released file. So the extractor only casts to float32 and
``normalize`` defaults to False.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Wav2Vec2Config

__all__ = [
    "SAMPLE_RATE",
    "TINY_CONFIG",
    "config_from_shapes",
    "normalize_keys",
    "build",
    "audio_features",
    "frames_for_duration",
]

T = TypeVar("T")

SAMPLE_RATE = 16000
FPS = 25
# The conv feature encoder of every wav2vec2 base/large model: 320x downsampling -> 50 Hz at 16 kHz.
# Strides are not in the weights; they are known for these kernels.
BASE_KERNELS = (10, 3, 3, 3, 3, 2, 2)
BASE_STRIDES = (5, 2, 2, 2, 2, 2, 2)  # product 320: 16000 / 320 = 50 Hz
HEAD_DIM = 64  # base: 768 / 12 heads; the head count is not in the weights

_POS_G = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"  # weight-norm magnitude [1, 1, K]
_POS_V = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"  # direction [H, H / groups, K]


def _make_config(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    conv_dim: tuple[int, ...],
    conv_kernel: tuple[int, ...],
    conv_stride: tuple[int, ...],
    conv_bias: bool,
    feat_extract_norm: str,
    num_conv_pos_embeddings: int,
    num_conv_pos_embedding_groups: int,
    masked_spec_embed: bool,
) -> Wav2Vec2Config:
    """The one place that fixes the non-derivable facts, so TINY and released configs agree on them."""
    return Wav2Vec2Config(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=max(1, hidden_size // HEAD_DIM),
        intermediate_size=intermediate_size,
        conv_dim=conv_dim,
        conv_kernel=conv_kernel,
        conv_stride=conv_stride,
        conv_bias=conv_bias,
        feat_extract_norm=feat_extract_norm,
        # wav2vec2 releases pair "group" conv norm with post-LN (base) and "layer" with pre-LN (large-lv60)
        do_stable_layer_norm=feat_extract_norm == "layer",
        num_conv_pos_embeddings=num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=num_conv_pos_embedding_groups,
        hidden_act="gelu",
        feat_extract_activation="gelu",
        layer_norm_eps=1e-5,
        # masked_spec_embed exists only when a mask probability is > 0; it is unused at inference
        mask_time_prob=0.05 if masked_spec_embed else 0.0,
        mask_feature_prob=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
    )


# The tiny test model: base conv geometry (50 Hz) at width 32.
TINY_CONFIG: Wav2Vec2Config = _make_config(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    conv_dim=(32,) * 7,
    conv_kernel=BASE_KERNELS,
    conv_stride=BASE_STRIDES,
    conv_bias=False,
    feat_extract_norm="group",
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
    masked_spec_embed=True,
)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> Wav2Vec2Config:
    """Read the config from tensor shapes (keys as :func:`normalize_keys` returns them)."""

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"wav2vec2 weights: missing key {key!r}; is this a wav2vec2 (HF naming) file?")
        return tuple(shapes[key])

    need("feature_extractor.conv_layers.0.conv.weight")
    n_convs = _count(shapes, "feature_extractor.conv_layers.")
    convs = [need(f"feature_extractor.conv_layers.{i}.conv.weight") for i in range(n_convs)]  # [out, in, kernel]
    kernels = tuple(w[2] for w in convs)
    if kernels != BASE_KERNELS:
        raise ValueError(f"wav2vec2 weights: conv kernels {kernels} are not wav2vec2's {BASE_KERNELS}; strides unknown")
    if "feature_extractor.conv_layers.1.layer_norm.weight" in shapes:
        norm = "layer"
    else:
        need("feature_extractor.conv_layers.0.layer_norm.weight")
        norm = "group"
    hidden = need("feature_projection.projection.weight")[0]
    v = need(_POS_V)
    need(_POS_G)
    return _make_config(
        hidden_size=hidden,
        num_hidden_layers=_count(shapes, "encoder.layers."),
        intermediate_size=need("encoder.layers.0.feed_forward.intermediate_dense.weight")[0],
        conv_dim=tuple(w[0] for w in convs),
        conv_kernel=kernels,
        conv_stride=BASE_STRIDES,
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in shapes,
        feat_extract_norm=norm,
        num_conv_pos_embeddings=v[2],
        num_conv_pos_embedding_groups=hidden // v[1],
        masked_spec_embed="masked_spec_embed" in shapes,
    )


def _count(shapes: Mapping[str, object], prefix: str) -> int:
    """1 + the largest N in keys ``{prefix}N.…`` (0 if none)."""
    ns = [int(k[len(prefix) :].split(".")[0]) for k in shapes if k.startswith(prefix)]
    return 1 + max(ns) if ns else 0


# Pre-training / fine-tuning heads that Wav2Vec2Model does not have.
_DROP_PREFIXES = ("quantizer.", "project_q.", "project_hid.", "lm_head.", "dropout_features.")
_RENAMES = {
    "encoder.pos_conv_embed.conv.weight_g": _POS_G,
    "encoder.pos_conv_embed.conv.weight_v": _POS_V,
}


def normalize_keys(sd: dict[str, T]) -> dict[str, T]:
    """Released spelling -> ``Wav2Vec2Model`` names; works on tensors and on shape tuples.

    Strips a ``wav2vec2.`` prefix (kijai's files; ``Wav2Vec2ForPreTraining`` exports), maps
    ``weight_g``/``weight_v`` to ``parametrizations.weight.original0``/``original1`` (the names transformers
    gets from ``torch.nn.utils.parametrizations.weight_norm``) and drops pre-training heads.
    """
    out: dict[str, T] = {}
    for k, v in sd.items():
        if k.startswith("wav2vec2."):
            k = k[len("wav2vec2.") :]
        if k.startswith(_DROP_PREFIXES):
            continue
        out[_RENAMES.get(k, k)] = v
    return out


def build(cfg: Wav2Vec2Config, device: torch.device | str) -> nn.Module:
    """``Wav2Vec2Model`` with every parameter on the meta device (it has no buffers; ``device`` holds none)."""
    from transformers import Wav2Vec2Model  # heavy import, only when a model is built

    with torch.device("meta"):
        model = Wav2Vec2Model(cfg)
    # masked_spec_embed is made with the legacy torch.Tensor(n) constructor, which ignores the device
    # context: put it (and anything else made that way) on meta too.
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                setattr(mod, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # a transformers upgrade added state build() does not know how to place
        raise RuntimeError(f"wav2vec2: unexpected buffers {buffers}; build() must create them on {device}")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------
# Runtime


def frames_for_duration(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """Video frames for an audio length, rounded down exactly as upstream: ``int(len / sr * fps)``."""
    return int(num_samples / sample_rate * fps)


def _receptive_field(cfg: Wav2Vec2Config) -> int:
    """Samples the conv encoder needs for one output frame (400 for the base geometry)."""
    r = 1
    for k, s in zip(reversed(cfg.conv_kernel), reversed(cfg.conv_stride)):
        r = (r - 1) * s + k
    return r


def audio_features(
    model: nn.Module,
    waveform: np.ndarray,
    num_frames: int | None = None,
    *,
    fps: int = FPS,
    normalize: bool = False,
) -> Tensor:
    """16 kHz mono waveform -> per-video-frame wav2vec2 features [num_frames, num_layers, hidden] float32.

    ``num_frames`` defaults to :func:`frames_for_duration` of the waveform at ``fps``. ``normalize``
    applies the feature extractor's per-utterance zero-mean / unit-variance (off for chinese-wav2vec2-base,
    see the module docstring).
    """
    cfg = model.config
    if cfg.do_stable_layer_norm:
        raise ValueError("audio_features supports post-LN wav2vec2 (chinese-wav2vec2-base), not stable-layer-norm")
    w = np.asarray(waveform, dtype=np.float32)  # the feature extractor's cast (pyloudnorm returns float64)
    if w.ndim != 1:
        raise ValueError(f"waveform must be 1-D mono, got shape {w.shape}")
    if num_frames is None:
        num_frames = frames_for_duration(len(w), SAMPLE_RATE, fps)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    need = _receptive_field(cfg)
    if len(w) < need:
        raise ValueError(f"waveform has {len(w)} samples; wav2vec2 needs at least {need}")
    if normalize:  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
        w = (w - w.mean()) / np.sqrt(w.var() + 1e-7)

    param = next(model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(w)).to(device=param.device, dtype=param.dtype)[None]  # [1, N]
    enc = model.encoder
    with torch.inference_mode():
        feats = model.feature_extractor(x)  # [1, C, T50]
        # interpolate in float32 even for a half-precision model; a no-op cast for fp32
        feats = F.interpolate(feats.float(), size=num_frames, mode="linear", align_corners=True)  # [1, C, T]
        h, _ = model.feature_projection(feats.to(param.dtype).transpose(1, 2))  # [1, T, H]
        h = h + enc.pos_conv_embed(h)
        h = enc.layer_norm(h)  # post-LN encoder: norm before the first layer (then dropout, off in eval)
        layers = []
        for layer in enc.layers:
            out = layer(h, attention_mask=None)
            h = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple, 5 a tensor
            layers.append(h)
    return torch.stack(layers, dim=2)[0].float()  # [1, T, L, H] -> [T, L, H]
