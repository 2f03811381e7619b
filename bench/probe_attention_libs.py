# ruff: noqa: B023
"""Probe: attention libraries at the DiT's self-attention shapes against cuDNN bf16 SDPA: FlashAttention-3 (bf16
and fp8) and SageAttention 2 (int8 Q·Kᵀ, fp8 P·V with fp32 accumulation, Hopper kernel).

Needs FA3 importable as ``flash_attn_interface`` (bench/build_fa3.sh builds a minimal one); SageAttention is used
when ``sageattention`` imports (bench/build_sage.sh). Two parts:

1. Kernels, 40 heads x 128, batch 1, at 32 928 tokens (448x896x81) and 75 600 (960x960x81): seconds per call
   and TF/s (4·L²·D·H) for cuDNN bf16, FA3 bf16, FA3 fp8 e4m3 with per-head descales (quantisation timed too),
   SageAttention's sm90 kernel (its own per-thread int8 quantisation and K smoothing included).
   Closeness to an fp32 reference on the first --check-queries queries for three
   input distributions (unit variance; peaky logits; outlier K channels), fp8 plain and with K's token mean removed
   (softmax-invariant, SageAttention's smoothing).
2. ``--forward``: the full-size DiT (random weights unless --models), compiled, at 448x896x81: bf16 GEMMs + FA3
   bf16; fp8 GEMMs (fast accumulation) + cuDNN bf16; fp8 GEMMs + FA3 bf16; fp8 GEMMs + FA3 fp8; and with
   SageAttention: bf16 GEMMs + Sage, fp8 GEMMs + Sage; ``--only NAME`` (repeatable) picks variants; with ``--profile``
   each variant's kernel time by kind (bench.common.kernel_breakdown).

    PYTHONPATH=$FA3/hopper:$SAGE python bench/probe_attention_libs.py --out $OUT [--forward --profile]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import attention_cases, mean_call_s  # noqa: E402
from engine.attention import attention as sdpa  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quant_per_head(x: Tensor) -> tuple[Tensor, Tensor]:
    """[B, L, H, D] -> (e4m3 [B, L, H, D], descale [B, H] float32): one scale per head, abs-max to 448."""
    scale = x.float().abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale[:, None, :, None]).to(FP8), scale


def fa3(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    from flash_attn_interface import flash_attn_func  # noqa: PLC0415

    out = flash_attn_func(q, k, v, **kw)
    return out[0] if isinstance(out, tuple) else out


def fa3_fp8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Drop-in for engine.attention.attention: K's token mean removed, per-head fp8, FA3's fp8 kernel, bf16 out."""
    k = k - k.float().mean(dim=1, keepdim=True).to(k.dtype)
    (q8, sq), (k8, sk), (v8, sv) = quant_per_head(q), quant_per_head(k), quant_per_head(v)
    return fa3(q8, k8, v8, q_descale=sq, k_descale=sk, v_descale=sv).to(q.dtype)


def sage_available() -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("sageattention") is not None


def sage_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Drop-in for engine.attention.attention: SageAttention 2's Hopper kernel on [B, L, H, D] ("NHD")."""
    from sageattention import sageattn_qk_int8_pv_fp8_cuda_sm90  # noqa: PLC0415

    return sageattn_qk_int8_pv_fp8_cuda_sm90(q, k, v, tensor_layout="NHD", pv_accum_dtype="fp32+fp32")


bench = mean_call_s


def kernels(rep: dict[str, Any], lengths: list[int], nq: int) -> None:
    h, d = 40, 128
    for length in lengths:
        flops = 4 * length * length * d * h
        cases, v = attention_cases(length, h, d)
        for cname, (qf, kf) in cases.items():
            q, k = qf.bfloat16(), kf.bfloat16()
            ref = sdpa(q[:, :nq].float(), k.float(), v.float())
            row: dict[str, Any] = {"length": length, "case": cname}

            def rel(o: Tensor) -> float:
                o = o[:, :nq].float()
                return round(((o - ref).norm() / ref.norm()).item(), 5)

            def record(name: str, fn: Callable[[], Tensor], timed: bool) -> None:
                try:
                    row[f"{name}_rel"] = rel(fn())
                    if timed:
                        t = bench(fn)
                        row[f"{name}_ms"], row[f"{name}_tfs"] = round(t * 1e3, 2), round(flops / t / 1e12, 1)
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_error"] = repr(e)[:400]

            timed = cname == "unit"
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                record("cudnn_bf16", lambda: sdpa(q, k, v), timed)
            record("fa3_bf16", lambda: fa3(q, k, v), timed)
            (q8, sq), (k8, sk), (v8, sv) = quant_per_head(q), quant_per_head(k), quant_per_head(v)
            record("fa3_fp8_kernel", lambda: fa3(q8, k8, v8, q_descale=sq, k_descale=sk, v_descale=sv), timed)
            record("fa3_fp8_smooth_with_quant", lambda: fa3_fp8_attention(q, k, v), timed)
            if sage_available():
                record("sage_sm90_with_quant", lambda: sage_attention(q, k, v), timed)
            print(json.dumps(row), flush=True)
            rep["kernels"].append(row)
            torch.cuda.empty_cache()


def forward(rep: dict[str, Any], models: Path | None, profile: bool, only: list[str]) -> None:
    from bench.common import compare_forwards  # noqa: PLC0415
    from engine.attention import attention, flash3_attention  # noqa: PLC0415

    variants = [("bf16 GEMMs + FA3 bf16", False, flash3_attention),
                ("fp8 GEMMs + cuDNN bf16", True, attention),
                ("fp8 GEMMs + FA3 bf16", True, flash3_attention),
                ("fp8 GEMMs + FA3 fp8", True, fa3_fp8_attention)]
    if sage_available():
        variants.insert(1, ("bf16 GEMMs + SageAttention", False, sage_attention))
        variants.append(("fp8 GEMMs + SageAttention", True, sage_attention))
    bases = {False: "bf16 GEMMs + FA3 bf16", True: "fp8 GEMMs + cuDNN bf16"}  # bf16-exact attention, same GEMMs
    variants = [v for v in variants if not only or v[0] in only or v[0] in bases.values()]
    for row in compare_forwards(models, variants, bases, profile=profile, top=8):
        print(json.dumps(row), flush=True)
        rep["forward"].append(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--lengths", default="32928,75600")
    ap.add_argument("--check-queries", type=int, default=1024)
    ap.add_argument("--forward", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--only", action="append", default=[], help="--forward variants to run (and the two baselines)")
    args = ap.parse_args()
    import flash_attn_interface  # noqa: PLC0415, F401

    rep: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "kernels": [],
                           "forward": []}
    print(json.dumps(rep), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        kernels(rep, [int(x) for x in args.lengths.split(",") if x], args.check_queries)
    finally:
        (args.out / "probe_attention_libs.json").write_text(json.dumps(rep, indent=1))
    if args.forward:
        forward(rep, args.models, args.profile, args.only)
        (args.out / "probe_attention_libs.json").write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    sys.exit(main())
