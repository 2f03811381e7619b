"""The long-video render: the official InfiniteTalk streaming loop, with the networks resident.

One ``Engine`` renders one request at a time (``render``). Data flows one way: inputs are decoded
and normalised (media.py, frames.py), speech becomes wav2vec2 features (audio.py), prompts become
umT5 embeddings through a cache (prompts.py), then the chunk loop (sampling.py) denoises 81-frame
windows with the DiT and streams decoded frames into the mp4 writer, so memory does not grow with
the speech length.

A render has three parts, read top to bottom in ``Engine._render``: the job plan (engine/job.py: inputs,
size, speech features, prompts, masks, chunks; decided once), per chunk a :class:`ChunkContext`
(conditioning latents, embeddings, K/V, TeaCache state; what every step reads), the step loop written
out in ``_render`` itself, then ``_decode_write`` (VAE decode, colour match, frames to the writer, the
motion context the next chunk starts from).

Where we differ from the official ``InfiniteTalkPipeline.generate_infinitetalk`` (docs/model.md §9, §13):
- I2V: the conditioning latent ``y`` and the CLIP features come from the same reference image in
  every chunk, so they are computed once per job (identical result, one VAE encode less per chunk), and kept for
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
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import frames as fr
from engine import sampling
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
from engine.dit import Conditioning, ContextEmb, ContextKV, WanInfiniteTalk
from engine.events import emit
from engine.image_encoder import encode_image
from engine.job import JobPlan, plan_job
from engine.models import Models
from engine.output import Output, Where, open_output
from engine.prompts import PromptCache
from engine.recipes import PRESETS
from engine.teacache import TeaCache, coefficients_for
from engine.text_encoder import encode_text
from engine.writer import FPS

__all__ = ["CONDITION_CACHE_ITEMS", "ChunkContext", "Engine", "Models"]

CONDITION_CACHE_ITEMS = 4  # still portraits whose I2V conditioning stays in memory (a few MB each)


@contextmanager
def _device_errors() -> Iterator[None]:
    """Map torch's device failures onto the API's error classes (docs/daemon.md §4.4)."""
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

    def device_name(self) -> str:
        dev = torch.device(self.m.device)
        return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type

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
                cond = dit.condition(ctx, clip, audio)
                # the renders pass precomputed context K/V where they can: compile that graph, not the uncached one
                dit(x, t, y, cond if dit.blocks_streamed else dit.context_kv(cond.context, cond.audio))
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                emit("engine.warmup_pass", latent=[F, h, w], seconds=round(time.perf_counter() - t0, 3))

    def _attention(self):  # type: ignore[no-untyped-def]
        """The SDPA backend order for this engine (cuDNN first on the fast path), as a context manager."""
        if self.fast:
            from engine.fast import preferred_attention

            return preferred_attention()
        return contextlib.nullcontext()

    def render(self, request: RenderRequest, out_path: Path, progress: ProgressFn, should_stop: StopFn, *,
               checkpoint_dir: Path | None = None, keep_all_checkpoints: bool = False,
               base_checkpoint_dir: Path | None = None) -> RenderResult:
        """Render ``request`` into ``out_path``. With ``checkpoint_dir``, the render is resumable: every finished
        chunk leaves a closed video segment and a checkpoint there (engine/checkpoint.py), and a render that finds
        a valid checkpoint of the same recipe continues after its chunk with the same frames as an uninterrupted
        one. The directory is left in place afterwards (the caller removes it once the result is published).
        ``keep_all_checkpoints`` keeps every chunk's checkpoint; ``base_checkpoint_dir`` seeds a redo's directory
        with the original job's chunks before ``request.redo_from_chunk`` (engine.api.Renderer.render)."""
        if base_checkpoint_dir is not None and checkpoint_dir is None:
            raise ValueError("base_checkpoint_dir needs a checkpoint_dir to continue in")
        where = Where(checkpoint_dir, keep_all_checkpoints, base_checkpoint_dir)
        with torch.inference_mode(), _device_errors(), self._attention(), contextlib.ExitStack() as files:
            return self._render(request, out_path, progress, should_stop, files, where)

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
        """y = [mask (4) | VAE(reference + window-1 grey frames) (16)] -> [20, F, h, w] (docs/model.md §4)."""
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
        never change), so a job that reuses a face skips the 81-frame VAE encode and CLIP (cost in bench/RESULTS.md).
        Entries are a few MB on the device; nothing is written to disk."""
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
                files: contextlib.ExitStack, where: Where) -> RenderResult:
        self._check_request(req)
        if self.m.swap_patch is not None:
            self.m.swap_patch(req.speakers)
        progress(Progress("prepare", 0, 0, 0, 0, 0.0))
        plan = plan_job(req, self.m, files, embed_prompts=self.prompts.get, still_condition=self._still_condition)
        if req.redo_from_chunk and req.redo_from_chunk >= len(plan.chunks):
            raise InputError(f"redo from chunk {req.redo_from_chunk}: this job has {len(plan.chunks)} chunks "
                             f"(0 to {len(plan.chunks) - 1})")
        self._note_new_size(plan.height, plan.width)
        meter = _Meter(plan, progress)
        out = open_output(plan, out_path, where, self.identity())
        dit_calls = blocks_skipped = 0
        try:
            for chunk in plan.chunks[out.first_chunk:]:
                t_chunk = time.perf_counter()
                ctx = self._chunk_context(plan, chunk, out.context)
                plan.laps.lap("chunk_context")
                z = sampling.noise((self.m.dit.cfg.out_dim, ctx.y.shape[2], *plan.latent_hw),
                                   req.chunk_seed(chunk.index), chunk.index, self.m.device)
                # the denoising steps: every guidance pass of the DiT, combined, one Euler step; the clean context
                # latents stay pinned at the front of the window
                for i in range(req.steps):
                    if should_stop():
                        raise RenderStopped()
                    z[:, :ctx.k] = ctx.clean
                    t = torch.tensor([plan.timesteps[i]], device=self.m.device)
                    preds = {name: ctx.predict(self.m.dit, z, t, name) for name in plan.pass_names}
                    dit_calls += len(preds)
                    v = sampling.combine(plan.guidance, preds, ctx.apg)
                    z = sampling.euler_step(z, v, plan.timesteps[i], plan.timesteps[i + 1])
                    z[:, :ctx.k] = ctx.clean
                    meter.step(chunk, i + 1)
                    if i == 0:  # the previous chunk's segment was encoded during this step: close it, checkpoint
                        out.sink.settle()
                blocks_skipped += ctx.blocks_skipped()
                del ctx  # frees this chunk's K/V and cached residuals before the VAE decode
                plan.laps.lap("denoise")
                self._decode_write(plan, chunk, z, out, meter)
                out.chunks_rendered += 1
                out.sink.end_chunk(chunk.index, out.written, out.context, time.perf_counter() - t_chunk)
                plan.laps.lap("decode")
                if out.written >= plan.n_frames:
                    break
            meter.write_start()
            out.sink.close()
        except BaseException:
            out.sink.abort()
            raise
        plan.laps.lap("mux")
        meter.done()
        return self._result(plan, out, dit_calls, blocks_skipped)

    def _note_new_size(self, height: int, width: int) -> None:
        if self.fast and (height, width) not in self._compiled_sizes:
            self._compiled_sizes.add((height, width))
            emit("engine.compile_new_size", width=width, height=height,
                 note="the DiT blocks compile for this size during the job's first step; list it in "
                      "engine.warm_buckets to compile it at start instead")

    def _chunk_context(self, plan: JobPlan, chunk: sampling.Chunk, context: torch.Tensor | None,
                       ) -> ChunkContext:
        """Everything the steps of ``chunk`` read: its conditioning latent, the clean context latents (the reference
        for chunk 0, else ``context``: the previous chunk's, from ``_decode_write``), and per guidance pass the DiT's
        inputs."""
        req, dit = plan.req, self.m.dit
        if plan.reader is not None:  # dubbing: this chunk's reference is the source frame at its start
            src = plan.reader.frame(min(chunk.start, plan.reader.num_frames - 1))
            cur_ref = fr.to_model(fr.resize_cover_crop(src, (plan.height, plan.width))[None])[:, 0]
            y = self._to_dev(self._condition(cur_ref, req.frame_window)).unsqueeze(0)
            clip_fea = self._clip(cur_ref.unsqueeze(0))
        else:
            assert plan.still is not None
            y, clip_fea = plan.still
        if context is None:
            clean = self._encode_video(plan.ref_t[:, None])[:, :1]
        else:
            clean = context.to(self.m.device)
        audio = torch.stack([sampling.slice_audio(f, chunk) for f in plan.feats])  # [P, window, 5, L*Hd]
        audio = self._to_dev(audio).unsqueeze(0)
        # constant over the chunk's steps: text/image context and audio tokens, embedded once, and (unless the
        # blocks are streamed from host memory) every block's K/V of them, projected once
        emb_pos = dit.embed_context(plan.ctx_pos, clip_fea)
        emb_neg = dit.embed_context(plan.ctx_neg, clip_fea) if plan.ctx_neg is not None else None
        audio_emb, null_emb = dit.embed_audio(audio), dit.embed_audio(torch.zeros_like(audio[:, -1:]))
        # per pass (context, audio): cond = (prompt, audio), drop_text = (negative, audio),
        # drop_audio = (prompt, null audio), uncond = (negative, null audio)
        conds = {name: (emb_pos if name in ("cond", "drop_audio") else emb_neg,
                        audio_emb if name in ("cond", "drop_text") else null_emb) for name in plan.pass_names}
        inputs: dict[str, Conditioning]
        if dit.blocks_streamed:  # the block weights reach the GPU only inside each block: pass the embeddings
            inputs = {name: ContextEmb(c, a) for name, (c, a) in conds.items()}
        else:  # each distinct context / audio projected once (<= 2 of each)
            distinct_ctx = {id(c): c for c, _ in conds.values()}
            distinct_aud = {id(a): a for _, a in conds.values()}
            text_kv = {key: dit.text_kv(c) for key, c in distinct_ctx.items()}
            audio_kv = {key: dit.audio_kv(a) for key, a in distinct_aud.items()}
            inputs = {name: ContextKV(text_kv[id(c)], audio_kv[id(a)]) for name, (c, a) in conds.items()}
        # the regions apply where the real audio of two speakers is heard
        masks = {name: plan.masks if a.shape[1] == 2 else None for name, (_, a) in conds.items()}
        # TeaCache (opt-in approximation): one cache per pass, fresh each chunk, as upstream
        caches = {name: TeaCache(req.teacache, coefficients_for(plan.height, plan.width))
                  for name in plan.pass_names} if req.teacache > 0 else {}
        return ChunkContext(y=y, clean=clean.to(torch.float32), inputs=inputs, masks=masks, caches=caches,
                            apg=sampling.APGState() if req.apg else None)

    def _decode_write(self, plan: JobPlan, chunk: sampling.Chunk, z: torch.Tensor, out: Output,
                      meter: _Meter) -> None:
        """Decode, colour-match (on the device, before quantising, as upstream) and hand the new frames to the
        writer; unless this was the last chunk, encode the matched float frames' last ``motion`` frames into the
        next chunk's clean context latents (``out.context``: what a checkpoint stores, a few MB, instead of the
        frames, 36x larger; the next chunk would encode the same frames the same way).

        The last chunk goes to the writer one latent frame at a time, so its encoding runs while the VAE decodes the
        rest (nothing else is left to overlap it with); earlier chunks are written whole, without the writer
        competing with the decode, since their encoding overlaps the next chunk's denoising (the measurements
        behind this choice are in bench/RESULTS.md, streamed last-chunk decode)."""
        req = plan.req
        n_latents = z.shape[1]
        parts: Iterator[torch.Tensor] = self.m.vae.decode_iter(z[None].to(self.m.vae.dtype))
        if not chunk.is_last:
            decoded = []
            for j, part in enumerate(parts):
                decoded.append(part)
                meter.decode(chunk, j + 1, n_latents)
            parts = iter([torch.cat(decoded, dim=2)])
        pieces: list[torch.Tensor] = []
        seen = 0  # frames of this chunk decoded so far
        for part in parts:
            part = part[0]  # [3, n, H, W]
            if req.color_correction > 0:
                part = fr.match_colors_model(part, plan.ref_match, req.color_correction)
            pieces.append(part)
            keep = part[:, max(chunk.keep_from - seen, 0):][:, : max(0, plan.n_frames - out.written)]
            seen += part.shape[1]
            if keep.shape[1]:
                out.write(fr.from_model(keep))
            meter.decode(chunk, min(n_latents, (seen + 3) // 4), n_latents)
        if out.written >= plan.n_frames:
            out.context = None
            return
        m = req.motion_frames  # the last m frames, without concatenating the whole chunk first
        tail = torch.cat([p[:, -m:] for p in pieces], dim=1)[:, -m:].float()
        del pieces
        out.context = self._encode_video(tail)[:, :plan.context_latents].float().cpu()

    def _result(self, plan: JobPlan, out: Output, dit_calls: int, blocks_skipped: int) -> RenderResult:
        if out.written != plan.n_frames:
            raise RenderError(f"internal: wrote {out.written} frames for {plan.n_frames} audio frames")
        # the writer's encoding ran in its own thread, mostly overlapped with the next chunk: one name for it
        timings = {**plan.laps.timings, "mp4_encode": out.sink.encode_s}
        return RenderResult(frames=out.written, fps=FPS, width=plan.width, height=plan.height,
                            duration_s=out.written / FPS, chunks=len(plan.chunks), seed=plan.req.seed,
                            timings={k: round(v, 3) for k, v in timings.items()},
                            model_files=dict(self.m.identities), dit_calls=dit_calls, blocks_skipped=blocks_skipped,
                            kernels=self.kernels(), resumed_from_chunk=out.first_chunk or None,
                            chunks_rendered=out.chunks_rendered)


@dataclass
class ChunkContext:
    """What every denoising step of one chunk reads; built once per chunk (Engine._chunk_context)."""

    y: torch.Tensor  # [1, 20, F, h, w] mask + reference latent
    clean: torch.Tensor  # [16, k, h, w] fp32 clean context latents, pinned at the window's front on every step
    inputs: dict[str, Conditioning]  # per guidance pass: the DiT's conditioning (K/V, or embeddings when streamed)
    masks: dict[str, torch.Tensor | None]  # per pass: the two-speaker regions where two speakers are heard
    caches: dict[str, TeaCache]  # per pass, when TeaCache is on
    apg: sampling.APGState | None

    @property
    def k(self) -> int:
        return int(self.clean.shape[1])

    def predict(self, dit: WanInfiniteTalk, z: torch.Tensor, t: torch.Tensor, name: str) -> torch.Tensor:
        """The DiT's velocity for pass ``name`` at latent z [16, F, h, w] and timestep t [1] -> [16, F, h, w] fp32."""
        out = dit(z[None], t, self.y, self.inputs[name], self.masks[name], block_cache=self.caches.get(name))
        return out[0].float()

    def blocks_skipped(self) -> int:
        return sum(c.skipped for c in self.caches.values())


class _Meter:
    """Progress over every stage, so an ETA covers them all: each chunk counts ``steps + 1`` units (the steps, then
    the VAE decode, reported per latent frame) and writing the file's end counts one more."""

    def __init__(self, plan: JobPlan, progress: ProgressFn) -> None:
        self.n, self.steps, self.progress = len(plan.chunks), plan.req.steps, progress
        self.total = self.n * (self.steps + 1) + 1

    def _fraction(self, chunk: sampling.Chunk, units: float) -> float:
        return min(1.0, (chunk.index * (self.steps + 1) + units) / self.total)

    def step(self, chunk: sampling.Chunk, step: int) -> None:
        self.progress(Progress("denoise", chunk.index + 1, self.n, step, self.steps, self._fraction(chunk, step)))

    def decode(self, chunk: sampling.Chunk, done: int, of: int) -> None:
        self.progress(Progress("decode", chunk.index + 1, self.n, self.steps, self.steps,
                               self._fraction(chunk, self.steps + done / of)))

    def write_start(self) -> None:
        self.progress(Progress("mux", self.n, self.n, 0, 0, (self.total - 1) / self.total))

    def done(self) -> None:
        self.progress(Progress("mux", self.n, self.n, 0, 0, 1.0))
