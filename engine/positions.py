"""Where the DiT's tokens are: timestep embedding, 3-D RoPE, the audio windows per latent frame, and the
two-speaker routing (reference-attention map -> L-RoPE positions). Pure functions over tensors, used by
:mod:`engine.dit` (which re-exports them); split out of it to keep one file per network readable.

Math follows the official InfiniteTalk code (MeiGen-AI/InfiniteTalk ``wan/modules/multitalk_model.py``,
``wan/utils/multitalk_utils.py``); see docs/model.md §3 and §5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKGROUND_POSITION",
    "SPEAKER1_RANGE",
    "SPEAKER2_RANGE",
    "apply_rope",
    "reference_attention_map",
    "rope_1d",
    "rope_3d_tables",
    "select_audio_windows",
    "sinusoidal_embedding",
    "speaker_positions",
    "token_masks",
]

# L-RoPE routing constants (official SingleStreamMutiAttention: class_range=24, class_interval=4).
SPEAKER1_RANGE = (0.0, 4.0)  # person 1's visual tokens get positions in [0, 4], its audio keys 2
SPEAKER2_RANGE = (20.0, 24.0)  # person 2's visual tokens in [20, 24], its audio keys 22
BACKGROUND_POSITION = 12.0  # class_range // 2
# Query chunk size for the reference-attention map: keep one fp32 probability block under ~256 MiB.
_REF_MAP_BUDGET_BYTES = 256 * 2**20


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[B] timesteps -> [B, dim] float32, ordered [cos | sin], frequencies 10000^(-k/(dim/2)); float64 math."""
    half = dim // 2
    pos = t.to(torch.float64).reshape(-1)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = torch.outer(pos, freqs)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()


def _axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (t, h, w): 22/21/21 for head_dim 128 (official rope split)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_3d_tables(
    grid: tuple[int, int, int], head_dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos, sin tables [F·H·W, head_dim/2] for the 3D RoPE of a (frames, rows, cols) token grid.

    Token order is frame-major, then row, then column; positions start at 0 on every axis. Pair i of an
    axis with n pairs rotates with ``pos / 10000^(2i / (2n))`` (time base 44, height/width base 42 for
    head_dim 128). Angles are computed in float64 and returned in ``dtype``.
    """
    per_axis = []
    for size, pairs in zip(grid, _axis_pairs(head_dim)):
        inv = 1.0 / torch.pow(10000.0, torch.arange(pairs, dtype=torch.float64, device=device) * 2 / (2 * pairs))
        per_axis.append(torch.outer(torch.arange(size, dtype=torch.float64, device=device), inv))  # [size, n]
    f, h, w = grid
    angles = torch.cat(
        [
            per_axis[0][:, None, None, :].expand(f, h, w, -1),
            per_axis[1][None, :, None, :].expand(f, h, w, -1),
            per_axis[2][None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, -1)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [..., D] by angles whose cos/sin broadcast to [..., D/2].

    Computed in at least fp32 (float64 stays float64), returned in x's dtype.
    """
    cdt = torch.promote_types(x.dtype, torch.float32)
    x0, x1 = x.to(cdt).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(cdt), sin.to(cdt)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """3D RoPE on x [B, L, H, D] with tables [L, D/2] from :func:`rope_3d_tables`."""
    return _rotate_pairs(x, cos[:, None, :], sin[:, None, :])


def rope_1d(x: Tensor, positions: Tensor) -> Tensor:
    """1-D RoPE over all D channels (base 10000, adjacent pairs) on x [..., L, H, D].

    positions: float, broadcastable to x.shape[:-2] (e.g. [B, L] or [L]). Official
    ``RotaryPositionalEmbedding1D`` (L-RoPE of the two-speaker audio attention).
    """
    d = x.shape[-1]
    cdt = torch.promote_types(x.dtype, torch.float32)
    inv = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, device=x.device, dtype=cdt) / d)
    angles = positions.to(device=x.device, dtype=cdt)[..., None] * inv  # [..., L, D/2]
    return _rotate_pairs(x, torch.cos(angles)[..., None, :], torch.sin(angles)[..., None, :])


def select_audio_windows(audio: Tensor, vae_scale: int) -> tuple[Tensor, Tensor]:
    """Regroup per-video-frame audio windows to latent frames (docs/model.md §5.2).

    audio: [..., Fv, W, A] with Fv = vae_scale·(F-1) + 1 video frames, W window entries (offsets
    -W//2..+W//2). Returns (first [..., W, A]: latent frame 0's whole window, rest [..., F-1, W+s-1, A]):
    for every group of s video frames, the first frame's entries up to the centre, the middle frames'
    centre entries and the last frame's entries from the centre on (8 entries for W=5, s=4).
    """
    fv, w = audio.shape[-3], audio.shape[-2]
    if fv < 1 or (fv - 1) % vae_scale:
        raise ValueError(f"audio has {fv} video frames; expected {vae_scale}*(F-1)+1 for F latent frames")
    mid = w // 2
    first = audio[..., 0, :, :]
    groups = audio[..., 1:, :, :].unflatten(-3, (-1, vae_scale))  # [..., F-1, s, W, A]
    rest = torch.cat(
        [groups[..., 0, : mid + 1, :], groups[..., 1:-1, mid, :], groups[..., -1, mid:, :]],
        dim=-2,
    )
    return first, rest


def token_masks(ref_target_masks: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """[B, C, h, w] latent-resolution class masks -> [B, C, h'·w'] float {0, 1} at token resolution (nearest)."""
    m = F.interpolate(ref_target_masks.float(), size=grid_hw, mode="nearest")
    return (m > 0).flatten(2).float()


def reference_attention_map(q: Tensor, k_ref: Tensor, masks: Tensor) -> Tensor:
    """Attention mass of every query on each class region of the reference frame.

    q: [B, L, H, D] post-RoPE queries; k_ref: [B, Lr, H, D] post-RoPE keys of latent frame 0;
    masks: [B, C, Lr] {0, 1}. Returns [B, C, L] float32: for each class the softmax(q·kᵀ/√D) mass on
    the class's reference tokens divided by the class area, averaged over heads (official
    ``get_attn_map_with_target``). An empty mask yields zeros (not NaN), so it never wins the argmax.
    """
    b, length, h, d = q.shape
    lr = k_ref.shape[1]
    masks = masks.float()
    weights = masks / masks.sum(-1, keepdim=True).clamp(min=1.0)  # [B, C, Lr]
    k_t = k_ref.float().permute(0, 2, 3, 1)  # [B, H, D, Lr]
    out = torch.empty(b, masks.shape[1], length, dtype=torch.float32, device=q.device)
    rows = max(1, _REF_MAP_BUDGET_BYTES // (4 * b * h * lr))
    for s in range(0, length, rows):
        qc = q[:, s : s + rows].float().transpose(1, 2) * d**-0.5  # [B, H, n, D]
        probs = torch.softmax(qc @ k_t, dim=-1)  # [B, H, n, Lr]
        mass = probs @ weights.transpose(1, 2)[:, None]  # [B, H, n, C]
        out[:, :, s : s + rows] = mass.mean(1).transpose(1, 2)
    return out


def speaker_positions(ref_map: Tensor, eps: float = 1e-8) -> Tensor:
    """L-RoPE position of every visual token from the [..., 3, L] reference map (person 1, 2, background).

    Person 1's map is min-max scaled into SPEAKER1_RANGE, person 2's into SPEAKER2_RANGE (min/max over
    all L tokens, ``eps`` added to the range as the official ``normalize_and_scale``); background is
    BACKGROUND_POSITION. Each token takes the value of the class with the largest raw map value.
    Returns [..., L] float32.
    """
    m = ref_map.float()

    def scaled(row: Tensor, lo: float, hi: float) -> Tensor:
        mn, mx = row.amin(-1, keepdim=True), row.amax(-1, keepdim=True)
        return (row - mn) / (mx - mn + eps) * (hi - lo) + lo

    p1 = scaled(m[..., 0, :], *SPEAKER1_RANGE)
    p2 = scaled(m[..., 1, :], *SPEAKER2_RANGE)
    bg = torch.full_like(p1, BACKGROUND_POSITION)
    choice = m.argmax(dim=-2, keepdim=True)  # [..., 1, L]
    return torch.stack([p1, p2, bg], dim=-2).gather(-2, choice).squeeze(-2)
