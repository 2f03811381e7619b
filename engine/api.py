"""The engine's public, torch-free boundary: errors, options, request and result, progress, the Renderer protocol.

The daemon sees the engine through this module: plain dataclasses cross the boundary, plus one output
path and two callables (``progress`` and ``should_stop``). Nothing here imports torch, PyAV or numpy,
so daemon tests run against a fake renderer without the GPU stack.

What a render is made of (buckets, presets, default prompts) is data in engine/recipes.py; the per-job
settings (sidecar keys, ``render --set``, config.yaml's ``render:``) are declared and turned into a
:class:`RenderRequest` by engine/settings.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from engine.recipes import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, WARM_BUCKETS

__all__ = [
    "InputError",
    "RenderError",
    "RenderStopped",
    "OutOfMemory",
    "DeviceFault",
    "EngineOptions",
    "Progress",
    "ProgressFn",
    "StopFn",
    "RenderRequest",
    "RenderResult",
    "Renderer",
    "MAX_IMAGE_PIXELS",
    "short_identity",
]

# The largest portrait or mask the engine decodes (width x height). Ingest refuses larger images before
# decoding them (jobs.max_image_pixels, which may not exceed this), and the engine's own decoder checks the
# same number, so a drop the daemon accepts is never refused later for its size.
MAX_IMAGE_PIXELS = 40_000_000


class InputError(ValueError):
    """Bad input from the user: a file that cannot be read, a wrong setting. Not retryable.

    The message names the file or key and says what to do.
    """


class RenderError(RuntimeError):
    """The render failed for a reason that is not the input's fault (model files, device)."""


class RenderStopped(Exception):
    """``should_stop()`` returned True; the render stopped between two denoising steps."""


class OutOfMemory(RenderError):
    """The device ran out of memory. The engine freed what it could; the process may go on."""


class DeviceFault(RenderError):
    """A sticky device error (illegal address, device-side assert, ECC). The process must exit
    so that a fresh one gets a clean device context."""


@dataclass(frozen=True)
class EngineOptions:
    """How to load the engine (config.yaml's ``engine`` section; daemon/config.py documents each key).

    ``files`` maps a role to a file name inside its ComfyUI sub-folder; roles: dit, text_encoder,
    patch_single, patch_multi, audio_encoder, vae, lora, clip_vision. Missing roles take the
    default names from the README. The role ``tokenizer`` is different: an absolute path to a
    ``spiece.model`` (used when the text-encoder file carries no tokenizer).
    """

    models_dir: Path
    files: Mapping[str, str] = field(default_factory=dict)
    device: str = "auto"  # "auto" | "cuda" | "cuda:N" | "cpu"
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bfloat16" | "float16" | "float32"
    preset: str = "lightx2v"  # which LoRA policy to load with; per-job presets must agree on the LoRA
    lora_strength: float = 1.0
    cache_dir: Path | None = None  # prompt-embedding cache on disk
    fast: bool = True  # on CUDA: compiled DiT blocks and the fastest attention kernel (numerically checked)
    fp8: bool = False  # fp8 GEMMs in the DiT blocks: faster, but not yet shown close enough (bench/RESULTS.md)
    # the DiT self-attention kernel on the fast path: "auto" (FlashAttention-3 where installed on a Hopper GPU,
    # else SDPA with cuDNN first) | "sdpa" | "fa3" (an error at start when FA3 cannot run)
    attention: str = "auto"
    memory_mode: str = "auto"  # "auto" | "resident" | "low" (stream DiT blocks from host memory)
    # (h, w) buckets whose DiT graphs the fast engine compiles at start; others compile at their first job
    warm_buckets: tuple[tuple[int, int], ...] = WARM_BUCKETS


@dataclass(frozen=True)
class Progress:
    """One progress report. ``fraction`` runs from 0 to 1 over the whole job."""

    stage: str  # "prepare" | "encode" | "denoise" | "decode" | "mux"
    chunk: int  # 1-based; 0 before the chunk loop
    chunks: int
    step: int  # 1-based within the chunk; 0 outside denoising
    steps: int
    fraction: float


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


Box = tuple[int, int, int, int]
_REDO_FIELDS = ("redo_from_chunk", "redo_seed")


@dataclass(frozen=True)
class RenderRequest:
    """One render. Paths are absolute; everything else is already validated.

    ``boxes`` are ``(x0, y0, x1, y1)`` in source-image pixels, x to the right, y down (the
    official code indexes rows with the first coordinate; we do not, see README).
    """

    audio: tuple[Path, ...]
    image: Path | None = None
    video: Path | None = None
    audio_mode: Literal["para", "add"] = "para"
    masks: tuple[Path, ...] = ()
    boxes: tuple[Box, ...] = ()
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 42
    preset: str = "lightx2v"
    steps: int = 4
    shift: float = 7.0
    text_guidance: float = 1.0
    audio_guidance: float = 2.0
    resolution: Literal["480p", "720p"] = "480p"
    size: tuple[int, int] | None = None  # explicit (width, height), multiples of 16
    frame_window: int = 81
    motion_frames: int = 9
    color_correction: float = 1.0
    apg: bool = False
    lora_strength: float | None = None  # None: whatever the engine merged at load
    max_duration_s: float = 600.0
    crf: int = 18
    loudness_normalize: bool = True
    teacache: float = 0.0  # TeaCache threshold (0 = off): skip the DiT blocks on some steps, an approximation
    # A redo (not sidecar keys; set by the caller on a request built from a finished job's settings): chunks with
    # index >= redo_from_chunk draw their noise from redo_seed when it is set, the earlier ones from seed.
    redo_from_chunk: int = 0
    redo_seed: int | None = None

    def __post_init__(self) -> None:
        if not self.audio or len(self.audio) > 2:
            raise InputError("a job needs one or two speech files")
        if (self.image is None) == (self.video is None):
            raise InputError("a job needs exactly one portrait image or one source video")
        if self.masks and len(self.masks) != len(self.audio):
            raise InputError(f"'masks' names {len(self.masks)} files but the job has {len(self.audio)} speakers")
        if self.boxes and len(self.boxes) != len(self.audio):
            raise InputError(f"'boxes' gives {len(self.boxes)} boxes but the job has {len(self.audio)} speakers")
        if self.masks and self.boxes:
            raise InputError("give either 'masks' or 'boxes', not both")
        if self.redo_from_chunk < 0:
            raise InputError(f"redo from chunk {self.redo_from_chunk}: the chunk must be 0 or more")
        if self.redo_seed is not None and not 0 <= self.redo_seed < 2**64:
            raise InputError(f"redo seed {self.redo_seed}: a seed must be in [0, 2**64)")

    @property
    def speakers(self) -> int:
        return len(self.audio)

    def chunk_seed(self, chunk_index: int) -> int:
        """The seed chunk ``chunk_index``'s noise is drawn from (the redo seed from ``redo_from_chunk`` on)."""
        if self.redo_seed is not None and chunk_index >= self.redo_from_chunk:
            return self.redo_seed
        return self.seed

    def without_redo(self) -> RenderRequest:
        """The same request without the redo fields: the one the chunks before ``redo_from_chunk`` depend on."""
        return dataclasses.replace(self, redo_from_chunk=0, redo_seed=None)

    def params(self) -> dict[str, object]:
        """The settings as JSON-able values (paths by bare name), for fingerprints and result files. The redo
        fields appear only when set, so a request without them has the same params (and fingerprint) as before
        they existed."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _REDO_FIELDS and v == f.default:
                continue
            if isinstance(v, Path):
                v = v.name
            elif isinstance(v, tuple):
                v = [x.name if isinstance(x, Path) else (list(x) if isinstance(x, tuple) else x) for x in v]
            out[f.name] = v
        return out


@dataclass(frozen=True)
class RenderResult:
    frames: int
    fps: int
    width: int
    height: int
    duration_s: float
    chunks: int
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    model_files: dict[str, str] = field(default_factory=dict)
    dit_calls: int = 0  # DiT forwards (steps x guidance passes x chunks)
    blocks_skipped: int = 0  # of those, how many reused a cached block residual (teacache)
    # Kernel choices that change bits but not results beyond bf16 noise (FA3 attention): reported in the
    # result JSON only, never part of the job's identity, so any GPU of a fleet may render any job.
    kernels: dict[str, str] = field(default_factory=dict)
    # A resumable render (checkpoint_dir given): the first chunk this call rendered when it continued from a
    # checkpoint (0-based; a redo that starts at chunk N reports N), else None; and the chunks this call rendered
    # to completion (chunks - resumed_from_chunk for a render that was not interrupted again).
    resumed_from_chunk: int | None = None
    chunks_rendered: int = 0


class Renderer(Protocol):
    """What the daemon needs from an engine."""

    def warmup(self) -> None:
        """Run whatever makes the first job as fast as the rest (compile, kernel selection)."""
        ...

    def identity(self) -> str:
        """A stable string naming the model files and code version (part of job fingerprints)."""
        ...

    def device_name(self) -> str:
        """The device it renders on, as people name it ("NVIDIA H100 80GB HBM3", "cpu"): the worker registry's
        GPU model."""
        ...

    def render(
        self, request: RenderRequest, out_path: Path, progress: ProgressFn, should_stop: StopFn, *,
        checkpoint_dir: Path | None = None, keep_all_checkpoints: bool = False,
        base_checkpoint_dir: Path | None = None,
    ) -> RenderResult:
        """Render ``request`` into ``out_path`` (an mp4). Raises InputError, RenderError or RenderStopped.

        ``checkpoint_dir``: make the render resumable: every finished chunk leaves a video segment and a
        checkpoint there, and a render that finds a valid checkpoint of the same job continues after it with
        the same frames (None: not resumable). The caller may delete the whole directory once the result is
        published, and must not put or take anything else there (its layout: docs/formats.md §12).
        ``keep_all_checkpoints``: keep every chunk's checkpoint, not only the last, so a later redo can start at
        any chunk. ``base_checkpoint_dir`` (a redo): the kept checkpoint directory of the original job; when
        ``checkpoint_dir`` holds no valid checkpoint, the original's chunks before ``request.redo_from_chunk``
        are taken from there (InputError when it lacks them or they are of other inputs or settings).
        """
        ...


def short_identity(identity: str, limit: int = 100) -> str:
    """A one-line stand-in for a long :meth:`Renderer.identity` (console lines, progress bars).

    The identity names every model file and option, several hundred characters; logs meant for people
    show its first ``;``-separated part, how many parts follow and a digest that tells two identities
    apart. The full string stays in fingerprints, result JSONs and JSON logs.
    """
    if len(identity) <= limit:
        return identity
    parts = identity.split(";")
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:12]
    return f"{parts[0][:limit]} (+{len(parts) - 1} parts, sha256 {digest})"
