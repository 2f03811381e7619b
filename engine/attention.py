"""The one attention function every network in the engine uses.

Layout is the one the Wan code uses throughout: ``[batch, tokens, heads, head_dim]``. Internally
this is :func:`torch.nn.functional.scaled_dot_product_attention` on ``[batch, heads, tokens,
head_dim]`` views, scale ``1/sqrt(head_dim)``, no mask, no dropout.

Backend choice: by default torch picks (flash / memory-efficient / cuDNN / math) per call. To
pin one, wrap the call site (e.g. the render loop, once per job) in :func:`sdpa_backend`, which
is a thin wrapper over :func:`torch.nn.attention.sdpa_kernel`. There is no module-level state.

Official InfiniteTalk uses flash-attention for the DiT and xformers' memory-efficient kernel for
the audio attention; both compute the same softmax attention as SDPA (only rounding differs).

:func:`flash3_attention` is the same function through FlashAttention-3 (``flash_attn_interface``, built from
flash-attention's ``hopper/`` folder), which the fast path uses for the DiT's self-attention on Hopper GPUs when it
is installed (faster than cuDNN's kernel at the DiT's shapes with the same error against fp32; figures in
bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["attention", "flash3_attention", "flash3_available", "sdpa_backend", "BACKENDS"]

# Names accepted by :func:`sdpa_backend` (the settings/CLI spelling) -> torch's enum.
BACKENDS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``softmax(q kᵀ / sqrt(D)) v`` without mask.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D] -> [B, Lq, H, D] (same dtype as q).
    The result is a transposed view of SDPA's output; callers ``reshape`` it (not ``view``).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects 4-D [B, L, H, D] tensors, got {q.shape}, {k.shape}, {v.shape}")
    # SDPA wants [B, H, L, D]; transposing a contiguous [B, L, H, D] keeps D contiguous (stride 1),
    # which all SDPA kernels accept without a copy.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def flash3_available(device: torch.device | str | None = None) -> bool:
    """True where :func:`flash3_attention` can run: a CUDA GPU of compute capability 9.x (Hopper; FA3's kernels
    are sm90-only) and an importable ``flash_attn_interface`` module. Imports nothing."""
    if not torch.cuda.is_available() or torch.version.hip:
        return False
    dev = torch.device(device or "cuda")
    if dev.type != "cuda":
        return False
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index)[0] != 9:
        return False
    return importlib.util.find_spec("flash_attn_interface") is not None


def flash3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`attention` computed by FlashAttention-3 (bf16/fp16 CUDA tensors, [B, L, H, D] in and out, scale
    ``1/sqrt(D)``, no mask). FA3 registers its kernel as a torch custom op, so ``torch.compile`` keeps it whole."""
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # some FA3 versions return (out, lse)


@contextlib.contextmanager
def sdpa_backend(name: str | None) -> Iterator[None]:
    """Context manager restricting SDPA to one backend; ``None`` or ``"auto"`` lets torch choose.

    Raises ValueError for an unknown name (the message lists the valid ones).
    """
    if name is None or name == "auto":
        yield
        return
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; expected one of auto, {', '.join(BACKENDS)}") from None
    with sdpa_kernel([backend]):
        yield
