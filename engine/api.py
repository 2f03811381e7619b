"""The engine's public, torch-free interface.

The daemon imports only this module: plain dataclasses cross the boundary, plus one output path
and two callables (``progress`` and ``should_stop``). Nothing here imports torch, PyAV or numpy,
so daemon tests run against a fake renderer without the GPU stack.

Settings arrive as a mapping (a job's sidecar YAML, ``--set key=value`` on the command line,
the ``render`` defaults in config.yaml). :func:`request_from_settings` validates them against
:data:`SETTINGS` and names the offending key in every error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

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
    "PRESETS",
    "Preset",
    "SETTINGS",
    "Setting",
    "request_from_settings",
    "parse_set_option",
    "DEFAULT_PROMPT",
    "DEFAULT_NEGATIVE_PROMPT",
    "BUCKET_TABLES",
    "WARM_BUCKETS",
]


# --------------------------------------------------------------------------------------------
# Resolution buckets (data only; engine/frames.py chooses among them)
# --------------------------------------------------------------------------------------------

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

# Buckets the fast engine compiles at start (EngineOptions.warm_buckets): the 16:9 landscape one of 480p.
WARM_BUCKETS: tuple[tuple[int, int], ...] = ((448, 896),)


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
    """How to load the engine (config.yaml's ``engine`` section).

    ``files`` maps a role to a file name inside its ComfyUI sub-folder; roles: dit, text_encoder,
    patch_single, patch_multi, audio_encoder, vae, lora, clip_vision. Missing roles take the
    default names from the README.
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


@dataclass(frozen=True)
class Preset:
    """Sampling defaults (model.md section 8)."""

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
    "quality": Preset(steps=40, shift=7.0, text_guidance=5.0, audio_guidance=4.0, use_lora=False),
    "lightx2v": Preset(steps=4, shift=7.0, text_guidance=1.0, audio_guidance=2.0, use_lora=True),
    "fast1": Preset(steps=4, shift=7.0, text_guidance=1.0, audio_guidance=1.0, use_lora=True),
}

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

Box = tuple[int, int, int, int]


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

    @property
    def speakers(self) -> int:
        return len(self.audio)

    def params(self) -> dict[str, object]:
        """The settings as JSON-able values (paths by bare name), for fingerprints and result files."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
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


class Renderer(Protocol):
    """What the daemon needs from an engine."""

    def warmup(self) -> None:
        """Run whatever makes the first job as fast as the rest (compile, kernel selection)."""
        ...

    def identity(self) -> str:
        """A stable string naming the model files and code version (part of job fingerprints)."""
        ...

    def render(
        self, request: RenderRequest, out_path: Path, progress: ProgressFn, should_stop: StopFn
    ) -> RenderResult:
        """Render ``request`` into ``out_path`` (an mp4). Raises InputError, RenderError or RenderStopped."""
        ...


# --------------------------------------------------------------------------------------------
# Settings: the sidecar / --set keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    kind: str  # "int" | "float" | "bool" | "str" | "choice" | "file" | "files" | "boxes" | "size"
    default: object
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


SETTINGS: dict[str, Setting] = {
    "audio2": Setting("file", None, "second speaker's speech file (bare name in the inbox)"),
    "audio_mode": Setting("choice", "para", "two speakers: 'para' = simultaneous, 'add' = one after the other",
                          choices=("para", "add")),
    "masks": Setting("files", None, "two speakers: one mask image per speaker (white = that speaker)"),
    "boxes": Setting("boxes", None, "two speakers: [[x0, y0, x1, y1], [x0, y0, x1, y1]] in image pixels"),
    "prompt": Setting("str", DEFAULT_PROMPT, "text prompt"),
    "negative_prompt": Setting("str", DEFAULT_NEGATIVE_PROMPT, "negative prompt (used when text guidance != 1)"),
    "seed": Setting("int", 42, "random seed", minimum=0, maximum=2**63 - 1),
    "preset": Setting("choice", "lightx2v", "sampling preset: " + ", ".join(PRESETS), choices=tuple(PRESETS)),
    "steps": Setting("int", None, "denoising steps (default: the preset's)", minimum=1, maximum=200),
    "shift": Setting("float", None, "timestep shift (default: the preset's)", minimum=0.1, maximum=100),
    "text_guidance": Setting("float", None, "text guidance scale (1 = off)", minimum=0, maximum=30),
    "audio_guidance": Setting("float", None, "audio guidance scale (1 = off)", minimum=0, maximum=30),
    "resolution": Setting("choice", "480p", "resolution bucket family", choices=("480p", "720p")),
    "size": Setting("size", None, "explicit output size [width, height], multiples of 16"),
    "frame_window": Setting("int", 81, "frames per chunk (4n+1)", minimum=5, maximum=201),
    "motion_frames": Setting("int", 9, "frames carried between chunks", minimum=1, maximum=33),
    "color_correction": Setting("float", 1.0, "Lab colour matching strength to the reference (0 = off)",
                                minimum=0, maximum=1),
    "apg": Setting("bool", False, "adaptive projected guidance"),
    "lora_strength": Setting("float", None, "strength of the step-distill LoRA (default: engine.lora_strength; "
                             "the LoRA is merged at load, so a job must agree with the engine)", minimum=0, maximum=4),
    "max_duration_s": Setting("float", 600.0, "refuse speech longer than this many seconds", minimum=0.1),
    "crf": Setting("int", 18, "H.264 quality (lower = better, bigger)", minimum=0, maximum=51),
    "loudness_normalize": Setting("bool", True, "normalise speech loudness to -23 LUFS before feature extraction"),
    "teacache": Setting("float", 0.0, "TeaCache threshold, 0 = off (official --teacache_thresh; 0.2 suggested "
                        "for the 40-step quality preset): faster, not identical", minimum=0, maximum=2),
}


def _coerce(key: str, s: Setting, value: object) -> object:
    def bad(what: str) -> InputError:
        return InputError(f"setting '{key}': {what} (got {value!r})")

    if value is None:
        return None
    if s.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("must be a whole number")
        out: object = value
    elif s.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise bad("must be a number")
        out = float(value)
    elif s.kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    elif s.kind == "str":
        if not isinstance(value, str):
            raise bad("must be text")
        if len(value) > 4000:
            raise bad("is longer than 4000 characters")
        return value
    elif s.kind == "choice":
        if value not in s.choices:
            raise bad("must be one of " + ", ".join(s.choices))
        return value
    elif s.kind == "file":
        if not isinstance(value, str):
            raise bad("must be a bare file name")
        return value
    elif s.kind == "files":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("must be a list of bare file names")
        return tuple(value)
    elif s.kind == "boxes":
        ok = isinstance(value, list) and all(
            isinstance(b, list) and len(b) == 4 and all(isinstance(c, int) and not isinstance(c, bool) for c in b)
            for b in value
        )
        if not ok:
            raise bad("must be a list of [x0, y0, x1, y1] lists of whole pixel numbers")
        assert isinstance(value, list)
        boxes = tuple(tuple(b) for b in value)
        for b in boxes:
            if not (0 <= b[0] < b[2] and 0 <= b[1] < b[3]):
                raise bad("each box needs 0 <= x0 < x1 and 0 <= y0 < y1")
        return boxes
    elif s.kind == "size":
        if not (isinstance(value, list) and len(value) == 2 and all(
                isinstance(c, int) and not isinstance(c, bool) for c in value)):
            raise bad("must be [width, height]")
        w, h = value
        if w % 16 or h % 16 or not (16 <= w <= 2048 and 16 <= h <= 2048):
            raise bad("width and height must be multiples of 16 between 16 and 2048")
        return (w, h)
    else:  # pragma: no cover - table error
        raise AssertionError(s.kind)
    num = float(out)  # type: ignore[arg-type]
    if s.minimum is not None and num < s.minimum:
        raise bad(f"must be at least {s.minimum:g}")
    if s.maximum is not None and num > s.maximum:
        raise bad(f"must be at most {s.maximum:g}")
    return out


def request_from_settings(
    settings: Mapping[str, object],
    *,
    audio: Path,
    image: Path | None = None,
    video: Path | None = None,
    resolve: Callable[[str, str], Path] | None = None,
    defaults: Mapping[str, object] | None = None,
) -> RenderRequest:
    """Build a request from sidecar-style settings layered over ``defaults``.

    ``resolve(key, bare_name)`` turns a file name given in a setting (``audio2``, ``masks``) into
    a path; the daemon uses it to confine names to the inbox. Unknown keys are errors.
    """
    merged: dict[str, object] = {}
    for source in (defaults or {}, settings):
        for key, value in source.items():
            if key not in SETTINGS:
                known = ", ".join(sorted(SETTINGS))
                raise InputError(f"unknown setting '{key}'; known settings: {known}")
            merged[key] = _coerce(key, SETTINGS[key], value)
    values = {k: (merged[k] if merged.get(k) is not None else s.default) for k, s in SETTINGS.items()}

    preset = PRESETS[str(values["preset"])]
    for key, pv in (("steps", preset.steps), ("shift", preset.shift),
                    ("text_guidance", preset.text_guidance), ("audio_guidance", preset.audio_guidance)):
        if values[key] is None:
            values[key] = pv
    fw = int(values["frame_window"])  # type: ignore[call-overload]
    mf = int(values["motion_frames"])  # type: ignore[call-overload]
    if (fw - 1) % 4:
        raise InputError(f"setting 'frame_window': must be 4n+1 (81, 77, 45, ...), got {fw}")
    if (mf - 1) % 4 or mf >= fw:
        raise InputError(f"setting 'motion_frames': must be 4n+1 and smaller than frame_window, got {mf}")

    def res(key: str, name: str) -> Path:
        if resolve is None:
            return Path(name).resolve()
        return resolve(key, name)

    audios = [audio]
    if values["audio2"] is not None:
        audios.append(res("audio2", str(values["audio2"])))
    masks = tuple(res("masks", n) for n in values["masks"]) if values["masks"] else ()  # type: ignore[attr-defined]
    boxes = values["boxes"] or ()
    return RenderRequest(
        audio=tuple(audios),
        image=image,
        video=video,
        audio_mode=values["audio_mode"],  # type: ignore[arg-type]
        masks=masks,
        boxes=boxes,  # type: ignore[arg-type]
        prompt=str(values["prompt"]),
        negative_prompt=str(values["negative_prompt"]),
        seed=int(values["seed"]),  # type: ignore[call-overload]
        preset=str(values["preset"]),
        steps=int(values["steps"]),  # type: ignore[call-overload]
        shift=float(values["shift"]),  # type: ignore[arg-type]
        text_guidance=float(values["text_guidance"]),  # type: ignore[arg-type]
        audio_guidance=float(values["audio_guidance"]),  # type: ignore[arg-type]
        resolution=values["resolution"],  # type: ignore[arg-type]
        size=values["size"],  # type: ignore[arg-type]
        frame_window=fw,
        motion_frames=mf,
        color_correction=float(values["color_correction"]),  # type: ignore[arg-type]
        apg=bool(values["apg"]),
        lora_strength=None if values["lora_strength"] is None else float(values["lora_strength"]),  # type: ignore[arg-type]
        max_duration_s=float(values["max_duration_s"]),  # type: ignore[arg-type]
        crf=int(values["crf"]),  # type: ignore[call-overload]
        loudness_normalize=bool(values["loudness_normalize"]),
        teacache=float(values["teacache"]),  # type: ignore[arg-type]
    )


def parse_set_option(text: str) -> tuple[str, object]:
    """Parse one ``--set key=value``; the value is read as YAML-ish scalar/list (JSON syntax)."""
    import json

    if "=" not in text:
        raise InputError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    raw = raw.strip()
    value: object
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
    return key, value
