"""Sampling maths and the long-video chunk plan, as pure functions (torch + stdlib only).

Everything here follows the official InfiniteTalk code (MeiGen-AI/InfiniteTalk,
``wan/multitalk.py`` ``InfiniteTalkPipeline.generate_infinitetalk`` and ``timestep_transform``,
``wan/utils/multitalk_utils.py`` ``MomentumBuffer`` / ``adaptive_projected_guidance``,
``generate_infinitetalk.py`` ``audio_prepare_multi``); see docs/model.md §8 and §9. No model
code lives here: the render loop in ``render.py`` calls these functions around the network.

Deviations from the official code, on purpose:

- Noise is drawn per chunk from a generator seeded from (job seed, chunk index) instead of one
  global RNG stream; the official dead ``randn_like`` calls (noised context latents that the clean
  overwrite replaces in the same step) are not replicated. Chunk 0 still equals the official CPU
  draw ``torch.manual_seed(seed); torch.randn(shape)``.
- When text and audio guidance are both 1 the ``drop_audio`` pass is skipped (the official code
  runs it and multiplies it by zero).
- A speech of at most one window (81 frames, 3.24 s) is accepted: it is rendered as one padded
  window (mirror-padded audio, see :func:`slice_audio`) and the video is trimmed to the speech
  length afterwards. The official CLI rejects such audio.
- Two-speaker ``para`` waveforms of unequal length are padded with trailing silence (the official
  code would fail summing them).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:  # typing only: this module imports nothing but torch at run time
    import numpy as np

_Wave = TypeVar("_Wave", Tensor, "np.ndarray")  # a mono waveform, torch or numpy

__all__ = [
    "timesteps",
    "euler_step",
    "Guidance",
    "passes",
    "combine",
    "APGState",
    "Chunk",
    "plan_chunks",
    "audio_window_indices",
    "slice_audio",
    "combine_two_speakers",
    "combine_waveforms",
    "noise",
]


# --------------------------------------------------------------------------------------------
# Schedule and solver (docs/model.md §8.1)
# --------------------------------------------------------------------------------------------


def timesteps(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """The official shifted flow-matching schedule: ``steps + 1`` values from 1000 down to 0.

    Official: ``np.linspace(1000, 1, steps, dtype=float32)``, append 0, then shift each value in
    float32 with u = t/1000: ``t' = 1000 * s*u / (1 + (s-1)*u)``. We reproduce numpy's linspace
    (computed in float64, last value set exactly to the end point, then cast to float32) and do
    the shift in float32 tensors in the same operation order, so the values are bit-identical to
    the timesteps the official code feeds the network. Example: 4 steps at shift 7 →
    [1000, 933.4, 778.3, 6.96, 0].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    start, stop = float(num_train_timesteps), 1.0
    if steps == 1:
        lin = [start]
    else:
        step = (stop - start) / (steps - 1)
        lin = [start + i * step for i in range(steps)]
        lin[-1] = stop  # numpy pins the end point exactly
    raw = torch.tensor([*lin, 0.0], dtype=torch.float32)  # float32 like the official tensors
    u = raw / num_train_timesteps
    shifted = shift * u / (1 + (shift - 1) * u)
    return [float(x) for x in shifted * num_train_timesteps]


def euler_step(z: Tensor, v: Tensor, t: float, t_next: float) -> Tensor:
    """One Euler step of the flow ODE: ``z - v * (t - t_next) / 1000``.

    ``v`` is the guided velocity prediction (≈ noise − x0). The official code computes
    ``dt = (t - t_next) / 1000`` in float32 and keeps the latent in float32 whatever the model's
    compute dtype; we do the same (result dtype: float32, or float64 if ``z`` is float64).
    """
    out_dtype = torch.promote_types(z.dtype, torch.float32)
    dt = (torch.tensor(t, dtype=torch.float32) - torch.tensor(t_next, dtype=torch.float32)) / 1000
    return z.to(out_dtype) - v.to(out_dtype) * dt.to(device=z.device, dtype=out_dtype)


# --------------------------------------------------------------------------------------------
# Guidance (docs/model.md §8.2, §8.3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance scales. ``apg`` switches to adaptive projected guidance."""

    text: float
    audio: float
    apg: bool = False


def passes(g: Guidance) -> tuple[str, ...]:
    """Which conditioning sets the network must be run on at each step, in the official order.

    - text ≠ 1: ``cond`` (text, audio), ``drop_text`` (negative prompt, audio), ``uncond``
      (negative prompt, null audio).
    - text = 1, audio ≠ 1: ``cond``, ``drop_audio`` (text, null audio).
    - both 1: ``cond`` only (the official code still runs ``drop_audio`` and scales it by 0).

    "= 1" uses ``math.isclose`` like the official code.
    """
    if not math.isclose(g.text, 1.0):
        return ("cond", "drop_text", "uncond")
    if not math.isclose(g.audio, 1.0):
        return ("cond", "drop_audio")
    return ("cond",)


class APGState:
    """Momentum buffers for adaptive projected guidance (arXiv 2410.02416), one per difference.

    ``text`` holds the running average of ``cond - drop_text``; ``audio`` that of
    ``drop_text - uncond`` (3 passes) or ``cond - drop_audio`` (2 passes). Official defaults:
    momentum −0.75, norm threshold 55, eta 0 (``--apg_momentum``, ``--apg_norm_threshold``).

    Create one per **chunk**: the official code builds its two ``MomentumBuffer`` objects inside
    the chunk loop, just before the step loop, so momentum never carries across chunks.
    """

    def __init__(self, momentum: float = -0.75, norm_threshold: float = 55.0, eta: float = 0.0) -> None:
        self.momentum = momentum
        self.norm_threshold = norm_threshold
        self.eta = eta
        self.text: Tensor | None = None  # running average, same shape as the predictions
        self.audio: Tensor | None = None

    def guide(self, name: str, diff: Tensor, cond: Tensor) -> Tensor:
        """Update buffer ``name`` with ``diff`` and return the projected update for it.

        1. running = diff + momentum * running (running starts at 0);
        2. scale running by min(1, threshold / ||running||), the L2 norm over the last four dims
           (C, T, H, W), per leading index;
        3. split into components parallel / orthogonal to ``cond`` (computed in float64, as the
           official ``project``) and return orthogonal + eta * parallel.
        """
        if diff.ndim < 4:
            raise ValueError(f"APG expects predictions shaped [..., C, T, H, W], got {tuple(diff.shape)}")
        prev = getattr(self, name)
        running = diff if prev is None else diff + self.momentum * prev
        setattr(self, name, running)
        dims = (-1, -2, -3, -4)
        if self.norm_threshold > 0:
            norm = running.norm(p=2, dim=dims, keepdim=True)
            running = running * torch.minimum(torch.ones_like(running), self.norm_threshold / norm)
        d64 = running.double()
        c64 = cond.double()
        unit = c64 / c64.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)  # = F.normalize over (C, T, H, W)
        parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
        orthogonal = d64 - parallel
        update: Tensor = orthogonal.to(diff.dtype) + self.eta * parallel.to(diff.dtype)
        return update


def combine(g: Guidance, preds: dict[str, Tensor], apg_state: APGState | None = None) -> Tensor:
    """Combine the per-pass predictions (keys as returned by :func:`passes`) into one velocity.

    Plain CFG (official operation order):
      3 passes: ``uncond + s_text*(cond - drop_text) + s_audio*(drop_text - uncond)``
      2 passes: ``drop_audio + s_audio*(cond - drop_audio)``
      1 pass:   ``cond``
    APG (``g.apg``; needs ``apg_state`` kept across the steps of one chunk):
      3 passes: ``cond + (s_text-1)*APG_text(cond - drop_text) + (s_audio-1)*APG_audio(drop_text - uncond)``
      2 passes: ``cond + (s_audio-1)*APG_audio(cond - drop_audio)``
      1 pass:   ``cond`` (officially ``cond + 0*APG(...)``)
    The APG buffers are updated even when a factor is 0, as in the official code.
    """
    mode = passes(g)
    missing = [k for k in mode if k not in preds]
    if missing:
        raise KeyError(f"combine needs predictions for {mode}, missing {missing}")
    cond = preds["cond"]
    if len(mode) == 1:
        return cond
    if g.apg:
        if apg_state is None:
            raise ValueError("Guidance.apg is set: pass an APGState created for this chunk")
        if len(mode) == 2:
            return cond + (g.audio - 1) * apg_state.guide("audio", cond - preds["drop_audio"], cond)
        drop_text, uncond = preds["drop_text"], preds["uncond"]
        text_term = (g.text - 1) * apg_state.guide("text", cond - drop_text, cond)
        audio_term = (g.audio - 1) * apg_state.guide("audio", drop_text - uncond, cond)
        return cond + text_term + audio_term
    if len(mode) == 2:
        drop_audio = preds["drop_audio"]
        return drop_audio + g.audio * (cond - drop_audio)
    drop_text, uncond = preds["drop_text"], preds["uncond"]
    return uncond + g.text * (cond - drop_text) + g.audio * (drop_text - uncond)


# --------------------------------------------------------------------------------------------
# Chunk plan (docs/model.md §9)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One window of the streaming loop, in output-timeline video frames."""

    index: int
    start: int  # first video frame of the window (0, 72, 144, ... with the defaults)
    frames: int  # window length (81): every chunk denoises a full window, the last one too
    keep_from: int  # first frame of the decoded window to append: 0 for chunk 0, motion_frames after
    is_last: bool


def plan_chunks(num_frames: int, frame_window: int = 81, motion_frames: int = 9) -> list[Chunk]:
    """The official streaming loop's chunks for ``num_frames`` output frames.

    ``num_frames`` is the output length: ``min(max_frame_num, audio frames)`` in the official
    code. Chunk 0 starts at 0; each next chunk starts ``frame_window - motion_frames`` (72) later
    and re-creates the previous chunk's last ``motion_frames`` (9) frames, which are dropped. A
    chunk is the last when ``start + frame_window >= num_frames``, so there are
    ``1 + ceil((N - 81) / 72)`` chunks for N > 81 and 1 for N <= 81. The chunks yield
    ``81 + 72*(chunks-1) >= N`` frames; the caller trims the concatenation to N. For N <= 81 (the
    official CLI rejects it) the single chunk is a full padded window, trimmed likewise.

    ``frame_window`` must be 4n+1 (the VAE's 4x time compression plus the first frame) and so
    must ``motion_frames``, so that the context frames map to whole latents (9 → 3).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frame_window < 5 or (frame_window - 1) % 4:
        raise ValueError(f"frame_window must be 4n+1 and >= 5, got {frame_window}")
    if not 0 < motion_frames < frame_window or (motion_frames - 1) % 4:
        raise ValueError(f"motion_frames must be 4n+1 and below frame_window, got {motion_frames}")
    stride = frame_window - motion_frames
    chunks: list[Chunk] = []
    start = 0
    while True:
        index = len(chunks)
        last = start + frame_window >= num_frames
        chunks.append(Chunk(index, start, frame_window, 0 if index == 0 else motion_frames, last))
        if last:
            return chunks
        start += stride


def audio_window_indices(start: int, frames: int, total: int, window: int = 5) -> Tensor:
    """Per-frame audio windows: LongTensor [frames, window] of indices into a [total, ...] embedding.

    Row i holds ``start + i + (-2, -1, 0, 1, 2)`` (for window 5) clamped to ``[0, total - 1]``.
    As in the official code the clamp is against the **whole** (possibly mirror-padded) audio,
    not the chunk, so windows use real neighbouring audio across chunk boundaries.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and positive, got {window}")
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    offsets = torch.arange(window) - window // 2  # [window]
    centres = torch.arange(start, start + frames).unsqueeze(1)  # [frames, 1]
    return (centres + offsets.unsqueeze(0)).clamp(0, total - 1)


def _mirror_pad(emb: Tensor, miss: int) -> Tensor:
    """Append ``miss`` frames: the time-reversed tail (official ``flip(emb[-miss:])``).

    If ``miss`` exceeds the length (only for a speech shorter than about half a window), keep
    reflecting back and forth (symmetric, edge repeated) until ``miss`` frames are appended.
    """
    n = emb.shape[0]
    if miss <= n:
        return torch.cat([emb, emb[n - miss :].flip(0)], dim=0)
    # symmetric reflection of the index sequence: n-1, ..., 0, 0, ..., n-1, n-1, ...
    period = torch.arange(2 * n)
    refl = torch.where(period < n, n - 1 - period, period - n)
    idx = refl.repeat(math.ceil(miss / (2 * n)))[:miss]
    return torch.cat([emb, emb[idx]], dim=0)


def slice_audio(emb: Tensor, chunk: Chunk, window: int = 5) -> Tensor:
    """One person's audio windows for one chunk: [N, ...] features → [frames, window, D].

    ``emb`` is the per-person wav2vec2 stack [N, L, H] (N video frames at 25 fps, L = 12 layers,
    H = 768); the trailing dims are flattened to D = L*H. On the **last** chunk, when the window
    reaches the end of this person's audio (``start + frames >= N``), the official code appends
    the time-reversed last ``miss = start + frames - N + 3`` frames (docs/model.md §9.2) and clamps
    against the padded length; earlier chunks only clamp. The padded frames land past the speech
    end, in frames the caller trims away (they still steer the kept frames through attention).
    """
    if emb.ndim < 2:
        raise ValueError(f"emb must be [N, ...] features, got {tuple(emb.shape)}")
    end = chunk.start + chunk.frames
    n = emb.shape[0]
    if chunk.is_last and end >= n:
        emb = _mirror_pad(emb, end - n + 3)
    idx = audio_window_indices(chunk.start, chunk.frames, emb.shape[0], window)  # [frames, window]
    return emb.reshape(emb.shape[0], -1)[idx.to(emb.device)]  # [frames, window, D]


# --------------------------------------------------------------------------------------------
# Two speakers (docs/model.md §6, §13)
# --------------------------------------------------------------------------------------------


def combine_two_speakers(emb1: Tensor, emb2: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Combine two per-person **embeddings** [N, ...] (the ComfyUI-native way; zero = no audio).

    ``para``: both as given, the shorter zero-padded at the end to the same length.
    ``add``: person 1 speaks, then person 2: ``[emb1; 0*len(emb2)]`` and ``[0*len(emb1); emb2]``.

    The engine should NOT use this: zeros are not what wav2vec2 produces for silence. The
    official code pads the **waveforms** with silence and encodes each padded track
    (:func:`combine_waveforms`); kept for comparison and for precomputed embeddings.
    """
    if emb1.shape[1:] != emb2.shape[1:]:
        raise ValueError(f"feature shapes differ: {tuple(emb1.shape)} vs {tuple(emb2.shape)}")
    n1, n2 = emb1.shape[0], emb2.shape[0]
    if mode == "para":
        n = max(n1, n2)
        return _pad_end(emb1, n), _pad_end(emb2, n)
    if mode == "add":
        z1 = emb1.new_zeros((n1, *emb1.shape[1:]))
        z2 = emb2.new_zeros((n2, *emb2.shape[1:]))
        return torch.cat([emb1, z2], dim=0), torch.cat([z1, emb2], dim=0)
    raise ValueError(f"mode must be 'para' or 'add', got {mode!r}")


def combine_waveforms(w1: _Wave | None, w2: _Wave | None, mode: str) -> tuple[_Wave, _Wave]:
    """Combine two mono waveforms [samples] the official way (``audio_prepare_multi``).

    A missing track (``None``) becomes silence as long as the other. ``para``: both play together
    (official requires equal lengths; we pad the shorter with trailing silence). ``add``: person 1
    then person 2, each padded with silence to the total length:
    ``[w1; 0*len(w2)]`` and ``[0*len(w1); w2]``. As upstream, call it on tracks that are already
    loudness-normalised one by one; then encode each result with wav2vec2 on its own, so the
    silence is *encoded*. The mux track is ``w1' + w2'``. (Official quirk kept: ``add`` with a
    missing track doubles the length, the first half silent.)

    Accepts torch tensors or numpy arrays (the engine's audio is numpy) and returns the same kind;
    numpy is handled through ``torch.as_tensor`` so this module does not import it.
    """
    if w1 is not None and w2 is not None:
        t1, t2 = torch.as_tensor(w1), torch.as_tensor(w2)
    elif w1 is not None:
        t1 = torch.as_tensor(w1)
        t2 = t1.new_zeros(t1.shape)
    elif w2 is not None:
        t2 = torch.as_tensor(w2)
        t1 = t2.new_zeros(t2.shape)
    else:
        raise ValueError("at least one waveform is needed")
    as_numpy = not isinstance(w1 if w1 is not None else w2, Tensor)
    if t1.ndim != 1 or t2.ndim != 1:
        raise ValueError(f"waveforms must be 1-D mono, got {tuple(t1.shape)} and {tuple(t2.shape)}")
    if mode == "para":
        n = max(t1.shape[0], t2.shape[0])
        out1, out2 = _pad_end(t1, n), _pad_end(t2, n)
    elif mode == "add":
        out1, out2 = torch.cat([t1, t2.new_zeros(t2.shape)]), torch.cat([t1.new_zeros(t1.shape), t2])
    else:
        raise ValueError(f"mode must be 'para' or 'add', got {mode!r}")
    if as_numpy:
        return out1.numpy(), out2.numpy()  # type: ignore[return-value]
    return out1, out2  # type: ignore[return-value]


def _pad_end(x: Tensor, n: int) -> Tensor:
    """Zero-pad ``x`` along dim 0 at the end to length ``n``."""
    if x.shape[0] >= n:
        return x
    return torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))], dim=0)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def _chunk_seed(seed: int, chunk_index: int) -> int:
    """Generator seed for a chunk: the job seed for chunk 0, a SHA-256 derived 64-bit value after."""
    if chunk_index == 0:
        return seed
    digest = hashlib.sha256(f"infinitetalkd-noise:{seed}:{chunk_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def noise(shape: tuple[int, ...] | list[int], seed: int, chunk_index: int, device: torch.device | str) -> Tensor:
    """Initial latent noise for one chunk: float32 standard normal, deterministic in (seed, chunk).

    Drawn on the CPU from a ``torch.Generator`` seeded with :func:`_chunk_seed` and then moved to
    ``device``, so a job renders the same noise on any machine. Chunk 0 is exactly the official
    draw on CPU (``torch.manual_seed(seed); torch.randn(shape)``); later chunks differ from the
    official stream, which also contains dead ``randn_like`` calls we do not replicate.
    """
    if seed < 0 or seed >= 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if chunk_index < 0:
        raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
    gen = torch.Generator(device="cpu").manual_seed(_chunk_seed(seed, chunk_index))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device)
