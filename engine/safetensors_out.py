"""Writing safetensors files: with the umask's permissions, atomically, and in the legacy ComfyUI scaled-fp8 format
(the tiny-model generator, benchmarks and tests write model files; engine.weights reads them and re-exports these).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["E4M3_MAX", "file_mode", "save_tensors", "write_scaled_fp8"]

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
_MARKER = "scaled_fp8"  # the legacy format's marker tensor (engine.weights detects the format by it)




def file_mode() -> int:
    """The permissions a new file gets under this process's umask (0644 under the usual 022)."""
    try:  # Linux 4.7+: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return 0o666 & ~mask


def save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file with the umask's permissions (safetensors alone writes 0600), via a temporary name
    and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_scaled_fp8(
    path: Path,
    tensors: Mapping[str, Tensor],
    *,
    fp8_keys: Callable[[str], bool] | Collection[str],
    prefix: str = "",
    marker_elems: int | None = 0,
    metadata: Mapping[str, str] | None = None,
    scale_suffix: str = "scale_weight",
) -> None:
    """Write the legacy ComfyUI scaled-fp8 format (docs/formats.md §3.1).

    Chosen ``*.weight`` tensors become F8_E4M3 ``W / scale`` (scale = absmax / 448, 1 for an all-zero
    tensor) with a per-tensor F32 ``<layer>.<scale_suffix>`` of shape ``[]`` (``"scale_weight"``, or
    ``"weight_scale"`` as kijai's files may spell it); the others are written as given. A ``scaled_fp8``
    marker of ``marker_elems`` fp8 elements is added (2 = "full-precision matmul only"; None = no marker).
    Every key gets ``prefix``. Written to a temporary name and renamed, so readers never see half a file.
    """
    if scale_suffix not in ("scale_weight", "weight_scale"):
        raise ValueError(f"scale_suffix must be 'scale_weight' or 'weight_scale', not {scale_suffix!r}")
    chosen = fp8_keys if callable(fp8_keys) else set(fp8_keys).__contains__
    if not callable(fp8_keys):
        absent = sorted(set(fp8_keys) - set(tensors))
        if absent:
            raise ValueError(f"fp8_keys not among the tensors: {absent[:5]}")
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        t = t.detach().cpu()
        if chosen(key):
            if not key.endswith(".weight") or not t.is_floating_point():
                raise ValueError(f"only floating-point '*.weight' tensors can be stored as fp8, not {key!r}")
            w = t.float()
            absmax = float(w.abs().max()) if w.numel() else 0.0
            scale = absmax / E4M3_MAX if absmax > 0 else 1.0
            out[prefix + key] = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            out[prefix + key[: -len("weight")] + scale_suffix] = torch.tensor(scale, dtype=torch.float32)
        else:
            out[prefix + key] = t.clone().contiguous()
    if marker_elems is not None:
        out[prefix + _MARKER] = torch.zeros(marker_elems, dtype=torch.float8_e4m3fn)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(out, str(tmp), metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, file_mode())  # safetensors creates 0600 files; a models folder is usually shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
