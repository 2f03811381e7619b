"""Self-attention kernels at the DiT's real shapes: cuDNN / FA2-class SDPA in bf16 vs the 8-bit kernel (issue 5).

For each token count (480p: 21 x 28 x 56 = 32 928; 720p bucket 960x960: 75 600), 40 heads of 128, batch 1:

- time (``triton.testing.do_bench``, median, after warm-up/autotune) of SDPA cuDNN, SDPA flash (the FA2-class
  kernel the official code uses), ``int8_attention`` with fp8 P·V and with bf16 P·V (quantisation included),
  and the bare Triton kernel on pre-quantised inputs (to show what the quantisation costs eagerly);
- TF/s counted as 4·L²·D·H (the two products; softmax not counted);
- closeness on the first --check-heads heads against an fp32 SDPA (efficient kernel, no TF32): relative L2 and
  cosine of the output, for each variant, on inputs with unit-variance q/k/v plus a per-channel K offset
  (--k-bias) like trained checkpoints have.

    python bench/bench_attention.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import attention_int8 as a8  # noqa: E402


def sdpa(backend: SDPBackend):  # type: ignore[no-untyped-def]
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return run


def closeness(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    o, r = out.double().flatten(), ref.double().flatten()
    return {"rel_l2": round(((o - r).norm() / r.norm()).item(), 5),
            "cos": round(torch.nn.functional.cosine_similarity(o, r, dim=0).item(), 6)}


def measure(length: int, args: argparse.Namespace, report: dict[str, Any], out_dir: Path) -> None:
    import triton.testing

    dev, h, d = "cuda", args.heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(length)
    q = torch.randn(1, length, h, d, device=dev, generator=g).bfloat16()
    k = (torch.randn(1, length, h, d, device=dev, generator=g)
         + args.k_bias * torch.randn(1, 1, h, d, device=dev, generator=g)).bfloat16()
    v = torch.randn(1, length, h, d, device=dev, generator=g).bfloat16()
    qq, qs = a8.quantize_qk(q, d**-0.5 * a8.LOG2E)
    kq, ks = a8.quantize_qk(k, smooth=True)
    vt, vs = a8.quantize_v(v)
    variants = {
        "sdpa cudnn bf16": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa flash bf16 (FA2-class)": sdpa(SDPBackend.FLASH_ATTENTION),
        "int8 QK + fp8 PV": lambda q, k, v: a8.int8_attention(q, k, v, pv_fp8=True),
        "int8 QK + bf16 PV": lambda q, k, v: a8.int8_attention(q, k, v, pv_fp8=False),
        "kernel only, int8 QK + fp8 PV": lambda q, k, v: a8._attend_quantized(qq, kq, vt, qs, ks, vs, True),
        "kernel only, int8 QK + bf16 PV": lambda q, k, v: a8._attend_quantized(qq, kq, v, qs, ks, qs, False),
    }
    # fp32 truth on the first heads (efficient SDPA kernel in fp32)
    c = slice(0, args.check_heads)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        truth = F.scaled_dot_product_attention(*(t[:, :, c].float().transpose(1, 2) for t in (q, k, v)))
    truth = truth.transpose(1, 2)
    flops = 4 * length * length * d * h
    for name, fn in variants.items():
        row: dict[str, Any] = {"tokens": length, "variant": name}
        try:
            out = fn(q, k, v)
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(lambda: fn(q, k, v), warmup=200, rep=2000,  # noqa: B023
                                         return_mode="median")
            row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), x40_layers_s=round(40 * ms / 1000, 3),
                       **closeness(out[:, :, c], truth))
        except Exception as e:  # report and go on with the other variants
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
        if "int8" in name:
            best = getattr(a8._attn_fwd, "best_config", None)
            row["best_config"] = str(best) if best is not None else None
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out_dir / "bench_attention.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, action="append", default=None)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--check-heads", type=int, default=2)
    ap.add_argument("--k-bias", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_dir = Path(args.out or os.environ.get("OUT") or "bench/out")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    report: dict[str, Any] = {
        "env": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
                "triton": __import__("triton").__version__},
        "args": vars(args), "rows": [],
    }
    for length in args.tokens or [32928, 75600]:
        measure(length, args, report, out_dir)
        torch.cuda.empty_cache()
    lines = ["| tokens | variant | ms / call | TF/s | x 40 layers s | rel L2 vs fp32 | cos vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['tokens']} | {r['variant']} | {r.get('ms', '–')} | {r.get('tflops', '–')} | "
                     f"{r.get('x40_layers_s', '–')} | {r.get('rel_l2', '–')} | {r.get('cos', r.get('error', '–'))} |")
    md = "\n".join(lines)
    (out_dir / "bench_attention.md").write_text(md + "\n")
    print(json.dumps(report["env"]))
    print(md)


if __name__ == "__main__":
    main()
