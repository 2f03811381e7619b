"""The one place that reads safetensors files: headers, prefixes, fp8 dequantisation, strict loads.

Every network file (dit, vae, audio, text/image encoder) exposes ``config_from_shapes(shapes)``,
``build(cfg, device)`` and optionally ``normalize_keys(d)``; this module never imports them — callers pass
them in (:func:`load_network`). The flow for one network:

1. :func:`read_header` reads only the 8-byte length and the JSON header (plus the few-byte ``.comfy_quant``
   JSON blobs, if any) and decides the key prefix, the quantisation format and the main dtype.
2. :func:`logical_shapes` gives the key -> shape map the network expects: prefix stripped, quantisation
   companions (scales, markers) and embedded blobs (``spiece_model``) removed.
3. The network is built on meta; :func:`iter_tensors` streams one tensor at a time (memory-mapped), dequantising
   fp8 on the target device; engine.lora.merge_lora merges LoRA deltas into the stream; :func:`load_module`
   checks the state key by key and assigns it. There is never a host copy of a whole file.

Formats follow docs/formats.md §2-4, §10, learned from ComfyUI (``comfy/utils.py``, ``model_detection.py``,
``lora.py``) and kijai's ComfyUI-WanVideoWrapper; no code is copied from them. Writing: engine/safetensors_out.py.

fp8 handling, by format (``FileInfo.quant``):

- ``scaled_fp8`` (legacy ComfyUI / kijai ``_KJ``): ``<layer>.weight`` F8_E4M3 plus a per-tensor F32
  ``<layer>.scale_weight`` (or ``.weight_scale``) of shape ``[]``; the real weight is ``W.float() * scale``.
  A ``scaled_fp8`` marker tensor with 2 elements means "full-precision matmul only".
- ``comfy_quant`` (newer ComfyUI): per-layer JSON in a U8 ``<layer>.comfy_quant`` tensor or in
  ``__metadata__["_quantization_metadata"]``; fp8 formats use ``<layer>.weight_scale``. Other formats
  (nvfp4, mxfp8, int8, ...) are refused with an error naming the layer.
- ``fp8_unscaled``: F8 weights with no scales at all (scale 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from engine.api import RenderError
from engine.safetensors_out import _MARKER, E4M3_MAX, file_mode, save_tensors, write_scaled_fp8

__all__ = [  # noqa: RUF022 (grouped by use, not sorted)
    "WeightsError", "TensorInfo", "FileInfo", "read_header", "detect_prefix", "logical_shapes", "iter_tensors",
    "iter_fp8_weights", "extra_tensor", "load_module", "load_network", "write_scaled_fp8", "file_identity",
    "DEFAULT_PREFIXES", "E4M3_MAX", "file_mode", "save_tensors",
]

DTypeSpec = torch.dtype | Callable[[str], torch.dtype]

# The safetensors reference implementation refuses headers above 100 MB; the DiT header (1 303 tensors plus
# scales) is ~200 kB, so anything larger is not a safetensors file (a pickle's first 8 bytes, say).
MAX_HEADER_BYTES = 100_000_000

# header dtype string -> bytes per element (sub-byte and exotic dtypes are not size-checked)
# fmt: off
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# fmt: on
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
# comfy_quant formats this loader can dequantise (per-tensor scale); everything else is refused.
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")

# Most specific first: "model.diffusion_model." must win over "model.". ComfyUI also knows "model.model."
# and "net." (model_detection.unet_prefix_from_state_dict); "wav2vec2." is how HF pre-training checkpoints
# prefix the encoder. "vision_model." / "encoder." are part of the HF names themselves, never stripped.
DEFAULT_PREFIXES: tuple[str, ...] = (
    "model.diffusion_model.",
    "model.model.",
    "diffusion_model.",
    "net.",
    "model.",
    "wav2vec2.",
)
# detect_prefix: the share of (non-extra) keys that must carry a candidate prefix for it to be stripped.
PREFIX_SHARE = 0.9

# Top-level tensors that are not network weights (docs/formats.md §3.1, §8.3).
_EXTRAS = (_MARKER, "spiece_model")
# Per-layer quantisation companions, both spellings (docs/formats.md §3.4 rule 3); nvfp4's second scale too.
_WEIGHT_SCALES = (".scale_weight", ".weight_scale")
_COMPANIONS = (*_WEIGHT_SCALES, ".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")


class WeightsError(RenderError):
    """A model file cannot be used: missing, corrupt, wrong format, or its keys do not fit the network.

    The message names the file and says what to do. (A :class:`~engine.api.RenderError`: the render fails
    for a reason that is not the job's input.)
    """


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: the safetensors dtype string (``"F8_E4M3"``, ``"BF16"``, ...), shape, byte count."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class FileInfo:
    """What :func:`read_header` learned about one file without reading its tensor data.

    ``tensors`` uses the raw keys as stored. ``keys`` maps each logical key (prefix stripped, companions
    removed) to its raw key; ``scales`` maps a logical weight key to the raw key of its per-tensor scale;
    ``layer_quant`` maps a logical layer name (``blocks.0.ffn.0``) to its comfy_quant JSON config.
    """

    path: Path
    size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    prefix: str
    quant: str  # "none" | "scaled_fp8" | "comfy_quant" | "fp8_unscaled"
    fp8_gemm_allowed: bool
    main_dtype: str
    keys: dict[str, str] = field(default_factory=dict)
    scales: dict[str, str] = field(default_factory=dict)
    layer_quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_start: int = 0  # byte offset of the data section: 8 + header length


# --------------------------------------------------------------------------------------------------------
# header


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """Return (raw JSON header bytes, file size) after the checks every reader needs."""
    path = Path(path)
    if not path.exists():  # also catches dangling symlinks
        raise WeightsError(f"{path}: file not found. Check the file name and the ComfyUI models folder.")
    if not path.resolve().is_file():
        raise WeightsError(f"{path}: not a regular file. Point the setting at a .safetensors file.")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path}: file is empty (0 bytes). Delete it and download it again.")
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: only {size} bytes, too short for a safetensors file. Download it again.")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            raise WeightsError(
                f"{path}: not a safetensors file (header length {n} for a file of {size} bytes). "
                "Only .safetensors/.sft files are loaded; convert pickles (.pth/.ckpt/.bin) offline."
            )
        raw = fh.read(n)
    if len(raw) != n:
        raise WeightsError(f"{path}: file changed while reading its header. Try again.")
    return raw, size


def read_header(path: Path) -> FileInfo:
    """Read and validate the header of one safetensors file; detect prefix, quantisation and main dtype.

    Reads the 8-byte length, the JSON header and, for comfy_quant files, the small U8 JSON tensors
    (``<layer>.comfy_quant``, a few dozen bytes each). Raises :class:`WeightsError` naming the file for a
    missing or non-regular file, an empty file, an absurd header length, invalid JSON, malformed entries,
    and a truncated file (data offsets past the end of the file).
    """
    path = Path(path)
    raw, size = _read_header_bytes(path)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: header is not valid JSON ({e}); not a safetensors file or corrupt.") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is not a JSON object; not a safetensors file.")
    data_start = 8 + len(raw)
    data_len = size - data_start

    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise WeightsError(f"{path}: __metadata__ must map strings to strings; the file is malformed.")
    metadata: dict[str, str] = dict(meta_raw)

    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _parse_entry(path, key, entry, data_len)

    prefix = detect_prefix(tensors)
    keys: dict[str, str] = {}  # logical -> raw
    companions: dict[str, str] = {}  # logical companion/extra name -> raw
    for rawk in tensors:
        logical = rawk[len(prefix) :] if prefix and rawk.startswith(prefix) else rawk
        if logical in _EXTRAS or logical.endswith(_COMPANIONS):
            companions[logical] = rawk
            continue
        if logical in keys:
            raise WeightsError(
                f"{path}: keys {keys[logical]!r} and {rawk!r} both map to {logical!r} after stripping the "
                f"prefix {prefix!r}; the file mixes prefixed and bare copies of one weight."
            )
        keys[logical] = rawk

    scales: dict[str, str] = {}
    for logical, rawk in companions.items():
        for suffix in _WEIGHT_SCALES:
            if logical.endswith(suffix):
                weight = logical[: -len(suffix)] + ".weight"
                if weight in scales:
                    raise WeightsError(f"{path}: {weight!r} has both a .scale_weight and a .weight_scale.")
                scales[weight] = rawk

    layer_quant = _layer_quant_configs(path, metadata, header, companions, prefix, data_start)
    quant, gemm = _quant_format(metadata, tensors, keys, companions, scales, layer_quant)
    return FileInfo(
        path=path,
        size=size,
        metadata=metadata,
        tensors=tensors,
        prefix=prefix,
        quant=quant,
        fp8_gemm_allowed=gemm,
        main_dtype=_main_dtype(keys, tensors),
        keys=keys,
        scales=scales,
        layer_quant=layer_quant,
        data_start=data_start,
    )


def _quant_format(metadata: Mapping[str, str], tensors: Mapping[str, TensorInfo], keys: Mapping[str, str],
                  companions: Mapping[str, str], scales: Mapping[str, str],
                  layer_quant: Mapping[str, dict[str, Any]]) -> tuple[str, bool]:
    """(FileInfo.quant, FileInfo.fp8_gemm_allowed) of a file from its header."""
    marker = companions.get(_MARKER)
    if "_quantization_metadata" in metadata or any(k.endswith(".comfy_quant") for k in companions):
        return "comfy_quant", bool(layer_quant) and all(
            c.get("format") in _FP8_FORMATS and not c.get("full_precision_matrix_mult") for c in layer_quant.values()
        )
    if marker is not None or scales:
        # ComfyUI: marker.nelement() == 2 -> full-precision matmul; any other count allows fp8 GEMMs. Scales
        # without any marker (kijai's wrapper accepts those) -> be conservative: dequantise.
        return "scaled_fp8", marker is not None and math.prod(tensors[marker].shape) != 2
    if any(tensors[r].dtype in _FP8_DTYPES for r in keys.values()):
        return "fp8_unscaled", False
    return "none", False


def _parse_entry(path: Path, key: str, entry: Any, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise WeightsError(f"{path}: header entry {key!r} is not an object; the file is malformed.")
    dtype, shape_raw, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    shape = tuple(shape_raw) if isinstance(shape_raw, list) else None
    span = tuple(offsets) if isinstance(offsets, list) and len(offsets) == 2 else None
    if (
        not isinstance(dtype, str)
        or shape is None
        or not all(type(d) is int and d >= 0 for d in shape)
        or span is None
        or not all(type(o) is int for o in span)
        or not 0 <= span[0] <= span[1]
    ):
        raise WeightsError(f"{path}: header entry {key!r} is malformed ({entry!r}).")
    begin, end = span
    if end > data_len:
        raise WeightsError(
            f"{path}: truncated: tensor {key!r} ends at data byte {end} but the file holds only {data_len} data "
            "bytes. The download or copy was cut short; download the file again."
        )
    nbytes = end - begin
    if dtype in _ITEMSIZE and nbytes != math.prod(shape) * _ITEMSIZE[dtype]:
        raise WeightsError(
            f"{path}: tensor {key!r} ({dtype} {list(shape)}) should take {math.prod(shape) * _ITEMSIZE[dtype]} "
            f"bytes but its offsets span {nbytes}; the file is corrupt."
        )
    return TensorInfo(dtype=dtype, shape=shape, nbytes=nbytes)


def _layer_quant_configs(
    path: Path,
    metadata: Mapping[str, str],
    header: Mapping[str, Any],
    companions: Mapping[str, str],
    prefix: str,
    data_start: int,
) -> dict[str, dict[str, Any]]:
    """Per-layer comfy_quant JSON, keyed by logical layer name. File-level metadata wins (as in ComfyUI)."""

    def strip(layer: str) -> str:
        return layer[len(prefix) :] if prefix and layer.startswith(prefix) else layer

    out: dict[str, dict[str, Any]] = {}
    if "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"])["layers"]
            # Layer names are raw (prefixed) in ComfyUI's own files; accept bare names as well.
            for layer, conf in layers.items():
                out[strip(layer)] = {"format": conf} if isinstance(conf, str) else dict(conf)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise WeightsError(f"{path}: __metadata__['_quantization_metadata'] is malformed ({e}).") from e
        return out
    blobs = [(lg, rk) for lg, rk in companions.items() if lg.endswith(".comfy_quant")]
    if not blobs:
        return out
    with path.open("rb") as fh:
        for logical, rawk in blobs:
            entry = header[rawk]  # validated by _parse_entry
            begin, end = entry["data_offsets"]
            if entry["dtype"] != "U8" or end - begin > 65536:
                raise WeightsError(f"{path}: {rawk!r} should be a small U8 JSON blob, found {entry['dtype']}.")
            fh.seek(data_start + begin)
            try:
                conf = json.loads(fh.read(end - begin).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{path}: {rawk!r} does not hold valid JSON ({e}).") from e
            if not isinstance(conf, dict):
                raise WeightsError(f"{path}: {rawk!r} should hold a JSON object, found {conf!r}.")
            out[logical[: -len(".comfy_quant")]] = conf
    return out


def _main_dtype(keys: Mapping[str, str], tensors: Mapping[str, TensorInfo]) -> str:
    """Most common dtype by bytes among ``*weight`` tensors (all tensors if there are none)."""
    raws = [r for k, r in keys.items() if k.endswith("weight")] or list(keys.values())
    by_bytes: dict[str, int] = {}
    for r in raws:
        by_bytes[tensors[r].dtype] = by_bytes.get(tensors[r].dtype, 0) + tensors[r].nbytes
    if not by_bytes:
        return ""
    return max(sorted(by_bytes), key=lambda d: by_bytes[d])


def detect_prefix(keys: Iterable[str], candidates: Sequence[str] = DEFAULT_PREFIXES) -> str:
    """Return the key prefix to strip, or ``""``.

    Rule: the first candidate (most specific first) that begins at least 90 % (``PREFIX_SHARE``) of the keys,
    not counting the top-level extras ``scaled_fp8`` / ``spiece_model`` (with or without the prefix). This is
    stricter than ComfyUI's "more than 5 keys" rule, so a bare Wan file that happens to hold a few
    ``model.*`` keys keeps its names; the 10 % slack admits e.g. a ``wav2vec2.`` file that also carries
    unprefixed pre-training heads (``quantizer.*``, ``project_q``), which then keep their raw names.
    """
    considered = [k for k in keys if k != "__metadata__" and not any(k == e or k.endswith("." + e) for e in _EXTRAS)]
    if not considered:
        return ""
    for cand in candidates:
        hits = sum(1 for k in considered if k.startswith(cand))
        if hits and hits >= PREFIX_SHARE * len(considered):
            return cand
    return ""


def logical_shapes(info: FileInfo) -> dict[str, tuple[int, ...]]:
    """Key -> shape as the network expects it: prefix stripped, quantisation companions and blobs removed.

    Quantised weights report their logical shape (fp8 storage keeps the shape; only the dtype differs).
    """
    return {logical: info.tensors[rawk].shape for logical, rawk in info.keys.items()}


# --------------------------------------------------------------------------------------------------------
# reading tensors


def _dtype_for(dtype: DTypeSpec, key: str) -> torch.dtype:
    return dtype(key) if callable(dtype) else dtype


def _check_unchanged(info: FileInfo) -> None:
    try:
        size = info.path.stat().st_size
    except OSError as e:
        raise WeightsError(f"{info.path}: cannot be read any more ({e}).") from e
    if size != info.size:
        raise WeightsError(f"{info.path}: file size changed from {info.size} to {size} since its header was read.")


def _check_layer_format(info: FileInfo, key: str) -> None:
    """Refuse a layer whose comfy_quant format is not one of the fp8 formats this engine reads."""
    layer = key[: -len(".weight")] if key.endswith(".weight") else key
    conf = info.layer_quant.get(layer)
    if conf is not None and conf.get("format") not in _FP8_FORMATS:
        raise WeightsError(
            f"{info.path}: layer {layer!r} uses quantisation format {conf.get('format')!r}, which this engine "
            f"cannot dequantise (supported: {', '.join(_FP8_FORMATS)}). Use a bf16/fp16 or fp8-scaled file."
        )


def _read_scale(f: Any, info: FileInfo, key: str, weight_shape: tuple[int, ...],
                device: torch.device | str) -> Tensor | None:
    """The stored scale of ``key`` as float32 on ``device``: ``[]`` (per tensor) or ``[out]`` (per output channel,
    not seen in Wan files); None when the file has none. Any other shape is an error naming the file."""
    scale_key = info.scales.get(key)
    if scale_key is None:
        return None
    s: Tensor = f.get_tensor(scale_key).to(device=device, dtype=torch.float32)
    if s.numel() == 1:
        return s.reshape(())
    if len(weight_shape) >= 1 and s.numel() == weight_shape[0]:
        return s.reshape(-1)
    raise WeightsError(
        f"{info.path}: scale {scale_key!r} has shape {tuple(s.shape)}, which does not fit weight {info.keys[key]!r} "
        f"{weight_shape} (expected one value per tensor)."
    )


def _materialise(f: Any, info: FileInfo, key: str, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Read one logical tensor through an open ``safe_open`` handle, dequantise, cast, move to ``device``."""
    t: Tensor = f.get_tensor(info.keys[key])
    _check_layer_format(info, key)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or key in info.scales:
        # Move the 1-byte payload first, dequantise on the device: W = W_fp8.float() * scale, in fp32.
        w = t.to(device).float()
        s = _read_scale(f, info, key, tuple(w.shape), device)
        if s is not None:
            w = w * s.reshape(-1, *([1] * (w.ndim - 1))) if s.ndim else w * s
        return w.to(dtype)
    t = t.to(device)
    return t.to(dtype) if t.is_floating_point() else t


def iter_tensors(
    info: FileInfo,
    *,
    dtype: DTypeSpec,
    device: torch.device | str,
    keys: Iterable[str] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(logical key, tensor)`` one at a time, dequantised, cast to ``dtype``, on ``device``.

    Lazy: the file is opened with ``safetensors.safe_open`` (memory-mapped) when the first item is requested
    and each tensor is read only when yielded, so at most one tensor (plus its fp32 dequantisation temporary)
    is in flight. ``dtype`` may be a callable ``key -> dtype`` (fp32 islands, LoRA targets). Integer tensors
    keep their dtype. ``keys`` restricts and orders the output (logical names); an unknown key raises.
    """
    wanted = list(info.keys) if keys is None else list(keys)
    unknown = [k for k in wanted if k not in info.keys]
    if unknown:
        raise WeightsError(f"{info.path}: no tensor named {', '.join(map(repr, unknown[:5]))} in this file.")
    return _iter_tensors(info, wanted, dtype, device)


def _iter_tensors(
    info: FileInfo, wanted: list[str], dtype: DTypeSpec, device: torch.device | str
) -> Iterator[tuple[str, Tensor]]:
    _check_unchanged(info)
    with safe_open(str(info.path), framework="pt", device="cpu") as f:
        for key in wanted:
            yield key, _materialise(f, info, key, _dtype_for(dtype, key), device)


def iter_fp8_weights(
    info: FileInfo, keys: Iterable[str], *, device: torch.device | str
) -> Iterator[tuple[str, tuple[Tensor, Tensor]]]:
    """The stored fp8 payload of those ``keys`` that the file holds as F8_E4M3: ``(logical key, (weight, scale))``
    with the weight float8_e4m3fn on ``device`` exactly as stored and its scale as float32 ``[]`` (per tensor) or
    ``[out]`` (1 when the file has none), so that ``weight.float() * scale`` is the file's weight with no second
    rounding. Keys stored in another dtype (bf16, e5m2, ...) or absent from the file are skipped; a layer in a
    non-fp8 comfy_quant format raises, as for :func:`iter_tensors`.
    """
    wanted = [k for k in keys if k in info.keys and info.tensors[info.keys[k]].dtype == "F8_E4M3"]
    if not wanted:
        return iter(())
    return _iter_fp8(info, wanted, device)


def _iter_fp8(info: FileInfo, wanted: list[str], device: torch.device | str
              ) -> Iterator[tuple[str, tuple[Tensor, Tensor]]]:
    _check_unchanged(info)
    with safe_open(str(info.path), framework="pt", device="cpu") as f:
        for key in wanted:
            _check_layer_format(info, key)
            w: Tensor = f.get_tensor(info.keys[key]).to(device)
            s = _read_scale(f, info, key, tuple(w.shape), device)
            yield key, (w, torch.ones((), dtype=torch.float32, device=device) if s is None else s)


def extra_tensor(info: FileInfo, name: str) -> Tensor | None:
    """Read a non-network tensor such as the umT5 ``spiece_model`` U8 blob (raw dtype, CPU); None if absent."""
    rawk = next((r for r in (name, info.prefix + name) if r in info.tensors), None)
    if rawk is None:
        return None
    _check_unchanged(info)
    with safe_open(str(info.path), framework="pt", device="cpu") as f:
        blob: Tensor = f.get_tensor(rawk)
    return blob


# --------------------------------------------------------------------------------------------------------
# strict loading


def _fmt_keys(items: Sequence[str], n: int = 5) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_module(
    module: nn.Module,
    tensors: Iterable[tuple[str, Tensor]],
    *,
    source: str,
    allow_missing: Iterable[str] = (),
) -> None:
    """Load ``tensors`` into ``module`` strictly (keys and shapes), assigning them (meta-built modules).

    Every missing, unexpected or mis-shaped key is an error naming ``source`` and the first five offending
    keys of each kind with their shapes. ``allow_missing`` holds exact keys or ``fnmatch`` patterns that may
    be absent (their module values must then already be real). After loading no parameter or buffer may be
    left on the meta device.
    """
    state = dict(tensors)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    allowed = list(allow_missing)

    def is_allowed(k: str) -> bool:
        return any(k == p or fnmatchcase(k, p) for p in allowed)

    missing = [k for k in expected if k not in state and not is_allowed(k)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: " + _fmt_keys([f"{k} {list(expected[k])}" for k in missing]))
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected: " + _fmt_keys([f"{k} {list(state[k].shape)}" for k in unexpected])
            )
        if misshaped:
            parts.append(
                f"{len(misshaped)} mis-shaped: "
                + _fmt_keys([f"{k} file {list(state[k].shape)} vs network {list(expected[k])}" for k in misshaped])
            )
        raise WeightsError(
            f"{source}: weights do not fit the network ({'; '.join(parts)}). Check that the file is the right "
            "model for this role (and variant/size) and is not a different release or a LoRA."
        )
    strict = not any(k not in state for k in expected)
    module.load_state_dict(state, strict=strict, assign=True)
    on_meta = [n for n, p in module.named_parameters() if p.is_meta]
    on_meta += [n for n, b in module.named_buffers() if b.is_meta]
    if on_meta:
        raise WeightsError(
            f"{source}: after loading, {len(on_meta)} parameters/buffers are still on the meta device: "
            f"{_fmt_keys(on_meta)}. They are neither in the file nor initialised by the network."
        )


def load_network(
    info: FileInfo,
    *,
    config_from_shapes: Callable[[dict[str, tuple[int, ...]]], Any],
    build: Callable[[Any, torch.device], nn.Module],
    normalize_keys: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    dtype: DTypeSpec,
    device: torch.device | str,
) -> tuple[nn.Module, Any]:
    """One network from one file: config from the header's shapes, built on meta, streamed, loaded strictly.

    The encoders and the VAE load this way; the DiT (base file + InfiniteTalk patch + LoRA merge) loads through
    engine.models_dir.load_dit, which uses the same steps (:func:`iter_tensors`, :func:`load_module`).
    Returns ``(module, cfg)``.
    """
    shapes = logical_shapes(info)
    cfg = config_from_shapes(normalize_keys(dict(shapes)) if normalize_keys else dict(shapes))
    # build's contract: parameters on meta, non-persistent buffers real on ``device`` (assign-load fills the rest)
    module = build(cfg, torch.device(device))
    state = dict(iter_tensors(info, dtype=dtype, device=device))
    if normalize_keys:
        state = normalize_keys(state)
    load_module(module, state.items(), source=str(info.path))
    return module, cfg


# --------------------------------------------------------------------------------------------------------
# identity

_SAMPLE_BYTES = 65536


def file_identity(path: Path) -> str:
    """A cheap, stable identity of a weights file: ``"<name>:<size>:<sha256 prefix>"``.

    The sha256 covers the header bytes (all keys, dtypes, shapes, offsets, metadata) plus the first and last
    64 KiB of the tensor data — a few hundred kB read, never the whole multi-GB file. It stays the same when
    the file is copied or touched (no mtime), and changes when it is renamed, re-quantised, re-saved with
    different tensors, or retrained with the same layout (the sampled data bytes differ). Two files that
    differ only in data bytes outside the samples would collide; use it as a cache key and provenance
    record, not as a tamper check.
    """
    path = Path(path)
    raw, size = _read_header_bytes(path)
    digest = hashlib.sha256()
    digest.update(struct.pack("<Q", len(raw)) + raw)
    data_start = 8 + len(raw)
    with path.open("rb") as fh:
        fh.seek(data_start)
        digest.update(fh.read(_SAMPLE_BYTES))
        fh.seek(max(data_start, size - _SAMPLE_BYTES))
        digest.update(fh.read(_SAMPLE_BYTES))
    return f"{path.name}:{size}:{digest.hexdigest()[:32]}"
