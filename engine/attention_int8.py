"""8-bit self-attention for the DiT: int8 Q·Kᵀ, fp8 P·V, fp32 softmax (issue 5: "the best attention kernel").

Self-attention over the 32 928 video tokens of a 480p chunk is about half of a DiT forward's FLOPs and ~1.5 s
of the 3.06 s compiled bf16 forward on an H100 (bench/RESULTS.md). Hopper's 8-bit tensor cores run twice
the bf16 rate, so this module computes the two attention products in 8 bits:

- Q·Kᵀ in int8 with int32 accumulation (exact products and sums). Q and K are quantised per token and head
  (abs-max / 127). K is first "smoothed": its mean over the tokens is subtracted per head and channel. That
  shifts every logit of a query row by the same amount (q·k̄), which softmax ignores, and removes the
  channel-wise offset that real checkpoints put into K, so the int8 grid is spent on the part that varies.
  Both ideas (int8 Q·Kᵀ, K smoothing) are SageAttention's (Zhang et al., "SageAttention", ICLR 2025, and
  "SageAttention2", arXiv 2411.10958); the code here is our own.
- P·V in fp8 e4m3 with fp32 accumulation. V is quantised per head and channel over all tokens (abs-max /
  448) and stored transposed [B, H, D, L] (the layout Hopper's fp8 matrix instructions need for the second
  operand). The un-normalised probabilities exp(s - m) lie in [0, 1]; they are computed as 448·exp(s - m) (the
  factor folded into the exponent) so they use e4m3's whole range, and it cancels against the row sum.
- The softmax itself (row max, exp2, row sum, rescaling) stays in fp32, as in FlashAttention.

:func:`int8_attention` is the entry point: ``[B, L, H, D]`` bf16/fp16 q, k, v in, ``[B, L, H, D]`` out, same
contract as :func:`engine.attention.attention` without a mask. The quantisation is written in tensor ops so
that ``torch.compile`` fuses it into the RoPE/norm kernels that produce q and k; the attention loop is a
Triton kernel wrapped as a custom op (opaque to the compiler, one graph for all blocks). It needs a CUDA GPU
with 8-bit tensor cores (compute capability 8.9+) and Triton; :func:`available` says whether it can run.
:func:`int8_attention_reference` computes the same quantised arithmetic in float32 with plain torch on any
device, so the numerics can be tested without a GPU.

Measured on an H100 (bench/RESULTS.md, 2026-11-25 session 2): the kernel alone runs at 607 TF/s at 32 928 tokens,
cuDNN's bf16 SDPA at 578 TF/s; per call its error against fp32 is 3.9e-2 with fp8 P·V (cuDNN: 2.3e-3) and 1e-2
with bf16 P·V (then slower than cuDNN). Whole compiled forward: 1-2 % faster. That does not pay for the error, so
it is not an engine option; :func:`engine.fast.enable_int8_attention` switches a model over for benchmarks and
for a faster kernel later (warp specialisation and TMA loads are what it most likely lacks against FA3's
fp8 kernel; not profiled).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.fast import FP8_MAX, supports_fp8

try:  # Triton ships with CUDA builds of torch; the CPU build (CI) has none, and nothing here needs it there.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None

__all__ = ["available", "int8_attention", "int8_attention_reference", "quantize_qk", "quantize_v"]

INT8_MAX = 127.0
LOG2E = 1.4426950408889634
_V_PAD = 16  # V's token axis is padded to a multiple of 16 elements (16-byte rows for vectorised loads)
_FLOOR = 1e-8  # floor on an abs-max, so an all-zero row quantises to zeros instead of NaN


def available(device: torch.device | str | None = None) -> bool:
    """True where the Triton kernel can run: Triton importable and a GPU with fp8 tensor cores (the same test as
    the fp8 GEMMs, :func:`engine.fast.supports_fp8`: CUDA, compute capability 8.9+)."""
    return triton is not None and supports_fp8(device)


# ----------------------------------------------------------------------------------------------
# Quantisation (tensor ops: fused by torch.compile into the producers of q, k, v)
# ----------------------------------------------------------------------------------------------


def quantize_qk(x: Tensor, extra_scale: float = 1.0, *, smooth: bool = False) -> tuple[Tensor, Tensor]:
    """Per-token, per-head int8 quantisation of x [B, L, H, D].

    Returns (x_q [B, L, H, D] int8, scale [B, H, L] float32) with x ≈ x_q * scale / extra_scale. ``extra_scale``
    is folded into the returned scale (the softmax scale 1/sqrt(D)·log2(e) for q). ``smooth`` subtracts the mean
    over the tokens first (per batch item, head and channel): for K that leaves every softmax row unchanged.
    """
    xf = x.float()
    if smooth:
        xf = xf - xf.mean(dim=1, keepdim=True)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_FLOOR)
    xq = (xf * (INT8_MAX / amax)).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    scale = (amax.squeeze(-1) * (extra_scale / INT8_MAX)).transpose(1, 2).contiguous()
    return xq, scale


def quantize_v(v: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head, per-channel fp8 quantisation of v [B, L, H, D] over all L tokens.

    Returns (v_t [B, H, D, Lp] float8_e4m3fn, transposed and zero-padded to Lp = L rounded up to 16;
    scale [B, H, D] float32) with v ≈ v_t[..., :L].transpose(-1, -2) * scale[..., None, :] (per channel).
    """
    vf = v.float()
    length = vf.shape[1]
    amax = vf.abs().amax(dim=1).clamp(min=_FLOOR)  # [B, H, D]
    vt = (vf / (amax / FP8_MAX)[:, None]).permute(0, 2, 3, 1)  # [B, H, D, L]
    vt = F.pad(vt, (0, -length % _V_PAD)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return vt.contiguous(), (amax / FP8_MAX).contiguous()


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"int8 attention needs equal [B, L, H, D] q, k, v, got {q.shape}, {k.shape}, {v.shape}")


# ----------------------------------------------------------------------------------------------
# Reference: the same quantised arithmetic in float32 on any device
# ----------------------------------------------------------------------------------------------


def int8_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, block_n: int = 128, pv_fp8: bool = True) -> Tensor:
    """What the Triton kernel computes, in float32 tensor ops (slow; for tests and CPU checks).

    Exact int8 dot products scaled per token; a streaming softmax over key blocks of ``block_n`` tokens with
    the probabilities of each block rounded to fp8 (x448) against the running row max, as the kernel does;
    exact products of the fp8 values summed in fp32 (``pv_fp8=False``: P rounded to v's dtype, v as is).
    Returns [B, L, H, D] in q's dtype.
    """
    _check(q, k, v)
    b, length, h, d = q.shape
    qq, qs = quantize_qk(q, d**-0.5 * LOG2E)
    kq, ks = quantize_qk(k, smooth=True)
    if pv_fp8:
        vt, vs = quantize_v(v)
        vf = vt.float()[..., :length].transpose(-1, -2)  # [B, H, L, D] (fp8 values, unscaled)
        p_scale, p_dtype = FP8_MAX, torch.float8_e4m3fn
    else:
        vf, vs = v.float().transpose(1, 2), torch.ones(b, h, d, device=q.device)
        p_scale, p_dtype = 1.0, v.dtype
    qf = qq.float().transpose(1, 2)  # [B, H, L, D]
    kf = kq.float().transpose(1, 2)
    m = torch.full((b, h, length, 1), -math.inf, device=q.device)
    den = torch.zeros((b, h, length, 1), device=q.device)
    acc = torch.zeros((b, h, length, d), device=q.device)
    for s in range(0, length, block_n):
        logits = (qf @ kf[:, :, s : s + block_n].transpose(-1, -2)) * qs[..., None] * ks[:, :, None, s : s + block_n]
        m_new = torch.maximum(m, logits.amax(-1, keepdim=True))
        p = torch.exp2(logits - m_new)
        alpha = torch.exp2(m - m_new)
        den = den * alpha + p.sum(-1, keepdim=True)
        p8 = (p * p_scale).to(p_dtype).float()
        acc = acc * alpha + p8 @ vf[:, :, s : s + block_n]
        m = m_new
    out = acc / (den * p_scale) * vs[:, :, None, :]
    return out.transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# The Triton kernel
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _attend_block(acc, m_i, l_i, q, qs, k_base, ks_base, v_base, start_n, length, stride_kl, stride_vx,
                      offs_n, offs_d, MASKED: tl.constexpr, PV_FP8: tl.constexpr, P_LOG2: tl.constexpr):
        """One key block: int8 logits -> online softmax update -> P·V (fp8 or 16-bit) into the fp32 accumulator."""
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None], mask=cols[None, :] < length, other=0)
            ks = tl.load(ks_base + cols, mask=cols < length, other=0.0)
        else:
            k = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None])  # [D, N] int8, D contiguous
            ks = tl.load(ks_base + cols)
        s = tl.dot(q, k).to(tl.float32) * qs[:, None] * ks[None, :]  # log2-domain logits [M, N]
        if MASKED:
            s = tl.where(cols[None, :] < length, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # P_LOG2 = log2(448) for fp8 P: exp2(s - m + log2 448) = 448·exp2(s - m) fills e4m3's range for free;
        # the row sum l carries the same factor, so it cancels in acc / l.
        p = tl.math.exp2(s - (m_new - P_LOG2)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_FP8:  # V^T [D, Lp] fp8, tokens contiguous (the K-major operand Hopper's fp8 MMA needs)
            if MASKED:
                v = tl.load(v_base + offs_d[:, None] * stride_vx + cols[None, :], mask=cols[None, :] < length,
                            other=0.0)
            else:
                v = tl.load(v_base + offs_d[:, None] * stride_vx + cols[None, :])
            pv = tl.dot(p.to(tl.float8e4nv), tl.trans(v))
        else:  # V [L, D] in its own 16-bit dtype
            if MASKED:
                v = tl.load(v_base + cols[:, None] * stride_vx + offs_d[None, :], mask=cols[:, None] < length,
                            other=0.0)
            else:
                v = tl.load(v_base + cols[:, None] * stride_vx + offs_d[None, :])
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return acc, m_new, l_i

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256}, num_warps=8, num_stages=2),
        ],
        key=["length", "HEAD_DIM", "PV_FP8"],
    )
    @triton.jit
    def _attn_fwd(Q, K, V, QS, KS, VS, O, length, H,
                  stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                  stride_vb, stride_vh, stride_vx, stride_ob, stride_ol, stride_oh,
                  HEAD_DIM: tl.constexpr, PV_FP8: tl.constexpr, P_LOG2: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < length
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                    mask=row_ok[:, None], other=0)
        qs = tl.load(QS + bh * length + offs_m, mask=row_ok, other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        ks_base = KS + bh * length
        v_base = V + b * stride_vb + h * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        full = (length // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, qs, k_base, ks_base, v_base, start_n, length,
                                          stride_kl, stride_vx, offs_n, offs_d, MASKED=False, PV_FP8=PV_FP8,
                                          P_LOG2=P_LOG2)
        if full < length:
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, qs, k_base, ks_base, v_base, full, length,
                                          stride_kl, stride_vx, offs_n, offs_d, MASKED=True, PV_FP8=PV_FP8,
                                          P_LOG2=P_LOG2)
        if PV_FP8:
            vs = tl.load(VS + bh * HEAD_DIM + offs_d)
            out = acc * (1.0 / l_i)[:, None] * vs[None, :]
        else:
            out = acc / l_i[:, None]
        tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])


@torch.library.custom_op("infinitetalkd::attention_int8", mutates_args=())
def _attend_quantized(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor,
                      pv_fp8: bool) -> Tensor:
    """The Triton kernel on pre-quantised inputs (see :func:`int8_attention`); an opaque op for torch.compile.

    q, k [B, L, H, D] int8 with scales [B, H, L]; v either [B, H, D, Lp] fp8 with v_scale [B, H, D] (pv_fp8)
    or [B, L, H, D] bf16/fp16 (v_scale unused). Returns [B, L, H, D] bf16 (fp8 V) or v's dtype.
    """
    b, length, h, d = q.shape
    out_dtype = torch.bfloat16 if pv_fp8 else v.dtype
    out = torch.empty((b, length, h, d), dtype=out_dtype, device=q.device)
    stride_vx = v.stride(2) if pv_fp8 else v.stride(1)  # fp8: between D rows of V^T; else between tokens
    stride_vh = v.stride(1) if pv_fp8 else v.stride(2)

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return (triton.cdiv(length, meta["BLOCK_M"]), b * h)

    _attn_fwd[grid](q, k, v, q_scale, k_scale, v_scale, out, length, h,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), stride_vh, stride_vx, out.stride(0), out.stride(1), out.stride(2),
                    HEAD_DIM=d, PV_FP8=pv_fp8, P_LOG2=math.log2(FP8_MAX) if pv_fp8 else 0.0)
    return out


@_attend_quantized.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor, pv_fp8: bool) -> Tensor:
    return q.new_empty(q.shape, dtype=torch.bfloat16 if pv_fp8 else v.dtype)


def int8_attention(q: Tensor, k: Tensor, v: Tensor, *, pv_fp8: bool = True) -> Tensor:
    """Softmax attention ``softmax(q kᵀ / sqrt(D)) v`` with 8-bit products; q, k, v [B, L, H, D] -> [B, L, H, D].

    Same contract as :func:`engine.attention.attention` for equal-length self-attention without a mask. Q·Kᵀ is
    always int8; ``pv_fp8`` chooses fp8 P·V (fastest) or P·V in v's 16-bit dtype (more accurate). The result
    has q's dtype. Needs :func:`available`; D must be a power of two between 16 and 256.
    """
    _check(q, k, v)
    d = q.shape[-1]
    if d & (d - 1) or not 16 <= d <= 256:
        raise ValueError(f"int8 attention needs a power-of-two head size in [16, 256], got {d}")
    if q.device.type != "cuda" or triton is None:
        raise RuntimeError("int8 attention runs only on a CUDA GPU with Triton; use engine.attention.attention")
    qq, qs = quantize_qk(q, d**-0.5 * LOG2E)
    kq, ks = quantize_qk(k, smooth=True)
    if pv_fp8:
        vt, vs = quantize_v(v)
        return _attend_quantized(qq, kq, vt, qs, ks, vs, True).to(q.dtype)
    if v.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"16-bit P·V needs bf16 or fp16 v, got {v.dtype}")
    return _attend_quantized(qq, kq, v, qs, ks, qs, False).to(q.dtype)
