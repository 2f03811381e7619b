"""The long-video render: the official InfiniteTalk streaming loop, with the networks resident.

One ``Engine`` renders one request at a time (``render``). Data flows one way: inputs are decoded
and normalised (media.py, frames.py), speech becomes wav2vec2 features (audio.py), prompts become
umT5 embeddings through a cache (prompts.py), then the chunk loop (sampling.py) denoises 81-frame
windows with the DiT and streams decoded frames into the mp4 writer, so memory does not grow with
the speech length.

Where we differ from the official ``InfiniteTalkPipeline.generate_infinitetalk`` (model.md 9, 13):
- I2V: the conditioning latent ``y`` and the CLIP features come from the same reference image in
  every chunk, so they are computed once per job (identical result, ~1 s less per chunk), and kept for
  the last few portraits, so a later job with the same face reuses them.
- The single-speaker reference-attention map and the drop-audio pass at audio guidance 1 are not
  computed (their results are never used).
- The blocks' context K/V (text, image, audio) are projected once per chunk, not on every step
  (bit-identical; not in low-memory mode, where block weights reach the GPU only inside each block).
- A chunk's mp4 encoding runs in the writer's thread while the next chunk denoises.
- Noise is drawn per chunk from a generator seeded by (seed, chunk); the official code's dead
  ``randn_like`` calls are not replicated, so seeds are not bit-compatible with it.
- Output length equals the speech length exactly (the official code cuts only when padding happened).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import frames as fr
from engine import media, sampling
from engine.api import (
    DeviceFault,
    InputError,
    OutOfMemory,
    Progress,
    ProgressFn,
    RenderError,
    RenderRequest,
    RenderResult,
    RenderStopped,
    StopFn,
)
from engine.audio import audio_features, frames_for_duration
from engine.dit import ContextKV
from engine.image_encoder import encode_image
from engine.prompts import PromptCache
from engine.recipes import PRESETS
from engine.teacache import TeaCache, coefficients_for
from engine.text_encoder import encode_text

log = logging.getLogger("infinitetalkd.engine")

FPS = 25
SAMPLE_RATE = 16000
OUTPUT_AUDIO_RATE = 48000  # the mp4 carries the speech at this rate (the model only needs 16 kHz)
CONDITION_CACHE_ITEMS = 4  # still portraits whose I2V conditioning stays in memory (a few MB each)


@dataclass
class Models:
    """The resident networks, as loaded by models_dir.load_models."""

    dit: Any  # dit.WanInfiniteTalk
    vae: Any  # vae.WanVAE
    text_encoder: torch.nn.Module
    tokenizer: object
    audio_encoder: torch.nn.Module
    clip: torch.nn.Module | None
    device: torch.device
    dtype: torch.dtype
    identities: dict[str, str] = field(default_factory=dict)
    text_device: torch.device | None = None  # where umT5 lives and runs (the CPU in "low" memory mode)
    speakers_supported: tuple[int, ...] = (1, 2)
    lora_strength: float | None = None  # strength merged at load, None when no LoRA
    swap_patch: object | None = None  # callable(speakers) switching single/multi adapter weights


@contextmanager
def _device_errors() -> Iterator[None]:
    """Map torch's device failures onto the API's error classes (daemon.md 4.4)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(f"out of device memory: {str(e).splitlines()[0]}") from e
    except RuntimeError as e:
        text = str(e)
        sticky = ("illegal memory access", "device-side assert", "unspecified launch failure",
                  "uncorrectable ECC", "CUDA error: misaligned address", "an illegal instruction")
        if any(s in text for s in sticky):
            raise DeviceFault(f"device fault, the process must restart: {text.splitlines()[0]}") from e
        raise


class Engine:
    """Implements engine.api.Renderer on resident models."""

    def __init__(self, models: Models, *, cache_dir: Path | None = None, version: str = "0", fast: bool = False,
                 warm_buckets: tuple[tuple[int, int], ...] = ()):
        self.m = models
        self.version = version
        self.fast = fast  # compiled blocks + preferred attention (engine/fast.py)
        self.warm_buckets = warm_buckets
        self._compiled_sizes: set[tuple[int, int]] = set(warm_buckets)  # (h, w) the compiled blocks have seen
        self.prompts = PromptCache(self._encode_prompts, models.identities.get("text_encoder", "?"), cache_dir)
        # I2V conditioning (y latent + CLIP features) of recent still portraits: bulk jobs often reuse one face.
        self._conditions: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    # ---------------------------------------------------------------- Renderer protocol
    def identity(self) -> str:
        parts = [f"infinitetalkd-engine={self.version}"]
        parts += [f"{k}={v}" for k, v in sorted(self.m.identities.items())]
        # fp8 GEMMs change the numbers (not bit-identical to bf16): a job rendered with them is another result.
        # FA3 attention has the same error as SDPA against fp32 (other bits, not another result): it is
        # reported in the result JSON (kernels()), not here, so a job is not tied to one GPU type.
        from engine.fast import Fp8Linear

        if any(isinstance(m, Fp8Linear) for m in self.m.dit.modules()):
            parts.append("dit_gemm=fp8")
        return ";".join(parts)

    def kernels(self) -> dict[str, str]:
        """Kernel choices that do not change results beyond bf16 noise (for the result JSON)."""
        from engine.fast import uses_flash3

        return {"dit_attention": "fa3" if uses_flash3(self.m.dit) else "sdpa"}

    def warmup(self) -> None:
        """One DiT pass per warm bucket at the real shapes (this is when compiled blocks get compiled), or a
        tiny pass when nothing is compiled, so kernels are selected before the first job."""
        with torch.inference_mode(), _device_errors(), self._attention():
            cfg = self.m.dit.cfg
            dev, dt = self.m.device, self.m.dtype
            shapes = [(21, h // 8, w // 8) for h, w in self.warm_buckets] or [(2, 4, 4)]
            for F, h, w in shapes:
                t0 = time.perf_counter()
                x = torch.zeros(1, cfg.out_dim, F, h, w, device=dev, dtype=torch.float32)
                y = torch.zeros(1, cfg.in_dim - cfg.out_dim, F, h, w, device=dev, dtype=dt)
                ctx = torch.zeros(1, 4, cfg.text_dim, device=dev, dtype=dt)
                clip = None
                if self.m.clip is not None:  # the real token count, so compiled shapes match the renders
                    c = self.m.clip.config
                    n_clip = (c.image_size // c.patch_size) ** 2 + 1
                    clip = torch.zeros(1, n_clip, cfg.clip_dim, device=dev, dtype=dt)
                audio = torch.zeros(1, 1, 4 * (F - 1) + 1, cfg.audio_window, cfg.audio_feature_dim, device=dev,
                                    dtype=dt)
                t = torch.tensor([500.0], device=dev)
                dit = self.m.dit
                if dit.blocks_streamed:
                    dit(x, t, ctx, clip, y, audio)
                else:  # the renders pass precomputed context K/V: compile that graph, not the uncached one
                    kv = dit.context_kv(dit.embed_context(ctx, clip), dit.embed_audio(audio))
                    dit(x, t, y=y, context_kv=kv)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                log.info("warm-up pass at latent %dx%dx%d took %.1f s", F, h, w, time.perf_counter() - t0)

    def _attention(self):  # type: ignore[no-untyped-def]
        """The SDPA backend order for this engine (cuDNN first on the fast path), as a context manager."""
        if self.fast:
            from engine.fast import preferred_attention

            return preferred_attention()
        return contextlib.nullcontext()

    def render(self, request: RenderRequest, out_path: Path, progress: ProgressFn, should_stop: StopFn) -> RenderResult:
        with torch.inference_mode(), _device_errors(), self._attention(), contextlib.ExitStack() as files:
            return self._render(request, out_path, progress, should_stop, files)

    # ---------------------------------------------------------------- helpers
    def _encode_prompts(self, texts: list[str]) -> list[torch.Tensor]:
        # umT5 runs where it lives: on the GPU when resident, on the CPU in low-memory mode (moving its ~11 GiB
        # onto a 16-24 GB card for one prompt would not fit next to the rest). Results are cached by text.
        return encode_text(self.m.text_encoder, self.m.tokenizer, texts)

    def _to_dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.m.device, self.m.dtype)

    def _clip(self, ref: torch.Tensor) -> torch.Tensor | None:
        """CLIP features of the reference frame ([1, 3, H, W] in [-1, 1]), or None without CLIP."""
        if self.m.clip is None:
            return None
        return self._to_dev(encode_image(self.m.clip, ref.to(self.m.device, self.m.dtype)))

    def _encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """[3, T, H, W] in [-1, 1] -> normalised latent [16, F, h, w] (fp32)."""
        vae = self.m.vae
        vdt = next(vae.parameters()).dtype
        return vae.encode(frames.unsqueeze(0).to(self.m.device, vdt)).float()[0]  # type: ignore[operator]

    def _condition(self, ref: torch.Tensor, window: int) -> torch.Tensor:
        """y = [mask (4) | VAE(reference + window-1 grey frames) (16)] -> [20, F, h, w] (model.md 4)."""
        _, H, W = ref.shape
        video = torch.zeros(3, window, H, W)
        video[:, 0] = ref
        lat = self._encode_video(video)
        F, h, w = lat.shape[1:]
        msk = torch.zeros(window, h, w)
        msk[0] = 1
        msk = torch.cat([msk[:1].repeat(4, 1, 1), msk[1:]])  # [window + 3, h, w]: frame 0 counts 4 times
        msk = msk.view(F, 4, h, w).transpose(0, 1)  # [4, F, h, w]; only latent frame 0 is 1
        return torch.cat([msk.to(lat), lat])

    def _still_condition(self, ref_img: np.ndarray, ref_t: torch.Tensor,
                         window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y [1, 20, F, h, w], CLIP features or None) of a still reference [H, W, 3] uint8, kept for the last
        CONDITION_CACHE_ITEMS portraits: the same pixels and window give the same tensors (the models of an Engine
        never change), so a job that reuses a face skips the 81-frame VAE encode and CLIP (~1.1 s at 448x896 on
        an H100, bench/RESULTS.md). Entries are a few MB on the device; nothing is written to disk."""
        key = f"{hashlib.sha256(ref_img.tobytes()).hexdigest()}:{ref_img.shape}:{window}"
        hit = self._conditions.get(key)
        if hit is not None:
            self._conditions.move_to_end(key)
            return hit
        entry = (self._to_dev(self._condition(ref_t, window)).unsqueeze(0), self._clip(ref_t.unsqueeze(0)))
        self._conditions[key] = entry
        while len(self._conditions) > CONDITION_CACHE_ITEMS:
            self._conditions.popitem(last=False)
        return entry

    def _check_request(self, req: RenderRequest) -> None:
        if req.speakers not in self.m.speakers_supported:
            which = "multi" if req.speakers == 2 else "single"
            raise InputError(f"a {req.speakers}-speaker job needs the InfiniteTalk {which} patch file in "
                             "models/model_patches/; run 'infinitetalkd doctor' to see which files are present")
        merged = self.m.lora_strength
        wants_lora = PRESETS[req.preset].use_lora if req.preset in PRESETS else False
        if merged is not None and not wants_lora:
            raise InputError(f"setting 'preset': '{req.preset}' renders without the step-distill LoRA, but this "
                             "engine merged it at start; use preset lightx2v or fast1, or run an engine with "
                             "engine.preset: quality")
        if merged is None and wants_lora:
            raise InputError(f"setting 'preset': '{req.preset}' needs the step-distill LoRA, which this engine did "
                             "not load; set engine.preset in config.yaml to the preset you render with")
        if merged is not None and req.lora_strength is not None and abs(req.lora_strength - merged) > 1e-6:
            raise InputError(f"setting 'lora_strength': the LoRA was merged at strength {merged:g} at start; "
                             "change engine.lora_strength in config.yaml to render at another strength")

    # ---------------------------------------------------------------- the job
    def _render(self, req: RenderRequest, out_path: Path, progress: ProgressFn, should_stop: StopFn,
                files: contextlib.ExitStack) -> RenderResult:
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock
            clock = now

        self._check_request(req)
        if self.m.swap_patch is not None:
            self.m.swap_patch(req.speakers)  # type: ignore[operator]
        progress(Progress("prepare", 0, 0, 0, 0, 0.0))

        # ---- reference picture (or source video) -> bucket size
        reader: media.VideoReader | None = None
        if req.video is not None:
            reader = files.enter_context(media.VideoReader(req.video, fps=FPS))  # closed when the job ends
            first = reader.frame(0)
        else:
            assert req.image is not None
            first = media.load_image(req.image)
        src_hw = first.shape[:2]
        if req.size is not None:
            H, W = req.size[1], req.size[0]
        else:
            H, W = fr.choose_bucket(src_hw[0], src_hw[1], req.resolution)
        if self.fast and (H, W) not in self._compiled_sizes:
            self._compiled_sizes.add((H, W))
            log.info("first job at %dx%d (w x h) in this process: the DiT blocks compile for this size during its "
                     "first step (11-22 s measured, 3-4 s with Inductor's cache); list [%d, %d] in engine.warm_buckets "
                     "to compile it at start instead", W, H, W, H)
        ref_img = fr.resize_cover_crop(first, (H, W))  # [H, W, 3] uint8, the colour reference
        lat_hw = (H // 8, W // 8)

        # ---- speech -> 16 kHz mono -> wav2vec2 features per speaker
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
        feats = []
        for wv in waves:
            wv = np.pad(wv, (0, max(0, max(len(x) for x in waves) - len(wv))))
            f = audio_features(self.m.audio_encoder, wv, n_frames, fps=FPS)  # [N, L, Hd]
            feats.append(f.float().cpu())
        lap("audio_features")

        # ---- prompts (cached)
        g = sampling.Guidance(text=req.text_guidance, audio=req.audio_guidance, apg=req.apg)
        pass_names = sampling.passes(g)
        need_neg = any(p in ("drop_text", "uncond") for p in pass_names)
        texts = [req.prompt] + ([req.negative_prompt] if need_neg else [])
        embs = self.prompts.get(texts)
        ctx_pos = self._to_dev(embs[0]).unsqueeze(0)
        ctx_neg = self._to_dev(embs[1]).unsqueeze(0) if need_neg else None
        lap("text")

        # ---- two-speaker regions at latent resolution
        masks_t: torch.Tensor | None = None
        if req.speakers == 2:
            mask_arrays = [media.load_mask(p) for p in req.masks] if req.masks else None
            m = fr.person_masks(H, W, src_hw=src_hw, dst_hw=(H, W), latent_hw=lat_hw,
                                boxes=list(req.boxes) or None, masks=mask_arrays, speakers=2)
            masks_t = self._to_dev(torch.from_numpy(np.ascontiguousarray(m)).float()).unsqueeze(0)

        # ---- chunk plan; I2V conditioning once per job
        window, motion = req.frame_window, req.motion_frames
        plan = sampling.plan_chunks(n_frames, window, motion)
        ts = sampling.timesteps(req.steps, req.shift)
        ref_t = fr.to_model(ref_img[None])[:, 0]  # [3, H, W]
        ref_match = ref_t.to(self.m.device)  # the colour-matching reference, where the VAE decodes
        y = clip_fea = None
        if reader is None:
            y, clip_fea = self._still_condition(ref_img, ref_t, window)
            lap("condition")
        n_ctx = (motion - 1) // 4 + 1
        out_audio = self._output_audio(req)

        # background: a chunk's x264 encoding runs in the writer's thread while this one denoises the next
        writer = media.VideoWriter(out_path, width=W, height=H, fps=FPS, crf=req.crf,
                                   audio=out_audio, audio_rate=OUTPUT_AUDIO_RATE, background=True)
        written = 0
        dit_calls = blocks_skipped = 0
        context_frames: torch.Tensor | None = None  # [3, motion, H, W] in [-1, 1]
        try:
            for chunk in plan:
                ci = chunk.index + 1
                if reader is not None:  # dubbing: this chunk's reference is the source frame at its start
                    src = reader.frame(min(chunk.start, reader.num_frames - 1))
                    cur_ref = fr.to_model(fr.resize_cover_crop(src, (H, W))[None])[:, 0]
                    y = self._to_dev(self._condition(cur_ref, window)).unsqueeze(0)
                    clip_fea = self._clip(cur_ref.unsqueeze(0))
                    lap("condition")
                assert y is not None
                # clean context latents: the reference (chunk 0) or the previous chunk's last frames
                ctx_video = ref_t[:, None] if context_frames is None else context_frames
                ctx_lat = self._encode_video(ctx_video)[:, : (1 if context_frames is None else n_ctx)]
                k = ctx_lat.shape[1]
                audio = torch.stack([sampling.slice_audio(f, chunk) for f in feats])  # [P, window, 5, L*Hd]
                audio = self._to_dev(audio).unsqueeze(0)
                null_audio = torch.zeros_like(audio[:, -1:])
                lap("encode")

                z = sampling.noise((self.m.dit.cfg.out_dim, y.shape[2], *lat_hw), req.seed,  # type: ignore[attr-defined]
                                   chunk.index, self.m.device)
                ctx_lat = ctx_lat.to(z)
                # constant over the chunk's steps: text/image context and audio tokens, embedded once, and
                # (unless the blocks are streamed from host memory) every block's K/V of them, projected once
                dit = self.m.dit
                emb_pos = dit.embed_context(ctx_pos, clip_fea)
                emb_neg = dit.embed_context(ctx_neg, clip_fea) if ctx_neg is not None else None
                audio_emb = dit.embed_audio(audio)
                null_emb = dit.embed_audio(null_audio)
                # per pass (context, audio): cond = (prompt, audio), drop_text = (negative, audio),
                # drop_audio = (prompt, null audio), uncond = (negative, null audio)
                conds = {name: (emb_pos if name in ("cond", "drop_audio") else emb_neg,
                                audio_emb if name in ("cond", "drop_text") else null_emb) for name in pass_names}
                kvs: dict[str, ContextKV] | None = None
                if not dit.blocks_streamed:  # streamed: the block weights reach the GPU only inside each block
                    # each distinct context / audio projected once (<= 2 of each, ~0.63 GB per context at 14B)
                    distinct_ctx = {id(c): c for c, _ in conds.values()}
                    distinct_aud = {id(a): a for _, a in conds.values()}
                    text_kv = {key: dit.text_kv(c) for key, c in distinct_ctx.items()}
                    audio_kv = {key: dit.audio_kv(a) for key, a in distinct_aud.items()}
                    kvs = {name: ContextKV(text_kv[id(c)], audio_kv[id(a)]) for name, (c, a) in conds.items()}
                    del text_kv, audio_kv  # kvs holds the only references
                apg_state = sampling.APGState() if req.apg else None
                # TeaCache (opt-in approximation): one cache per pass, fresh each chunk, as upstream
                caches = {name: TeaCache(req.teacache, coefficients_for(H, W)) for name in pass_names} \
                    if req.teacache > 0 else {}
                for i in range(req.steps):
                    if should_stop():
                        raise RenderStopped()
                    z[:, :k] = ctx_lat
                    t = torch.tensor([ts[i]], device=self.m.device)
                    preds = {}
                    for name in pass_names:
                        c_emb, a_emb = conds[name]
                        mk = masks_t if a_emb.shape[1] == 2 else None  # the real audio of two speakers
                        cache = caches.get(name)
                        if kvs is not None:
                            out = dit(z[None], t, y=y, ref_target_masks=mk, context_kv=kvs[name], block_cache=cache)
                        else:
                            out = dit(z[None], t, y=y, ref_target_masks=mk, context_emb=c_emb, audio_emb=a_emb,
                                      block_cache=cache)
                        preds[name] = out[0].float()
                        dit_calls += 1
                    v = sampling.combine(g, preds, apg_state)
                    z = sampling.euler_step(z, v, ts[i], ts[i + 1])
                    z[:, :k] = ctx_lat
                    progress(Progress("denoise", ci, len(plan), i + 1, req.steps,
                                      (chunk.index + (i + 1) / (req.steps + 1)) / len(plan)))
                blocks_skipped += sum(c.skipped for c in caches.values())
                caches = {}  # and the cached residuals (one token tensor per pass)
                kvs = None  # free this chunk's K/V before the VAE decode (and before the next chunk's)
                lap("denoise")

                # decode, colour-match (on the device, before quantising, as upstream) and hand the frames to the
                # writer; the matched float frames' last `motion` frames are the next chunk's context. The last
                # chunk goes to the writer one latent frame at a time, so its encoding runs while the VAE decodes
                # the rest (nothing else is left to overlap it with); earlier chunks are decoded whole, without
                # the per-piece syncs and the writer's competition, since their encoding overlaps the next
                # chunk's denoising (H100, bench/RESULTS.md session 4: streaming every chunk saved 0.8 s on a
                # one-chunk job but cost 1.1 s on each further chunk).
                parts = self.m.vae.decode_iter(z[None].to(self.m.vae.dtype))
                if ci < len(plan):
                    parts = iter([torch.cat(list(parts), dim=2)])
                pieces: list[torch.Tensor] = []
                seen = 0  # frames of this chunk decoded so far
                for part in parts:
                    part = part[0]  # [3, n, H, W]
                    if req.color_correction > 0:
                        part = fr.match_colors_model(part, ref_match, req.color_correction)
                    pieces.append(part)
                    keep = part[:, max(chunk.keep_from - seen, 0):][:, : max(0, n_frames - written)]
                    seen += part.shape[1]
                    if keep.shape[1]:
                        new = fr.from_model(keep)
                        writer.write(new)
                        written += len(new)
                context_frames = torch.cat(pieces, dim=1)[:, -motion:].float().cpu()
                del pieces
                lap("decode")
                progress(Progress("decode", ci, len(plan), req.steps, req.steps, (chunk.index + 1) / len(plan)))
                if written >= n_frames:
                    break
            progress(Progress("mux", len(plan), len(plan), 0, 0, 1.0))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        lap("mux")
        timings["mp4_encode"] = writer.encode_s  # in the writer's thread, mostly overlapped with the next chunk
        if written != n_frames:
            raise RenderError(f"internal: wrote {written} frames for {n_frames} audio frames")
        return RenderResult(frames=written, fps=FPS, width=W, height=H, duration_s=written / FPS,
                            chunks=len(plan), seed=req.seed, timings={k: round(v, 3) for k, v in timings.items()},
                            model_files=dict(self.m.identities), dit_calls=dit_calls,
                            blocks_skipped=blocks_skipped, kernels=self.kernels())

    def _output_audio(self, req: RenderRequest) -> np.ndarray:
        """The speech as it goes into the mp4: the original tracks at 48 kHz (mixed for two speakers)."""
        tracks = [media.load_audio(p, max_seconds=req.max_duration_s, sample_rate=OUTPUT_AUDIO_RATE)
                  for p in req.audio]
        if len(tracks) == 1:
            return tracks[0]
        a, b = sampling.combine_waveforms(tracks[0], tracks[1], req.audio_mode)
        return media.mix_tracks(a, b)
