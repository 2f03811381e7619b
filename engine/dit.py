"""Wan 2.1 I2V DiT with the InfiniteTalk audio adapter, in plain PyTorch.

Positions (RoPE, audio windows, two-speaker routing) live in :mod:`engine.positions` and are re-exported here.

Math follows the official InfiniteTalk code (MeiGen-AI/InfiniteTalk ``wan/modules/multitalk_model.py``,
``wan/modules/attention.py``, ``wan/utils/multitalk_utils.py``); see docs/model.md
sections 3 and 5. Module attribute names equal the released checkpoint keys (``blocks.N.self_attn.q``,
``audio_proj.proj1_vf`` ...), so the merged base + adapter state dict loads strictly, no rename table.
Build the 14B model under ``with torch.device("meta"):`` and load with ``assign=True``.

Where this deviates from the official code (numerically equivalent or deliberate):

- Batched: every input carries a batch axis B; the official code runs batch 1 per pass.
- No sequence padding / ``seq_len``: tokens are exactly F'·h'·w'.
- RoPE rotations run in fp32 (official: float64 complex); tables are computed in float64 and cached
  per grid in a plain dict (no buffers, so they never enter the state dict nor get cast by ``.to()``).
- The number of CLIP tokens is ``context_emb.shape[1] - text_len`` instead of a hard-coded 257.
- The two-speaker reference-attention map is computed only when there are two speakers (official: in
  every block, also for one speaker, then discarded), in fp32, chunked over queries, averaged over all
  heads (official: two head groups averaged, identical for an even head count), and an empty class
  mask contributes zero mass instead of dividing by zero (docs/model.md §14a).
- fp32 islands are written out with ``.float()`` instead of ``torch.cuda.amp.autocast(float32)``.
- The blocks' context K/V (text, image, audio) can be projected once per chunk (:meth:`WanInfiniteTalk.context_kv`)
  instead of on every step (official); the same ops on the same inputs, so the result is bit-identical.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import attention
from engine.positions import (
    BACKGROUND_POSITION,
    SPEAKER1_RANGE,
    SPEAKER2_RANGE,
    apply_rope,
    reference_attention_map,
    rope_1d,
    rope_3d_tables,
    select_audio_windows,
    sinusoidal_embedding,
    speaker_positions,
    token_masks,
)

__all__ = [
    "DiTConfig",
    "RELEASED",
    "TINY",
    "config_from_shapes",
    "WanInfiniteTalk",
    "BlockKV",
    "TextKV",
    "AudioKV",
    "ContextKV",
    "ContextEmb",
    "Conditioning",
    "build",
    "sinusoidal_embedding",
    "rope_3d_tables",
    "apply_rope",
    "rope_1d",
    "select_audio_windows",
    "reference_attention_map",
    "speaker_positions",
    "token_masks",
    "SPEAKER1_RANGE",
    "SPEAKER2_RANGE",
    "BACKGROUND_POSITION",
]

@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36  # 16 noisy latent + 4 mask + 16 reference latent
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096  # umT5-XXL d_model
    text_len: int = 512  # context is zero-padded to this many text tokens
    clip_dim: int = 1280  # CLIP ViT-H hidden size
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # InfiniteTalk adapter (constructor defaults of the official WanModel, not in config.json)
    audio_window: int = 5  # wav2vec2 frames per video frame (offsets -2..+2)
    vae_scale: int = 4  # VAE time compression: video frames per latent frame
    audio_feature_dim: int = 12 * 768  # wav2vec2 layers x hidden, flattened per frame
    audio_intermediate_dim: int = 512
    audio_output_dim: int = 768
    audio_context_tokens: int = 32  # audio tokens per person per latent frame

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


RELEASED = DiTConfig()
# head_dim stays 128 so the 3D RoPE split (22/21/21 pairs) is the real one. text_dim 64 = tiny umT5
# d_model, clip_dim 80 = tiny CLIP hidden, audio_feature_dim = tiny wav2vec2 (2 layers x 32 hidden).
TINY = DiTConfig(
    dim=256,
    ffn_dim=512,
    num_heads=2,
    num_layers=2,
    text_dim=64,
    clip_dim=80,
    audio_feature_dim=2 * 32,
    audio_intermediate_dim=32,
    audio_output_dim=32,
)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> DiTConfig:
    """Derive the config from the merged base + adapter state dict's shapes (prefix already stripped).

    Follows ComfyUI's detection (docs/formats.md §4): num_heads = dim // 128, the audio feature size
    from ``proj1`` given the default audio window, vae_scale from ``proj1_vf``. ``text_len``, ``eps`` and
    ``audio_window`` cannot be seen in shapes and keep their defaults. Raises ValueError naming the first
    missing key or an inconsistent shape.
    """

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"DiT state dict lacks {key!r}; is this a Wan 2.1 I2V + InfiniteTalk model?")
        return tuple(int(s) for s in shapes[key])

    dim = need("head.modulation")[-1]
    if dim % 128:
        raise ValueError(f"head.modulation width {dim} is not a multiple of the head size 128")
    patch_w = need("patch_embedding.weight")  # [dim, in_dim, pt, ph, pw]
    patch = (patch_w[2], patch_w[3], patch_w[4])
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise ValueError("DiT state dict lacks 'blocks.0.*' keys")
    if layers != set(range(len(layers))):
        raise ValueError(f"DiT block indices are not contiguous from 0: {sorted(layers)}")

    audio_window = DiTConfig.audio_window
    proj1_in = need("audio_proj.proj1.weight")[1]
    if proj1_in % audio_window:
        raise ValueError(f"audio_proj.proj1 input {proj1_in} is not a multiple of the audio window {audio_window}")
    feat = proj1_in // audio_window
    vf_in = need("audio_proj.proj1_vf.weight")[1]
    if vf_in % feat:
        raise ValueError(f"audio_proj.proj1_vf input {vf_in} is not a multiple of the feature size {feat}")
    out_a = need("audio_proj.norm.weight")[0]
    proj3_out = need("audio_proj.proj3.weight")[0]
    if proj3_out % out_a:
        raise ValueError(f"audio_proj.proj3 output {proj3_out} is not a multiple of {out_a}")

    return DiTConfig(
        dim=dim,
        ffn_dim=need("blocks.0.ffn.0.weight")[0],
        num_heads=dim // 128,
        num_layers=len(layers),
        in_dim=patch_w[1],
        out_dim=need("head.head.weight")[0] // math.prod(patch),
        freq_dim=need("time_embedding.0.weight")[1],
        text_dim=need("text_embedding.0.weight")[1],
        clip_dim=need("img_emb.proj.1.weight")[1],
        patch_size=patch,
        audio_window=audio_window,
        vae_scale=vf_in // feat - audio_window + 1,
        audio_feature_dim=feat,
        audio_intermediate_dim=need("audio_proj.proj1.weight")[0],
        audio_output_dim=out_a,
        audio_context_tokens=proj3_out // out_a,
    )


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (input and affine), result in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class WanRMSNorm(nn.Module):
    """RMSNorm over the full width: normalise in fp32, cast back to x's dtype, then scale by weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """An fp32 island: the Linear in fp32 whatever the module's dtype (free if the weights are fp32)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # [B, L, H, D] q, k, v -> [B, L, H, D]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, kernel: AttentionFn = attention) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)  # q/k norms span the full width, before the head split
        self.norm_k = WanRMSNorm(dim, eps)
        # The softmax-attention function over [B, L, H, D] (SDPA, or FlashAttention-3 on the fast path: chosen with
        # WanInfiniteTalk(self_attention=...) or set_self_attention). Not a parameter: checkpoint keys unchanged.
        self.kernel: AttentionFn = kernel

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, ref_masks: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x [B, L, dim] -> ([B, L, dim], reference map [B, 3, L] float32 when ref_masks [B, 3, h'w'] given)."""
        b, length, _ = x.shape
        q = apply_rope(self.norm_q(self.q(x)).view(b, length, self.num_heads, -1), cos, sin)
        k = apply_rope(self.norm_k(self.k(x)).view(b, length, self.num_heads, -1), cos, sin)
        v = self.v(x).view(b, length, self.num_heads, -1)
        out = self.o(self.kernel(q, k, v).reshape(b, length, -1))
        ref_map = None
        if ref_masks is not None:
            # Keys of latent frame 0 (the reference frame) are the first h'·w' tokens.
            with torch.no_grad():
                ref_map = reference_attention_map(q, k[:, : ref_masks.shape[-1]], ref_masks)
        return out, ref_map


class CrossAttention(nn.Module):
    """Text + CLIP-image cross-attention (WanI2VCrossAttention): two attentions, outputs summed, then ``o``."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = WanRMSNorm(dim, eps)

    def project(self, context: Tensor, n_img: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """context [B, n_img + text_len, dim] (image tokens first) -> k, v [B, text_len, H, D] and
        k_img, v_img [B, n_img, H, D] (k after norm_k, k_img after norm_k_img). Depends only on the context,
        so it can be computed once per chunk (:meth:`WanInfiniteTalk.text_kv`) and reused on every step."""
        b, n = context.shape[0], self.num_heads
        d = context.shape[-1] // n
        ctx_img, ctx_txt = context[:, :n_img], context[:, n_img:]
        if n_img == 0:
            # No CLIP file: the image branch attends to the text tokens, as ComfyUI native does when its
            # template passes no clip_fea (comfy/ldm/wan/model.py slices the context with None).
            ctx_img = ctx_txt
        k = self.norm_k(self.k(ctx_txt)).view(b, -1, n, d)
        v = self.v(ctx_txt).view(b, -1, n, d)
        k_img = self.norm_k_img(self.k_img(ctx_img)).view(b, -1, n, d)
        v_img = self.v_img(ctx_img).view(b, -1, n, d)
        return k, v, k_img, v_img

    def attend(self, x: Tensor, k: Tensor, v: Tensor, k_img: Tensor, v_img: Tensor) -> Tensor:
        """x [B, L, dim] attends to the projected context from :meth:`project` -> [B, L, dim]."""
        b, n = x.shape[0], self.num_heads
        q = self.norm_q(self.q(x)).view(b, -1, n, x.shape[-1] // n)
        # No text padding mask: padded rows are attended like real tokens (docs/model.md §3.2, §14a).
        out = attention(q, k, v).reshape(b, x.shape[1], -1) + attention(q, k_img, v_img).reshape(b, x.shape[1], -1)
        return self.o(out)

    def forward(self, x: Tensor, context: Tensor, n_img: int) -> Tensor:
        """x [B, L, dim]; context [B, n_img + text_len, dim] with the image tokens first."""
        return self.attend(x, *self.project(context, n_img))


class AudioCrossAttention(nn.Module):
    """Per-latent-frame attention of visual tokens on that frame's audio tokens (SingleStreamMutiAttention).

    qk_norm is off in the released model, so there are no q/k norm weights.
    """

    def __init__(self, dim: int, audio_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)  # first dim outputs are K, the next dim are V
        self.proj = nn.Linear(dim, dim)

    def project(self, audio: Tensor, rotate: bool) -> tuple[Tensor, Tensor]:
        """audio [B·F, Na, audio_dim] (per person 32 tokens, person-major) -> k, v [B·F, Na, H, D].

        rotate (two speakers): L-RoPE on the keys, the first Na/2 (person 1) at position 2, the rest
        (person 2) at 22. Depends only on the audio tokens, so it can be computed once per chunk
        (:meth:`WanInfiniteTalk.audio_kv`). Without rotation k and v are strided views of one projection.
        """
        n = self.num_heads
        kv = self.kv_linear(audio).view(audio.shape[0], audio.shape[1], 2, n, -1)
        k, v = kv.unbind(2)  # first dim outputs are K, the next dim are V
        if rotate:
            # Audio keys sit at the centre of their speaker's range: person 1 (first half) 2, person 2 22.
            key_pos = torch.full((audio.shape[1],), sum(SPEAKER2_RANGE) / 2, device=audio.device)
            key_pos[: audio.shape[1] // 2] = sum(SPEAKER1_RANGE) / 2
            k = rope_1d(k, key_pos)
            v = v.contiguous()  # so a cached v does not keep the unrotated K half of kv alive
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, num_frames: int, positions: Tensor | None = None) -> Tensor:
        """x [B, F·S, dim] attends per latent frame to k, v [B·F, Na, H, D] from :meth:`project` -> [B, F·S, dim].

        positions: [B, F·S] L-RoPE positions of the visual tokens (two speakers, keys projected with
        ``rotate=True``) or None (one speaker).
        """
        b, length, dim = x.shape
        n = self.num_heads
        s = length // num_frames
        q = self.q_linear(x).view(b, length, n, dim // n)
        if positions is not None:
            q = rope_1d(q, positions)
        out = attention(q.reshape(b * num_frames, s, n, dim // n), k, v)  # batch row = (item, latent frame)
        return self.proj(out.reshape(b, length, dim))

    def forward(self, x: Tensor, audio: Tensor, num_frames: int, positions: Tensor | None = None) -> Tensor:
        """x [B, F·S, dim]; audio [B·F, Na, audio_dim] (per person 32 tokens, person-major).

        positions: [B, F·S] L-RoPE positions of the visual tokens (two speakers) or None (one speaker).
        With positions, the first Na/2 audio keys (person 1) get position 2 and the rest (person 2) 22.
        """
        return self.attend(x, *self.project(audio, positions is not None), num_frames, positions)


class BlockKV(NamedTuple):
    """One block's projected context: what its two cross-attentions use as keys and values.

    Constant over the denoising steps of a chunk (it depends only on the context and audio tokens), so
    :meth:`WanInfiniteTalk.text_kv` / :meth:`WanInfiniteTalk.audio_kv` compute it once per chunk. Every
    block's entry has the same shapes, dtypes and strides, so one compiled block graph serves all blocks.
    """

    k: Tensor  # [B, text_len, H, D] text keys after norm_k
    v: Tensor  # [B, text_len, H, D]
    k_img: Tensor  # [B, Ni, H, D] CLIP keys after norm_k_img (with no CLIP tokens: the text through k_img)
    v_img: Tensor  # [B, Ni, H, D]
    k_audio: Tensor  # [B·F, Na, H, D] audio keys, L-RoPE applied for two speakers
    v_audio: Tensor  # [B·F, Na, H, D]


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, self_attention: AttentionFn = attention) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, self_attention)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)  # cross-attention input norm
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.audio_cross_attn = AudioCrossAttention(dim, cfg.audio_output_dim, cfg.num_heads)
        self.norm_x = WanLayerNorm(dim, cfg.eps, elementwise_affine=True)  # eps 1e-6 (official; native uses 1e-5)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        cos: Tensor,
        sin: Tensor,
        context: Tensor | None,
        n_img: int,
        audio: Tensor | None,
        num_frames: int,
        ref_masks: Tensor | None,
        kv: BlockKV | None = None,
    ) -> Tensor:
        """x [B, L, dim] (module dtype); e0 [B, 6, dim] fp32; audio [B·F, Na, audio_dim].

        kv: this block's precomputed context K/V; when given, ``context`` and ``audio`` are not read (pass None)
        and the result is the one the block computes from them (the same ops on the same inputs).
        """
        dtype = x.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)

        h = (self.norm1(x).float() * (1 + scale1) + shift1).to(dtype)
        y, ref_map = self.self_attn(h, cos, sin, ref_masks)
        x = (x.float() + y.float() * gate1).to(dtype)  # gated residual in fp32

        # no gate, no modulation
        if kv is None:
            assert context is not None
            x = x + self.cross_attn(self.norm3(x), context, n_img)
        else:
            x = x + self.cross_attn.attend(self.norm3(x), kv.k, kv.v, kv.k_img, kv.v_img)

        positions = None if ref_map is None else speaker_positions(ref_map)
        if kv is None:
            assert audio is not None
            x = x + self.audio_cross_attn(self.norm_x(x), audio, num_frames, positions)
        else:
            x = x + self.audio_cross_attn.attend(self.norm_x(x), kv.k_audio, kv.v_audio, num_frames, positions)

        y = self.ffn((self.norm2(x).float() * (1 + scale2) + shift2).to(dtype))
        return (x.float() + y.float() * gate2).to(dtype)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x [B, L, dim], e [B, dim] fp32 (the time embedding, not e0) -> [B, L, prod(patch)·out_dim] fp32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return _linear_fp32(self.head, self.norm(x).float() * (1 + scale) + shift)


class ImageEmbedding(nn.Module):
    """CLIP features -> context tokens (official MLPProj): LN -> Linear -> GELU -> Linear -> LN (eps 1e-5)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            WanLayerNorm(in_dim, 1e-5, elementwise_affine=True),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            WanLayerNorm(out_dim, 1e-5, elementwise_affine=True),
        )

    def forward(self, clip_fea: Tensor) -> Tensor:
        return self.proj(clip_fea)


class AudioProj(nn.Module):
    """wav2vec2 windows -> audio context tokens (official AudioProjModel, docs/model.md §5.2)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        inter, out = cfg.audio_intermediate_dim, cfg.audio_output_dim
        self.context_tokens = cfg.audio_context_tokens
        self.proj1 = nn.Linear(cfg.audio_window * cfg.audio_feature_dim, inter)
        self.proj1_vf = nn.Linear((cfg.audio_window + cfg.vae_scale - 1) * cfg.audio_feature_dim, inter)
        self.proj2 = nn.Linear(inter, inter)
        self.proj3 = nn.Linear(inter, cfg.audio_context_tokens * out)
        self.norm = WanLayerNorm(out, 1e-5, elementwise_affine=True)  # official: fp32, default eps

    def forward(self, first: Tensor, rest: Tensor) -> Tensor:
        """first [N, W, A], rest [N, F-1, W+s-1, A] (from :func:`select_audio_windows`) -> [N, F, T, C]."""
        h0 = torch.relu(self.proj1(first.flatten(-2)))[:, None]  # [N, 1, I]
        h1 = torch.relu(self.proj1_vf(rest.flatten(-2)))  # [N, F-1, I]
        h = torch.relu(self.proj2(torch.cat([h0, h1], dim=1)))
        tokens = self.proj3(h).unflatten(-1, (self.context_tokens, -1))  # [N, F, T, C]
        return self.norm(tokens)


@dataclass(frozen=True, eq=False)
class TextKV:
    """Per-block text + image K/V of one embedded context (:meth:`WanInfiniteTalk.text_kv`).

    blocks[i] = (k, v, k_img, v_img) of block i, shapes as in :class:`BlockKV`. For the released DiT in bf16
    that is (512 + 257) tokens x 5120 x 2 x 2 bytes x 40 blocks = 0.63 GB per context.
    """

    blocks: tuple[tuple[Tensor, Tensor, Tensor, Tensor], ...]
    batch: int  # 1 (expanded to any batch) or B


@dataclass(frozen=True, eq=False)
class AudioKV:
    """Per-block audio K/V of one set of audio tokens (:meth:`WanInfiniteTalk.audio_kv`).

    blocks[i] = (k_audio, v_audio) of block i, [B·F, P·T, H, D]; released bf16: 21 x 32 x 5120 x 2 x 2 bytes x
    40 blocks = 0.55 GB per speaker at 81 frames. Rotated (L-RoPE keys) exactly when num_people == 2.
    """

    blocks: tuple[tuple[Tensor, Tensor], ...]
    batch: int  # B
    num_people: int  # P
    num_frames: int  # F, latent frames


@dataclass(frozen=True, eq=False)
class ContextKV:
    """What :meth:`WanInfiniteTalk.forward` takes as ``context_kv=``: one context's and one audio input's K/V.

    Parts may be shared between pairs (render.py: the positive/negative prompt with the real/null audio), so
    building a pair costs nothing beyond its two parts.
    """

    text: TextKV
    audio: AudioKV


@dataclass(frozen=True, eq=False)
class ContextEmb:
    """One pass's conditioning as embeddings (:meth:`WanInfiniteTalk.condition`): every block projects them on every
    step. The render uses it only where K/V cannot be precomputed (blocks streamed in low-memory mode)."""

    context: Tensor  # [1 or B, Ni + text_len, dim] from embed_context
    audio: Tensor  # [B, P, F, T, C] from embed_audio


# What WanInfiniteTalk.forward takes as ``cond``: the same conditioning, embedded or projected.
Conditioning = ContextEmb | ContextKV
# TeaCache's call: (tokens, e0, run_blocks) -> tokens after the blocks (or their estimate)
BlockCache = Callable[[Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor]


class WanInfiniteTalk(nn.Module):
    """The Wan 2.1 I2V DiT with InfiniteTalk's audio adapter; one module, released key names."""

    def __init__(self, cfg: DiTConfig, *, self_attention: AttentionFn = attention) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([Block(cfg, self_attention) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.img_emb = ImageEmbedding(cfg.clip_dim, dim)
        self.audio_proj = AudioProj(cfg)
        # (grid, device) -> (cos, sin) RoPE tables; a plain attribute, so not in the state dict.
        self._rope_cache: dict[tuple[tuple[int, int, int], str], tuple[Tensor, Tensor]] = {}
        # engine.offload.stream_blocks sets its BlockStreamer here while the blocks' weights live in host memory
        # (low-memory mode); see blocks_streamed. A plain attribute: not a submodule, not in the state dict.
        self._block_streamer: object | None = None

    def set_self_attention(self, kernel: AttentionFn) -> int:
        """Run every block's self-attention with ``kernel`` (e.g. engine.attention.flash3_attention); returns the
        number of blocks. Call before compiling the blocks (a compiled graph keeps the function it was traced with).
        """
        for block in self._blocks():
            block.self_attn.kernel = kernel
        return len(self.blocks)

    @property
    def self_attention(self) -> AttentionFn:
        """The self-attention function the blocks run."""
        return self._blocks()[0].self_attn.kernel

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def rope_tables(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached fp32 3D RoPE tables for a token grid (constant across steps and chunks)."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 8:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_3d_tables(grid, self.cfg.head_dim, device)
        return self._rope_cache[key]

    def embed_time(self, t: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """t [B] or [1] in [0, 1000] -> (e [B, dim], e0 [B, 6, dim]), both fp32."""
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        s = sinusoidal_embedding(t, self.cfg.freq_dim)
        e = _linear_fp32(self.time_embedding[2], F.silu(_linear_fp32(self.time_embedding[0], s)))
        e0 = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.cfg.dim))
        return e, e0

    def embed_context(self, context: Tensor, clip_fea: Tensor | None) -> Tensor:
        """context [B, Lt, text_dim] (Lt <= text_len), clip_fea [B, Ni, clip_dim] -> [B, Ni + text_len, dim].

        The text is zero-padded to text_len before the MLP and nothing masks the padding (official).
        Rows of a batch with different real lengths are padded the same way, so callers may pre-pad.
        Constant per chunk: compute once and pass as ``context_emb=`` to :meth:`forward`.
        """
        lt = context.shape[1]
        if lt > self.cfg.text_len:
            raise ValueError(f"text context has {lt} tokens; at most {self.cfg.text_len} are supported")
        text = F.pad(context.to(self.dtype), (0, 0, 0, self.cfg.text_len - lt))
        if clip_fea is None:  # no CLIP file: text tokens only (see WanI2VCrossAttention.forward)
            return self.text_embedding(text)
        return torch.cat([self.img_emb(clip_fea.to(self.dtype)), self.text_embedding(text)], dim=1)

    def embed_audio(self, audio: Tensor) -> Tensor:
        """audio [B, P, Fv, audio_window, audio_feature_dim] -> tokens [B, P, F, T, C] (F = (Fv-1)/vae_scale+1).

        Constant per chunk: compute once and pass as ``audio_emb=`` to :meth:`forward`.
        """
        cfg = self.cfg
        if audio.ndim != 5 or audio.shape[-2:] != (cfg.audio_window, cfg.audio_feature_dim):
            raise ValueError(
                f"audio must be [B, P, Fv, {cfg.audio_window}, {cfg.audio_feature_dim}], got {tuple(audio.shape)}"
            )
        first, rest = select_audio_windows(audio.to(self.dtype), cfg.vae_scale)
        tokens = self.audio_proj(first.flatten(0, 1), rest.flatten(0, 1))
        return tokens.unflatten(0, audio.shape[:2])

    @property
    def blocks_streamed(self) -> bool:
        """True while engine.offload streams the blocks (it sets ``_block_streamer``): their weights are on the
        device only inside each block's call, so context K/V cannot be precomputed outside it."""
        return self._block_streamer is not None

    def _check_not_streamed(self) -> None:
        if self.blocks_streamed:
            raise RuntimeError("the DiT's blocks are streamed (low-memory mode): their weights are not on the device "
                               "outside a forward, so context K/V cannot be precomputed; pass context_emb/audio_emb")

    def text_kv(self, context_emb: Tensor) -> TextKV:
        """context_emb [1 or B, Ni + text_len, dim] from :meth:`embed_context` -> every block's text + image K/V.

        Exactly what each block computes from ``context_emb`` in :meth:`forward` (same ops, same inputs), so a
        forward with the cache is bit-identical to one without at the same batch. Constant per chunk. Raises
        RuntimeError when the blocks are streamed (see :attr:`blocks_streamed`).
        """
        self._check_not_streamed()
        context = context_emb.to(self.dtype)
        n_img = context.shape[1] - self.cfg.text_len
        if n_img < 0:
            raise ValueError(f"context_emb has {context.shape[1]} tokens, fewer than text_len {self.cfg.text_len}")
        blocks = tuple(block.cross_attn.project(context, n_img) for block in self._blocks())
        return TextKV(blocks=blocks, batch=context.shape[0])

    def audio_kv(self, audio_emb: Tensor) -> AudioKV:
        """audio_emb [B, P, F, T, C] from :meth:`embed_audio` -> every block's audio K/V (L-RoPE keys for P = 2).

        Exactly what each block computes from ``audio_emb`` in :meth:`forward`. Constant per chunk. Raises
        RuntimeError when the blocks are streamed (see :attr:`blocks_streamed`).
        """
        self._check_not_streamed()
        if audio_emb.ndim != 5 or audio_emb.shape[1] not in (1, 2):
            raise ValueError(f"audio_emb must be [B, P, F, T, C] with 1 or 2 speakers, got {tuple(audio_emb.shape)}")
        tokens = self._audio_tokens(audio_emb)
        rotate = audio_emb.shape[1] == 2  # two speakers: the blocks get speaker positions, keys are rotated
        blocks = tuple(block.audio_cross_attn.project(tokens, rotate) for block in self._blocks())
        b, p, f = audio_emb.shape[:3]
        return AudioKV(blocks=blocks, batch=b, num_people=p, num_frames=f)

    def context_kv(self, context_emb: Tensor, audio_emb: Tensor) -> ContextKV:
        """Both caches for one (context, audio) pair; pass as ``context_kv=`` to :meth:`forward`."""
        return ContextKV(self.text_kv(context_emb), self.audio_kv(audio_emb))

    def _blocks(self) -> list[Block]:
        return cast("list[Block]", list(self.blocks))

    def _audio_tokens(self, audio_emb: Tensor) -> Tensor:
        """[B, P, F, T, C] -> [B·F, P·T, C] in the module dtype: per latent frame, person 1's tokens then person 2's."""
        return audio_emb.to(self.dtype).transpose(1, 2).flatten(2, 3).flatten(0, 1)

    def condition(self, context: Tensor, clip_fea: Tensor | None, audio: Tensor) -> ContextEmb:
        """The raw conditioning -> :class:`ContextEmb` for :meth:`forward`: context [B, Lt, text_dim], clip_fea
        [B, Ni, clip_dim] or None, audio [B, P, 4(F-1)+1, W, A] (see :meth:`embed_context`, :meth:`embed_audio`)."""
        return ContextEmb(self.embed_context(context, clip_fea), self.embed_audio(audio))

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cond: Conditioning, ref_target_masks: Tensor | None = None,
                *, block_cache: BlockCache | None = None) -> Tensor:
        """Predict the flow velocity.

        x [B, 16, F, h, w] noisy latent; t [B] (or [1]) timesteps in [0, 1000]; y [B, 20, F, h, w] (4 mask + 16
        reference-latent channels); cond: the text/image context and the audio of this pass, either as embeddings
        (:meth:`condition`; the blocks project them on every step) or as every block's projected K/V
        (:meth:`context_kv`, constant per chunk; bit-identical to the embeddings it was built from at the same
        batch; a batch-1 text cache is expanded to B, the same math but possibly other rounding);
        ref_target_masks [B or 1, 3, h, w] (person 1, person 2, background), required for two speakers.
        block_cache (engine.teacache.TeaCache) is called as ``block_cache(tokens, e0, run_blocks)`` in place of
        running the block stack and may return an estimate instead (an approximation, used only when given).
        Returns [B, out_dim, F, h, w] float32.
        """
        cfg = self.cfg
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)
        inputs = self._block_inputs(cond, b, grid[0])

        # Patchify [x (16) | y (20)] -> [B, L, dim], tokens frame-major, then row, then column.
        tokens = self.patch_embedding(torch.cat([x, y], dim=1).to(self.dtype)).flatten(2).transpose(1, 2)
        e, e0 = self.embed_time(t.to(x.device), b)
        ref_masks = None
        if inputs.num_people == 2:
            if ref_target_masks is None:
                raise ValueError("two speakers need ref_target_masks [B, 3, h, w]")
            ref_masks = token_masks(ref_target_masks.to(x.device), grid[1:]).expand(b, -1, -1)
        cos, sin = self.rope_tables(grid, x.device)

        def run_blocks(tokens: Tensor) -> Tensor:
            for block, kv in zip(self.blocks, inputs.block_kv):
                tokens = block(tokens, e0, cos, sin, inputs.context, inputs.n_img, inputs.audio_tokens, grid[0],
                               ref_masks, kv)
            return tokens

        tokens = run_blocks(tokens) if block_cache is None else block_cache(tokens, e0, run_blocks)

        out = self.head(tokens, e)  # [B, L, pt·ph·pw·C] fp32, C fastest
        out = out.view(b, *grid, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def _block_inputs(self, cond: Conditioning, b: int, frames: int) -> _BlockInputs:
        """What every block reads from ``cond`` at batch ``b`` and ``frames`` latent frames, checked."""
        if isinstance(cond, ContextKV):
            text, aud = cond.text, cond.audio
            if len(text.blocks) != len(self.blocks) or len(aud.blocks) != len(self.blocks):
                raise ValueError(f"context_kv holds {len(text.blocks)}/{len(aud.blocks)} blocks; the DiT has "
                                 f"{len(self.blocks)}")
            if aud.batch != b or aud.num_frames != frames:
                raise ValueError(f"audio K/V of batch {aud.batch} and {aud.num_frames} latent frames do not match "
                                 f"batch {b} and {frames} latent frames")
            if text.batch not in (1, b):
                raise ValueError(f"context K/V batch {text.batch} does not match batch {b}")
            block_kv: list[BlockKV | None] = []
            for tkv, akv in zip(text.blocks, aud.blocks):
                k, v, k_img, v_img = (t.expand(b, -1, -1, -1) for t in tkv)  # a view; no copy at b = 1
                block_kv.append(BlockKV(k, v, k_img, v_img, *akv))
            inputs = _BlockInputs(block_kv, None, 0, None, aud.num_people)
        elif isinstance(cond, ContextEmb):
            context_emb, audio_emb = cond.context, cond.audio
            if audio_emb.shape[0] != b or audio_emb.shape[2] != frames:
                raise ValueError(f"audio tokens {tuple(audio_emb.shape)} do not match batch {b} and {frames} latent "
                                 "frames")
            if context_emb.shape[0] not in (1, b):
                raise ValueError(f"context batch {context_emb.shape[0]} does not match batch {b}")
            context_in = context_emb.to(self.dtype).expand(b, -1, -1)
            inputs = _BlockInputs([None] * len(self.blocks), context_in, context_in.shape[1] - self.cfg.text_len,
                                  self._audio_tokens(audio_emb), audio_emb.shape[1])
        else:
            raise TypeError(f"cond must be a ContextEmb (WanInfiniteTalk.condition) or a ContextKV "
                            f"(WanInfiniteTalk.context_kv), not {type(cond).__name__}")
        if inputs.num_people not in (1, 2):
            raise ValueError(f"1 or 2 speakers are supported, got {inputs.num_people}")
        return inputs


class _BlockInputs(NamedTuple):
    """The per-forward inputs of the block stack: precomputed K/V per block, or the context and audio tokens."""

    block_kv: list[BlockKV | None]
    context: Tensor | None  # [B, Ni + text_len, dim] when no K/V
    n_img: int
    audio_tokens: Tensor | None  # [B·F, P·T, C] when no K/V
    num_people: int


def build(cfg: DiTConfig, device: torch.device | str) -> WanInfiniteTalk:
    """The DiT with every parameter on the meta device, for a strict ``assign=True`` load.

    The module has no buffers (RoPE tables are computed on the inputs' device), so ``device`` has nothing
    to hold; it is accepted for the common ``build(cfg, device)`` contract of the network files.
    """
    with torch.device("meta"):
        model = WanInfiniteTalk(cfg)
    if any(True for _ in model.buffers()):
        raise RuntimeError(f"DiT: unexpected buffers; build() must create them on {device}")
    return model.eval().requires_grad_(False)
