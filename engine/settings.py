"""The per-job settings: one schema for sidecar keys, ``render --set`` and config.yaml's ``render:``.

:class:`JobSettings` declares every key once (type, range, default, help text) as a pydantic v2 model;
engine/schema.py turns its validation errors into one-line messages and its fields into the README's
sidecar table and ``render --help``'s key list. :func:`request_from_settings` layers a job's settings over
the configured defaults and builds the engine's :class:`~engine.api.RenderRequest`.

Torch-free; imported by the daemon.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from engine.api import MAX_IMAGE_PIXELS, InputError, RenderRequest
from engine.recipes import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, PRESETS, PresetName, Resolution
from engine.schema import SCHEMA_CONFIG, doc, doc_default, doc_type, fail, problems, unwrap

__all__ = [
    "JobSettings",
    "PER_JOB_ONLY",
    "check_settings",
    "request_from_settings",
    "parse_set_option",
    "settings_help",
    "form_fields",
]

MAX_TEXT = 4000


BoxT = tuple[int, int, int, int]


def _box(b: BoxT) -> BoxT:
    x0, y0, x1, y1 = b
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise fail("each box needs 0 <= x0 < x1 and 0 <= y0 < y1")
    if max(x1, y1) > MAX_IMAGE_PIXELS:  # no image is that large; keeps absurd numbers out of the engine
        raise fail(f"box coordinates must be at most {MAX_IMAGE_PIXELS}")
    return b


def _size(wh: tuple[int, int]) -> tuple[int, int]:
    w, h = wh
    if w % 16 or h % 16 or not (16 <= w <= 2048 and 16 <= h <= 2048):
        raise fail("width and height must be multiples of 16 between 16 and 2048")
    return wh


def _window(n: int) -> int:
    if (n - 1) % 4:
        raise fail("must be 4n+1 (81, 77, 45, ...)")
    return n


# Lists in YAML and JSON, tuples here: the tuple itself is read leniently (a list is fine), its numbers strictly.
Box = Annotated[tuple[StrictInt, StrictInt, StrictInt, StrictInt], Strict(False), AfterValidator(_box)]
Size = Annotated[tuple[StrictInt, StrictInt], Strict(False), AfterValidator(_size)]
_BOXES = "a list of [x0, y0, x1, y1] lists of whole pixel numbers"
_PRESET_DEFAULT = "the preset's"


class JobSettings(BaseModel):
    """Every key a job may set. ``None`` means "not given": the default named in the help applies."""

    model_config = ConfigDict(**SCHEMA_CONFIG, title="setting")

    audio2: str | None = Field(None, description="second speaker's speech file",
                               json_schema_extra=doc(doc_type="bare file name", expects="a bare file name",
                                                      per_job=True))
    audio_mode: Literal["para", "add"] = Field("para", description="two speakers: simultaneous (`para`), or one "
                                               "after the other (`add`)")
    masks: list[str] | None = Field(None, description="two speakers: one mask image per speaker (white = that "
                                    "speaker)", json_schema_extra=doc(doc_type="list of bare file names",
                                                                       expects="a list of bare file names",
                                                                       per_job=True))
    boxes: list[Box] | None = Field(None, description="two speakers: a box per speaker in image pixels (x right, "
                                    "y down); not with `masks`",
                                    json_schema_extra=doc(doc_type="`[[x0, y0, x1, y1], [x0, y0, x1, y1]]`",
                                                           expects=_BOXES, per_job=True))
    prompt: str = Field(DEFAULT_PROMPT, max_length=MAX_TEXT, description="text prompt",
                        json_schema_extra=doc(doc_default='"A person is talking to the camera, …"'))
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, max_length=MAX_TEXT,
                                 description="negative prompt, used when text guidance ≠ 1",
                                 json_schema_extra=doc(doc_default="the official negative prompt"))
    seed: int = Field(42, ge=0, le=2**63 - 1, description="random seed",
                      json_schema_extra=doc(doc_type="int [0..2^63-1]"))
    preset: PresetName = Field("lightx2v", description="sampling preset (steps, shift, guidance); must agree with "
                               "engine.preset on the step-distill LoRA",
                               json_schema_extra=doc(doc_default="`engine.preset` (`lightx2v`)"))
    steps: int | None = Field(None, ge=1, le=200, description="denoising steps",
                              json_schema_extra=doc(doc_default=_PRESET_DEFAULT))
    shift: float | None = Field(None, ge=0.1, le=100, description="timestep shift",
                                json_schema_extra=doc(doc_default=_PRESET_DEFAULT))
    text_guidance: float | None = Field(None, ge=0, le=30, description="text guidance scale (1 = off)",
                                        json_schema_extra=doc(doc_default=_PRESET_DEFAULT))
    audio_guidance: float | None = Field(None, ge=0, le=30, description="audio guidance scale (1 = off)",
                                         json_schema_extra=doc(doc_default=_PRESET_DEFAULT))
    resolution: Resolution = Field("480p", description="resolution bucket family")
    size: Size | None = Field(None, description="explicit output size instead of a bucket",
                              json_schema_extra=doc(doc_type="`[width, height]`, multiples of 16, 16..2048",
                                                     expects="[width, height]"))
    frame_window: Annotated[int, AfterValidator(_window)] = Field(
        81, ge=5, le=201, description="frames per chunk (4n+1: 81, 77, 45, ...)")
    motion_frames: int = Field(9, ge=1, le=33, description="frames carried between chunks (4n+1, smaller than "
                               "`frame_window`)")
    color_correction: float = Field(1.0, ge=0, le=1, description="Lab colour matching to the portrait (0 = off)")
    apg: bool = Field(False, description="adaptive projected guidance")
    lora_strength: float | None = Field(None, ge=0, le=4, description="strength of the step-distill LoRA; it is "
                                        "merged at load, so a job must agree with the engine",
                                        json_schema_extra=doc(doc_default="`engine.lora_strength`"))
    max_duration_s: float = Field(600.0, ge=0.1, le=86400, description="refuse speech longer than this many "
                                  "seconds")
    crf: int = Field(18, ge=0, le=51, description="H.264 quality (lower = better, bigger)")
    loudness_normalize: bool = Field(True, description="normalise speech to -23 LUFS before feature extraction")
    teacache: float = Field(0.0, ge=0, le=2, description="TeaCache threshold, as the official `--teacache_thresh` "
                            "(0 = off; 0.2 suggested for the 40-step `quality` preset): steps whose timestep "
                            "embedding barely changed reuse the DiT blocks' last residual. Faster, **not "
                            "identical** output; the result JSON's `video.blocks_skipped` counts the skipped "
                            "forwards", json_schema_extra=doc(doc_default="0 (off)"))

    @field_validator("motion_frames")
    @classmethod
    def _motion_fits_window(cls, v: int, info: ValidationInfo) -> int:
        fw = info.data.get("frame_window")
        if (v - 1) % 4 or (isinstance(fw, int) and v >= fw):
            raise fail("must be 4n+1 and smaller than frame_window")
        return v


# Keys that name files of one job; config.yaml's shared ``render:`` defaults may not set them.
PER_JOB_ONLY: tuple[str, ...] = tuple(
    k for k, f in JobSettings.model_fields.items()
    if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("per_job"))


def _error(exc: ValidationError) -> InputError:
    first = problems(JobSettings, exc)[0]
    key = str(first.loc[0]) if first.loc else ""
    if first.message.startswith("unknown setting"):
        return InputError(f"unknown setting '{key}'; known settings: {', '.join(sorted(JobSettings.model_fields))}")
    return InputError(f"setting '{key}': {first.message}")


def check_settings(settings: Mapping[str, object]) -> JobSettings:
    """Validate one layer of settings. ``None`` values count as not given. Raises InputError naming the key."""
    given = {k: v for k, v in settings.items() if not (v is None and k in JobSettings.model_fields)}
    try:
        return JobSettings.model_validate(given)
    except ValidationError as exc:
        raise _error(exc) from None


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
    s = check_settings({**(defaults or {}), **settings})
    preset = PRESETS[s.preset]

    def res(key: str, name: str) -> Path:
        return Path(name).resolve() if resolve is None else resolve(key, name)

    audios = [audio] if s.audio2 is None else [audio, res("audio2", s.audio2)]
    return RenderRequest(
        audio=tuple(audios),
        image=image,
        video=video,
        audio_mode=s.audio_mode,
        masks=tuple(res("masks", n) for n in s.masks or ()),
        boxes=tuple(s.boxes or ()),
        prompt=s.prompt,
        negative_prompt=s.negative_prompt,
        seed=s.seed,
        preset=s.preset,
        steps=preset.steps if s.steps is None else s.steps,
        shift=preset.shift if s.shift is None else s.shift,
        text_guidance=preset.text_guidance if s.text_guidance is None else s.text_guidance,
        audio_guidance=preset.audio_guidance if s.audio_guidance is None else s.audio_guidance,
        resolution=s.resolution,
        size=s.size,
        frame_window=s.frame_window,
        motion_frames=s.motion_frames,
        color_correction=s.color_correction,
        apg=s.apg,
        lora_strength=s.lora_strength,
        max_duration_s=s.max_duration_s,
        crf=s.crf,
        loudness_normalize=s.loudness_normalize,
        teacache=s.teacache,
    )


def parse_set_option(text: str) -> tuple[str, object]:
    """Parse one ``--set key=value``; the value is read as a JSON scalar or list, else taken as text."""
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
        except ValueError:  # not JSON (or an integer too long to parse): the text itself
            value = raw
    return key, value


def settings_help() -> str:
    """The key list of ``render --help``: one line per key with its type, default and meaning."""
    def plain(text: str) -> str:
        return text.replace("`", "").replace("**", "").replace("\\|", "|")

    lines = []
    for key, f in JobSettings.model_fields.items():
        text = f"{plain(doc_type(f))}; default {plain(doc_default(f))}. {plain(f.description or '')}"
        lines += textwrap.wrap(text, width=100, initial_indent=f"  {key:<20}", subsequent_indent=" " * 22)
    return "\n".join(lines)


def _form_kind(annotation: object) -> tuple[str, list[str]]:
    """How a form asks for a field: bool, int, float, str, choice (with its choices) or json."""
    inner = unwrap(annotation)
    if get_origin(inner) is Literal:
        return "choice", [str(c) for c in get_args(inner)]
    names = {bool: "bool", int: "int", float: "float", str: "str"}
    return (names[inner], []) if inner in names else ("json", [])


def form_fields() -> list[dict[str, object]]:
    """The settings a submit form offers (the web page): every key except those naming files, with its
    kind, default, help text and bounds, read from :class:`JobSettings` (the one description)."""
    out: list[dict[str, object]] = []
    for key, f in JobSettings.model_fields.items():
        if key in ("audio2", "masks"):
            continue  # files: the form uploads them instead
        kind, choices = _form_kind(f.annotation)
        low = next((m.ge for m in f.metadata if isinstance(m, annotated_types.Ge)), None)
        high = next((m.le for m in f.metadata if isinstance(m, annotated_types.Le)), None)
        out.append({"key": key, "kind": kind, "default": f.default, "help": f.description or "",
                    "choices": choices, "minimum": low, "maximum": high})
    return out
