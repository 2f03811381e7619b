"""The GPU fast path for the DiT: fp8 GEMMs, compiled blocks, the best attention kernel.

Three independent switches, each applied to a built and loaded :class:`engine.dit.WanInfiniteTalk`:

- :func:`enable_fp8` swaps the big Linear layers inside ``dit.blocks`` for :class:`Fp8Linear`: the weight is
  stored as ``float8_e4m3fn`` with one fp32 scale per output channel, the activation is quantised per row
  (abs-max / 448, divide, cast) on every call, and the product is ``torch._scaled_mm`` with fp32
  accumulation and a bf16 result. Per-row x per-channel scaling is the usual choice for fp8 inference
  (docs/performance.md §8; LightX2V ``fp8-sgl``/``fp8-vllm``). The activation quantisation is written in
  plain tensor ops so that ``torch.compile`` fuses it into the norm / modulation / GELU that produces the
  activation; run eagerly it costs about as much as fp8 saves (docs/performance.md §4.1).
- :func:`compile_blocks` compiles every block with static shapes. All 40 blocks run the same code on
  parameters of identical shapes, so one graph serves all of them; a new resolution bucket (token count)
  compiles once more, and later steps, chunks and jobs of a seen bucket reuse the cached graphs.
- :func:`preferred_attention` puts cuDNN SDPA first (docs/performance.md §4.2, §7); :func:`use_flash3` runs the
  blocks' self-attention on FlashAttention-3 instead where it is installed on a Hopper GPU.

The measured speed and error of each combination (forward time, compile time, error against an fp32 forward) are
in bench/RESULTS.md; ``engine.fp8`` uses fast accumulation because it was faster at the same error there.

Order of use: load (LoRAs merged into the dequantised weights first, docs/formats.md §3.4), cast with ``.to()``,
then :func:`enable_fp8`, then :func:`compile_blocks`, then run the forwards inside
:func:`preferred_attention`. Nothing here changes global state except for the duration of that context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from engine.dit import WanInfiniteTalk

__all__ = [
    "FP8_DTYPE",
    "FP8_LARGE_M_TARGETS",
    "FP8_MAX",
    "FP8_TARGETS",
    "Fp8Linear",
    "compile_blocks",
    "dequantize",
    "enable_fp8",
    "fp8_targets",
    "preferred_attention",
    "use_flash3",
    "uses_flash3",
    "wants_flash3",
    "quantize_rowwise",
    "quantize_weight",
    "scaled_mm_reference",
    "supports_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Floor on a row's abs-max, so an all-zero row gets a tiny positive scale (quantises to zeros, not NaN).
_AMAX_FLOOR = 1e-12

# Linear layers converted by :func:`enable_fp8`, relative to a block. All 15 Linears of a block: q/k/v/o of the
# self-attention, q/k/v/o/k_img/v_img of the text+image cross-attention, the two FFN layers and the audio
# cross-attention's q_linear/kv_linear/proj. That is 16.3 B of the 16.4 B block parameters, so the weights
# drop from 35.3 GiB to 19.3 GiB (measured). A ComfyUI fp8 DiT file stores the first 12 in fp8 (docs/formats.md §3.1);
# the loader hands those bytes to ``weights_fp8`` unchanged when no LoRA is merged (models_dir._to_fp8), while
# the audio cross-attention comes from the fp16 InfiniteTalk patch and is quantised here. The embeddings, head,
# img_emb and audio_proj stay in 16 bits (small, and they run on few tokens).
FP8_TARGETS: tuple[str, ...] = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "cross_attn.k_img",
    "cross_attn.v_img",
    "ffn.0",
    "ffn.2",
    "audio_cross_attn.q_linear",
    "audio_cross_attn.kv_linear",
    "audio_cross_attn.proj",
)
# The 10 of them whose input is the 32K video tokens. The other 5 (K/V of the 512 text, 257 image and 32-per-frame
# audio context tokens) gain no speed from fp8 but add error: leaving them in bf16 kept the forward's speed, lowered
# the error against an fp32 forward and cost more weight memory (bench/RESULTS.md, fp8 targets). Pass
# ``targets=FP8_LARGE_M_TARGETS`` to use it.
FP8_LARGE_M_TARGETS: tuple[str, ...] = tuple(
    t for t in FP8_TARGETS if t not in ("cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img",
                                         "audio_cross_attn.kv_linear")
)


def fp8_targets(*, adapter_swap: bool) -> tuple[str, ...]:
    """The block Linears ``engine.fp8`` converts: :data:`FP8_TARGETS`, less the audio cross-attention when the
    engine swaps the single/multi-speaker adapter at run time (the swap writes bf16 weights into those layers)."""
    if not adapter_swap:
        return FP8_TARGETS
    return tuple(t for t in FP8_TARGETS if not t.startswith("audio_cross_attn."))


def supports_fp8(device: torch.device | str | int | None = None) -> bool:
    """True where ``torch._scaled_mm`` runs fp8 e4m3 GEMMs on the GPU: a CUDA device of compute capability 8.9+
    (Ada, Hopper, Blackwell). False on CPU, on ROCm (its fp8 dtype differs) and without CUDA."""
    if not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available() or torch.version.hip:
        return False
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if dev.type != "cuda":
        return False
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 9)


# ----------------------------------------------------------------------------------------------
# Quantisation helpers (pure tensor ops: traceable and fusable by torch.compile)
# ----------------------------------------------------------------------------------------------


def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row fp8 quantisation of x [..., K]: returns (q [..., K] float8_e4m3fn, scale [..., 1] float32).

    scale = max|row| / 448, q = x / scale, so the largest entry of each row maps to +-448 and
    ``q.float() * scale`` approximates x with a relative error of at most 2^-4 for normal fp8 values. The clamp
    only guards rounding at the top of the range (casting past 448 would give NaN: e4m3fn has no infinity).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_AMAX_FLOOR) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel fp8 quantisation of a Linear weight [N, K]: (q [N, K] e4m3fn, scale [N] float32)."""
    if w.ndim != 2:
        raise ValueError(f"a Linear weight is 2-D [out, in], got shape {tuple(w.shape)}")
    q, scale = quantize_rowwise(w)
    return q, scale.squeeze(-1)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """q.float() * scale (scale broadcast over q's last axis: [..., 1] per row or a scalar) in float32."""
    return q.float() * scale.float()


def scaled_mm_reference(
    x_q: Tensor, scale_x: Tensor, w_q: Tensor, scale_w: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """What ``torch._scaled_mm(x_q, w_q.t(), scale_a=scale_x, scale_b=scale_w[None], bias, out_dtype)`` computes,
    in float32 on any device: the exact fp8 products summed in fp32, then scaled per row and per column, plus
    bias, rounded once to out_dtype. x_q [M, K], scale_x [M, 1], w_q [N, K], scale_w [N] (or a scalar).
    """
    acc = x_q.float() @ w_q.float().t()  # [M, N]; every fp8 x fp8 product is exact in fp32
    out = acc * scale_x.float() * scale_w.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# The fp8 Linear
# ----------------------------------------------------------------------------------------------


class Fp8Linear(nn.Module):
    """A Linear whose weight is float8_e4m3fn [out, in] with a float32 scale per output channel.

    State dict: ``weight`` (fp8, the Linear's key and shape), ``bias`` (unchanged, 16-bit) and ``weight_scale``
    [out] float32 (ComfyUI's newer spelling, docs/formats.md §3.2; here one scale per row, not per tensor).
    The true weight is ``weight.float() * weight_scale[:, None]``.

    Forward: x [..., in] is quantised per row (:func:`quantize_rowwise`) and multiplied with ``torch._scaled_mm``
    when x is a bf16 CUDA tensor (the device must satisfy :func:`supports_fp8`; elsewhere ``_scaled_mm`` raises).
    Any other input (CPU, fp16, fp32) takes :func:`scaled_mm_reference`, the same arithmetic in fp32, so a CPU
    run shows the numerics of the GPU kernel (slowly) instead of silently skipping the quantisation.
    The result has x's dtype.
    """

    weight_scale: Tensor  # registered buffer, [out] float32

    def __init__(
        self, weight: Tensor, weight_scale: Tensor, bias: Tensor | nn.Parameter | None, *, fast_accum: bool = False
    ) -> None:
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.ndim != 2:
            raise ValueError(f"Fp8Linear needs a 2-D {FP8_DTYPE} weight, got {weight.dtype} {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        if weight_scale.numel() not in (1, out_features):
            raise ValueError(f"weight_scale has {weight_scale.numel()} entries; expected 1 or {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        # Hopper's fp8 "fast accumulation" (fewer promotions of the tensor-core accumulator to fp32): faster
        # GEMMs (docs/performance.md §4.1), slightly less accurate sums; only the CUDA kernel honours it.
        self.fast_accum = fast_accum
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        # A per-tensor scale (ComfyUI files) is broadcast to one per channel: same math, one kernel path.
        scale = weight_scale.detach().float().reshape(-1).expand(out_features).contiguous()
        self.register_buffer("weight_scale", scale.to(weight.device))
        if bias is None:
            self.bias: nn.Parameter | None = None
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, fast_accum: bool = False) -> Fp8Linear:
        """Quantise an nn.Linear's weight per output channel; the bias Parameter is kept as is."""
        q, scale = quantize_weight(linear.weight.detach())
        return cls(q, scale, linear.bias, fast_accum=fast_accum)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x_q, scale_x = quantize_rowwise(x.reshape(-1, self.in_features))  # [M, K] fp8, [M, 1] fp32
        if x.is_cuda and x.dtype == torch.bfloat16 and self.weight.dtype == FP8_DTYPE:
            bias = None if self.bias is None else self.bias.to(torch.bfloat16)
            # mat2 = weight.t() is column-major, as _scaled_mm requires; rowwise scales: a [M, 1], b [1, N].
            out = torch._scaled_mm(
                x_q,
                self.weight.t(),
                scale_a=scale_x,
                scale_b=self.weight_scale.float().reshape(1, -1),
                bias=bias,
                out_dtype=torch.bfloat16,
                use_fast_accum=self.fast_accum,
            )
        else:
            out = scaled_mm_reference(x_q, scale_x, self.weight, self.weight_scale, self.bias, x.dtype)
        return out.reshape(*lead, self.out_features)

    def dequantized_weight(self) -> Tensor:
        """The weight this layer represents, [out, in] float32."""
        return dequantize(self.weight, self.weight_scale[:, None])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fast_accum={self.fast_accum}"
        )


def _resolve(block: nn.Module, rel: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = rel.rpartition(".")
    return (block.get_submodule(parent_name) if parent_name else block), attr


def enable_fp8(
    dit: nn.Module,
    *,
    weights_fp8: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    targets: Iterable[str] = FP8_TARGETS,
    fast_accum: bool = False,
) -> int:
    """Replace the Linear layers of ``dit.blocks`` named by ``targets`` (default :data:`FP8_TARGETS`) by
    :class:`Fp8Linear` under the same attribute names; returns how many layers were converted.

    Weights are quantised per output channel from the loaded (dequantised, LoRA-merged) weights. ``weights_fp8``
    may instead supply a layer's stored fp8 weight and scale as read from a ComfyUI scaled-fp8 file, keyed by
    the layer's name in the model (``"blocks.3.ffn.0"``): (weight [out, in] float8_e4m3fn, scale [] or [out]
    float32). Use it only when no LoRA was merged (a merge changes the weight, docs/formats.md §3.4). The file's
    static ``scale_input`` is not used: activations are always scaled per row at run time.

    The old bf16 weights are released (the bias Parameter is reused), so the converted layers take half the
    memory. ``fast_accum`` selects Hopper's faster, less exact fp8 accumulation (see :class:`Fp8Linear`; off by
    default until shown close enough). Layers that already are :class:`Fp8Linear` are skipped, so a second call
    returns 0. Call this after any ``.to(dtype)`` of the model: a later cast would turn the fp8 weights into 16-bit
    ones (still correct through the reference path, but no longer fp8). Raises ValueError for a ``weights_fp8``
    name that is not a converted layer or whose tensors do not fit it, TypeError if a target is not an nn.Linear.
    """
    targets = tuple(targets)
    pending = dict(weights_fp8 or {})
    converted = 0
    for i, block in enumerate(dit.blocks):  # type: ignore[arg-type]
        for rel in targets:
            parent, attr = _resolve(block, rel)
            layer = getattr(parent, attr)
            name = f"blocks.{i}.{rel}"
            if isinstance(layer, Fp8Linear):
                continue
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name} is a {type(layer).__name__}, not an nn.Linear")
            if name in pending:
                w_q, scale = pending.pop(name)
                if w_q.dtype != FP8_DTYPE or tuple(w_q.shape) != tuple(layer.weight.shape):
                    raise ValueError(
                        f"weights_fp8[{name!r}] is {w_q.dtype} {tuple(w_q.shape)}; expected {FP8_DTYPE} "
                        f"{tuple(layer.weight.shape)}"
                    )
                if scale.numel() not in (1, layer.out_features):
                    raise ValueError(f"weights_fp8[{name!r}] scale has {scale.numel()} entries")
                new = Fp8Linear(
                    w_q.to(layer.weight.device), scale.to(layer.weight.device), layer.bias, fast_accum=fast_accum
                )
            else:
                new = Fp8Linear.from_linear(layer, fast_accum=fast_accum)
            setattr(parent, attr, new)  # same attribute name (nn.Sequential "0"/"2" included)
            converted += 1
    if pending:
        raise ValueError(f"weights_fp8 names no converted layer: {sorted(pending)[:5]}")
    return converted


# ----------------------------------------------------------------------------------------------
# torch.compile and attention
# ----------------------------------------------------------------------------------------------


# Graphs Dynamo may keep per code object: every bucket of both families (15 + 21) with the cached and the
# uncached context K/V paths, with room to spare.
RECOMPILE_LIMIT = 96


def compile_blocks(dit: nn.Module, *, mode: str | None = None, backend: str = "inductor") -> None:
    """Compile every block of ``dit.blocks`` in place (``nn.Module.compile``, ``dynamic=False``).

    Static shapes: each resolution bucket (and batch size) gets its own graph, compiled on its first forward;
    every later step, chunk and job of that bucket reuses it. The blocks are identical code on parameters of
    identical shapes and Dynamo treats parameters as graph inputs, so the 40 blocks share one graph: the
    compile cost is paid once per bucket, not per block (the bench checks this with Dynamo's counters and
    ``error_on_recompile``). Compiling in place keeps the module tree and the state-dict keys unchanged.

    Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (default 8) graphs per code object and runs
    any further shape eagerly, with one log warning (tiny DiT, 10 sizes: 8 compiled, 2 eager). The two bucket
    families have 15 + 21 sizes, so this raises the process-wide limit to :data:`RECOMPILE_LIMIT` (never lowers it).
    ``backend`` other than inductor is for tests (``"aot_eager"`` exercises the tracing without code generation).
    """
    import torch._dynamo

    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    for block in dit.blocks:  # type: ignore[union-attr]
        block.compile(dynamic=False, mode=mode, backend=backend)


FA3_MISSING = ("FlashAttention-3 is not available: it needs a Hopper GPU (compute capability 9.x) and the "
               "'flash_attn_interface' module (build flash-attention's hopper/ folder: cd flash-attention/hopper && "
               "pip install --no-build-isolation .); set engine.attention: auto or sdpa to run without it")


def use_flash3(dit: WanInfiniteTalk, *, on: bool = True) -> int:
    """Route every block's self-attention through :func:`engine.attention.flash3_attention` (FlashAttention-3;
    ``on=False``: back to SDPA). Returns the number of blocks changed. Call before :func:`compile_blocks`.

    Only the self-attention changes: it is nearly all of the DiT's attention time at 480p (32 928 queries x 32 928
    keys; the profile is in bench/RESULTS.md); the cross-attentions (512 text, 257 image, 32-per-frame audio keys)
    stay on SDPA. The kernel is chosen here, per module, instead of by re-routing torch's flash SDPA backend: that
    routing is process-wide, and a forward compiled under it was seen to still run cuDNN's kernel, while a
    different kernel function is a different graph.

    Raises RuntimeError where FA3 cannot run (see :func:`engine.attention.flash3_available`).
    """
    from engine.attention import attention, flash3_attention, flash3_available

    if on and not flash3_available():
        raise RuntimeError(FA3_MISSING)
    return dit.set_self_attention(flash3_attention if on else attention)


def wants_flash3(setting: str, *, fast: bool, available: bool, dtype: torch.dtype) -> bool:
    """Whether the engine runs the DiT self-attention on FlashAttention-3, for ``engine.attention`` = ``setting``
    ("auto" | "sdpa" | "fa3") on the fast path (``fast``: compiled on a CUDA GPU), FA3 ``available`` there
    (:func:`engine.attention.flash3_available`) and the DiT's ``dtype`` (FA3 has bf16/fp16 kernels only).

    "auto" takes FA3 whenever it can run; "fa3" where it cannot is a ValueError saying why and what to use instead.
    """
    if setting not in ("auto", "sdpa", "fa3"):
        raise ValueError(f"engine.attention must be auto, sdpa or fa3 (got {setting!r})")
    half = dtype in (torch.bfloat16, torch.float16)
    if setting != "fa3":
        return setting == "auto" and fast and available and half
    if not fast:
        raise ValueError("engine.attention: fa3 needs the fast path on a CUDA GPU (engine.fast: true and a CUDA "
                         "engine.device); use auto or sdpa here")
    if not half:
        raise ValueError(f"engine.attention: fa3 needs engine.dtype bfloat16 or float16 (FlashAttention-3 has no "
                         f"{dtype} kernels); use auto or sdpa, or another dtype")
    if not available:
        raise ValueError(FA3_MISSING)
    return True


def uses_flash3(dit: WanInfiniteTalk) -> bool:
    """True when the blocks' self-attention runs on FlashAttention-3 (:func:`use_flash3`)."""
    from engine.attention import flash3_attention

    return dit.self_attention is flash3_attention


@contextlib.contextmanager
def preferred_attention() -> Iterator[None]:
    """SDPA backends in order of speed for the DiT's shapes: cuDNN, flash, memory-efficient, math.

    Every backend stays allowed (the 32-key audio attention or an fp32 run may need a fallback); only the
    priority changes (cuDNN was the fastest at 32K tokens, bench/RESULTS.md). Under torch.compile the backend is
    chosen when a graph is traced: compile inside this context. FlashAttention-3 is not routed through here but set
    per module (:func:`use_flash3`).
    """
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield
