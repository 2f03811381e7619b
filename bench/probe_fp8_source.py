"""Where the fp8 path's weights come from: the file's own fp8 payload, or a re-quantisation (runs on a CPU).

The users' DiT file (kijai's ``Wan2_1-I2V-14B-480p_fp8_e4m3fn_scaled_KJ``) stores every block Linear as e4m3
with one scale per tensor. The bf16 engine computes with those weights dequantised; ``engine.fp8`` used to
quantise the dequantised weights again, per output channel, which rounds values that were already on an fp8
grid onto another one. Since session 3 the loader hands the file's bytes and scale to the fp8 GEMM when no LoRA
was merged (engine/models_dir.py ``_to_fp8``). This measures, against the file's weights in float64:

1. one Linear at the DiT's width (5120 -> 5120; --width), weights N(0, 1/fan_in) written the way
   ``engine.weights.write_scaled_fp8`` writes them, activations N(0, 1) (--outliers: 8 weight columns x8):
   relative L2 error of the output for the bf16 GEMM, fp8 re-quantised per channel, fp8 from the file;
2. the tiny DiT of the test suite (2 blocks, dim 256) from a folder written by ``engine.tiny``, the targets the
   base file holds: the whole forward against its float32 forward.

    python -m bench.probe_fp8_source [--width 5120] [--rows 1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import fast  # noqa: E402

F8 = torch.float8_e4m3fn


def rel(y: torch.Tensor, truth: torch.Tensor) -> float:
    return round(((y.double() - truth).norm() / truth.norm()).item(), 5)


def one_linear(width: int, rows: int, outliers: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(width, width, generator=g) / width**0.5
    if outliers:
        w[:, :8] *= 8
    x = torch.randn(rows, width, generator=g).bfloat16()
    scale = w.abs().max() / fast.FP8_MAX  # per tensor, as write_scaled_fp8 (and the KJ files) store it
    q = (w / scale).to(F8)
    truth = x.double() @ (q.double() * scale.double()).T
    w_bf16 = (q.float() * scale).bfloat16()  # what the bf16 engine loads
    rq, rs = fast.quantize_weight(w_bf16)
    out = {
        "width": width, "rows": rows, "weight_outliers": outliers,
        "bf16 GEMM (dequantised file)": rel((x @ w_bf16.T).float(), truth),
        "fp8, re-quantised per channel": rel(fast.Fp8Linear(rq, rs, None, fast_accum=True)(x).float(), truth),
        "fp8, the file's weights": rel(fast.Fp8Linear(q, scale.reshape(1), None, fast_accum=True)(x).float(), truth),
        "weight re-quantisation error": rel(rq.double() * rs.double()[:, None], q.double() * scale.double()),
    }
    return out


def tiny_forward() -> dict[str, Any]:
    from engine import models_dir as md
    from engine import weights as wt
    from engine.tiny import write_tiny_models
    from tests.conftest import dit_inputs

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        write_tiny_models(folder, seed=0)
        base = wt.read_header(folder / "diffusion_models" / md.ROLE_BY_NAME["dit"].default)
        patch = wt.read_header(folder / "model_patches" / md.ROLE_BY_NAME["patch_single"].default)
        args: dict[str, Any] = dict(device=torch.device("cpu"), dtype=torch.float32)
        targets = fast.fp8_targets(adapter_swap=True)
        ref, _ = md.load_dit(base, patch, **args)
        exact, _ = md.load_dit(base, patch, fp8_targets=targets, **args)
        requant, _ = md.load_dit(base, patch, **args)
        fast.enable_fp8(requant, targets=targets, fast_accum=True)
        kw = dit_inputs(ref.cfg)
        with torch.inference_mode():
            want = ref(**kw).double()
            return {"layers": len(targets) * len(ref.blocks),
                    "fp8, re-quantised per channel": rel(requant(**kw), want),
                    "fp8, the file's weights": rel(exact(**kw), want)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=5120)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    report: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                              "linear": [one_linear(args.width, args.rows, o) for o in (False, True)],
                              "tiny_dit_forward": tiny_forward()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_fp8_source.json").write_text(text)


if __name__ == "__main__":
    main()
