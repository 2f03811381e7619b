"""The job plan: everything a render decides once, before its first chunk.

:func:`plan_job` decodes the inputs (reference picture or source video, speech, masks), picks the output size,
turns the speech into wav2vec2 features, the prompts into umT5 embeddings (through the engine's cache), the
two-speaker regions into latent masks, and lays out the chunks and timesteps. Nothing here runs the DiT; the
chunk loop in engine/render.py reads the plan and never changes it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from engine import frames as fr
from engine import media, sampling
from engine.api import InputError, RenderRequest
from engine.audio import audio_features, frames_for_duration
from engine.models import Models
from engine.writer import FPS

SAMPLE_RATE = 16000
OUTPUT_AUDIO_RATE = 48000  # the mp4 carries the speech at this rate (the model only needs 16 kHz)


class Laps:
    """Wall time per named stage of one render, summed over chunks (RenderResult.timings)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        """Add the time since the previous lap to ``name``."""
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._clock
        self._clock = now


@dataclass
class JobPlan:
    """What one render decided before its first chunk (read-only to the chunk loop)."""

    req: RenderRequest
    height: int
    width: int
    reader: media.VideoReader | None  # the source video when dubbing (open for the job), else None
    ref_img: np.ndarray  # [H, W, 3] uint8: the first picture at output size, the colour reference
    ref_t: torch.Tensor  # the same as [3, H, W] in [-1, 1] (CPU)
    ref_match: torch.Tensor  # ref_t where the VAE decodes: the colour-matching reference
    n_frames: int  # output frames (the speech's length)
    feats: list[torch.Tensor]  # wav2vec2 features per speaker track, [N, L, Hd] on the CPU
    guidance: sampling.Guidance
    pass_names: tuple[str, ...]  # the DiT passes per step (sampling.passes)
    ctx_pos: torch.Tensor  # [1, Lt, text_dim] prompt embedding on the device
    ctx_neg: torch.Tensor | None  # the negative prompt's, when a pass drops the text
    masks: torch.Tensor | None  # [1, 3, h, w] two-speaker regions at latent size, else None
    chunks: list[sampling.Chunk]
    timesteps: list[float]
    out_audio: np.ndarray  # the speech as it goes into the mp4 (48 kHz, mixed for two speakers)
    still: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (y, CLIP) of a still portrait, else None
    laps: Laps = field(default_factory=Laps)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    @property
    def context_latents(self) -> int:
        """Latent frames of the motion context a chunk after the first starts from."""
        return (self.req.motion_frames - 1) // 4 + 1


def plan_job(req: RenderRequest, m: Models, files: contextlib.ExitStack, *,
             embed_prompts: Callable[[list[str]], list[torch.Tensor]],
             still_condition: Callable[[np.ndarray, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]],
             ) -> JobPlan:
    """Decode and prepare everything for ``req``. ``files`` keeps the source video open for the job;
    ``embed_prompts`` and ``still_condition`` are the engine's caches (prompt embeddings, I2V conditioning)."""
    laps = Laps()
    reader: media.VideoReader | None = None
    if req.video is not None:
        reader = files.enter_context(media.VideoReader(req.video, fps=FPS))  # closed when the job ends
        first = reader.frame(0)
    else:
        assert req.image is not None
        first = media.load_image(req.image)
    src_hw = first.shape[:2]
    H, W = (req.size[1], req.size[0]) if req.size is not None else fr.choose_bucket(src_hw[0], src_hw[1],
                                                                                    req.resolution)
    ref_img = fr.resize_cover_crop(first, (H, W))
    feats, n_frames = speech_features(req, m)
    laps.lap("audio_features")

    g = sampling.Guidance(text=req.text_guidance, audio=req.audio_guidance, apg=req.apg)
    pass_names = sampling.passes(g)
    need_neg = any(p in ("drop_text", "uncond") for p in pass_names)
    embs = embed_prompts([req.prompt] + ([req.negative_prompt] if need_neg else []))
    ctx_pos = embs[0].to(m.device, m.dtype).unsqueeze(0)
    ctx_neg = embs[1].to(m.device, m.dtype).unsqueeze(0) if need_neg else None
    laps.lap("text")

    masks = None
    if req.speakers == 2:
        mask_arrays = [media.load_mask(p) for p in req.masks] if req.masks else None
        regions = fr.person_masks(H, W, src_hw=src_hw, dst_hw=(H, W), latent_hw=(H // 8, W // 8),
                                  boxes=list(req.boxes) or None, masks=mask_arrays, speakers=2)
        masks = torch.from_numpy(np.ascontiguousarray(regions)).float().to(m.device, m.dtype).unsqueeze(0)

    ref_t = fr.to_model(ref_img[None])[:, 0]  # [3, H, W]
    plan = JobPlan(
        req=req, height=H, width=W, reader=reader, ref_img=ref_img, ref_t=ref_t, ref_match=ref_t.to(m.device),
        n_frames=n_frames, feats=feats, guidance=g, pass_names=pass_names, ctx_pos=ctx_pos, ctx_neg=ctx_neg,
        masks=masks, chunks=sampling.plan_chunks(n_frames, req.frame_window, req.motion_frames),
        timesteps=sampling.timesteps(req.steps, req.shift), out_audio=output_audio(req), laps=laps)
    if reader is None:  # I2V conditioning of a still portrait: once per job (and cached across jobs)
        plan.still = still_condition(ref_img, ref_t, req.frame_window)
        laps.lap("condition")
    return plan


def speech_features(req: RenderRequest, m: Models) -> tuple[list[torch.Tensor], int]:
    """Speech -> 16 kHz mono -> wav2vec2 features per speaker track, and the output length in frames."""
    waves = [media.load_audio(p, max_seconds=req.max_duration_s, sample_rate=SAMPLE_RATE) for p in req.audio]
    for p, wv in zip(req.audio, waves, strict=True):
        if media.is_silent(wv) and req.speakers == 1:
            raise InputError(f"{p.name}: the speech track is silent; nothing to lip-sync")
    if req.loudness_normalize:
        waves = [media.loudness_normalize(w, SAMPLE_RATE) for w in waves]
    if req.speakers == 2:
        waves = list(sampling.combine_waveforms(waves[0], waves[1], req.audio_mode))
    n_frames = frames_for_duration(max(len(w) for w in waves), SAMPLE_RATE, FPS)
    if n_frames < 1:
        raise InputError(f"{req.audio[0].name}: speech is shorter than one video frame (40 ms)")
    if n_frames / FPS > req.max_duration_s:
        raise InputError(
            f"{req.audio[0].name}: speech lasts {n_frames / FPS:.1f} s, more than max_duration_s "
            f"{req.max_duration_s:g} s; split it or raise the limit")
    longest = max(len(x) for x in waves)
    feats = [audio_features(m.audio_encoder, np.pad(wv, (0, longest - len(wv))), n_frames, fps=FPS).float().cpu()
             for wv in waves]  # [N, L, Hd] each
    return feats, n_frames


def output_audio(req: RenderRequest) -> np.ndarray:
    """The speech as it goes into the mp4: the original tracks at 48 kHz (mixed for two speakers)."""
    tracks = [media.load_audio(p, max_seconds=req.max_duration_s, sample_rate=OUTPUT_AUDIO_RATE)
              for p in req.audio]
    if len(tracks) == 1:
        return tracks[0]
    a, b = sampling.combine_waveforms(tracks[0], tracks[1], req.audio_mode)
    return media.mix_tracks(a, b)
