# ruff: noqa: B023
"""Probe: cuDNN's fp8 flash attention (through the cudnn frontend's graph API) at the DiT's shapes.

Times it against torch's cuDNN bf16 SDPA and measures closeness to an fp32 reference on a slice of queries,
for several input distributions (unit variance; peaky logits; outlier K channels) and with/without the
Hadamard rotation of Q and K and the K-mean subtraction (both leave the softmax unchanged in exact arithmetic).

Then (``--forward``) the full-size DiT at 448x896x81, random weights, compiled with fp8 GEMMs + fast accumulation,
once with cuDNN bf16 SDPA (the engine's fp8 option today) and once with this fp8 attention swapped in through
``SelfAttention.kernel`` (an opaque custom op for torch.compile; the per-tensor quantisation is left to Inductor),
timed on the same inputs, with the closeness of the two outputs.

Run 2026-11-25 (session 4, bench/RESULTS.md): with cuDNN 9.19 on an H100 only the fp8-*output* graph builds
(813-830 TF/s, 8-21 % error per call), so the ``--forward`` part fails on Hopper. Needs the
``nvidia-cudnn-frontend`` wheel (1.14.0 worked; carried) on the GPU machine:

    python bench/probe_cudnn_fp8.py --out $OUT [--forward [--models DIR]]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import attention_cases, mean_call_s  # noqa: E402

FP8_MAX = 448.0


def hadamard(d: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    return (h * signs[None, :]) / d**0.5


class CudnnFp8:
    """One built cuDNN graph for (B, H, S, D) in BSHD memory layout; O in bf16 or fp8."""

    def __init__(self, cudnn: Any, b: int, s: int, h: int, d: int, out_fp8: bool) -> None:
        self.cudnn, self.out_fp8 = cudnn, out_fp8
        dims = [b, h, s, d]
        strides = [s * h * d, d, h * d, 1]
        dt = cudnn.data_type
        self.handle = cudnn.create_handle()
        g = cudnn.pygraph(io_data_type=dt.BFLOAT16, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                          handle=self.handle)
        self.q = g.tensor(name="Q", dim=dims, stride=strides, data_type=dt.FP8_E4M3)
        self.k = g.tensor(name="K", dim=dims, stride=strides, data_type=dt.FP8_E4M3)
        self.v = g.tensor(name="V", dim=dims, stride=strides, data_type=dt.FP8_E4M3)
        scal = {n: g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
                for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        self.scal = scal
        kwargs: dict[str, Any] = dict(q=self.q, k=self.k, v=self.v, attn_scale=d**-0.5, use_causal_mask=False,
                                      **scal)
        try:
            res = g.sdpa_fp8(is_inference=True, **kwargs)
        except TypeError:
            res = g.sdpa_fp8(generate_stats=False, **kwargs)
        o, _stats, amax_s, amax_o = res
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(dt.FP8_E4M3 if out_fp8 else dt.BFLOAT16)
        amax_s.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        amax_o.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        self.o, self.amax_s, self.amax_o = o, amax_s, amax_o
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.g = g
        self.ws = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)
        self.shape = (b, s, h, d)
        self.amax_buf = torch.empty(2, device="cuda", dtype=torch.float32)

    def __call__(self, qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor,
                 sq: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.shape, device="cuda", dtype=torch.float8_e4m3fn if self.out_fp8 else torch.bfloat16)
        one = torch.ones(1, device="cuda")
        s_o = torch.full((1,), 1.0, device="cuda")
        self._keep = (one, s_o)  # alive until the (asynchronous) kernel has read them
        pack = {self.q: qf, self.k: kf, self.v: vf, self.scal["descale_q"]: sq, self.scal["descale_k"]: sk,
                self.scal["descale_v"]: sv, self.scal["descale_s"]: one / FP8_MAX,
                self.scal["scale_s"]: one * FP8_MAX, self.scal["scale_o"]: s_o,
                self.o: out, self.amax_s: self.amax_buf[0:1], self.amax_o: self.amax_buf[1:2]}
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        # raw device pointers (the binding accepts ints): no dtype negotiation for the fp8 tensors
        self.g.execute({k: v.data_ptr() for k, v in pack.items()}, self.ws.data_ptr(), handle=self.handle)
        return out


def quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax().float().clamp_min(1e-12)
    scale = FP8_MAX / amax
    return (x.float() * scale).to(torch.float8_e4m3fn), (1.0 / scale).reshape(1)


_GRAPHS: dict[tuple[int, ...], CudnnFp8] = {}  # one built graph per shape (this probe only)


@torch.library.custom_op("probe::cudnn_fp8_attention", mutates_args=())
def _fp8_attend(q8: Tensor, k8: Tensor, v8: Tensor, sq: Tensor, sk: Tensor, sv: Tensor) -> Tensor:
    """cuDNN fp8 attention on pre-quantised [B, L, H, D] e4m3 tensors with their descales -> bf16 [B, L, H, D]."""
    import cudnn  # noqa: PLC0415

    key = tuple(q8.shape)
    if key not in _GRAPHS:
        _GRAPHS[key] = CudnnFp8(cudnn, *key, out_fp8=False)
    return _GRAPHS[key](q8.contiguous(), k8.contiguous(), v8.contiguous(), sq, sk, sv)


@_fp8_attend.register_fake
def _(q8: Tensor, k8: Tensor, v8: Tensor, sq: Tensor, sk: Tensor, sv: Tensor) -> Tensor:
    return torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)


def fp8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Drop-in for ``engine.attention.attention``: K mean over tokens removed (softmax-invariant), per-tensor fp8."""
    k = k - k.float().mean(dim=1, keepdim=True).to(k.dtype)
    (q8, sq), (k8, sk), (v8, sv) = quant(q), quant(k), quant(v)
    return _fp8_attend(q8, k8, v8, sq, sk, sv).to(q.dtype)


def forward_probe(rep: dict[str, Any], models: Path | None, profile: bool) -> None:
    """Full-size DiT compiled, cuDNN bf16 SDPA vs cuDNN fp8 attention, with bf16 GEMMs and with fp8 GEMMs (fast
    accumulation); ``profile``: each variant's kernel time by kind (bench.common.kernel_breakdown)."""
    from bench.common import compare_forwards  # noqa: PLC0415
    from engine.attention import attention  # noqa: PLC0415

    variants = [("bf16 GEMMs + cuDNN fp8 attention", False, fp8_attention),
                ("fp8 GEMMs + cuDNN bf16 SDPA", True, attention),
                ("fp8 GEMMs + cuDNN fp8 attention", True, fp8_attention)]
    for row in compare_forwards(models, variants, {True: "fp8 GEMMs + cuDNN bf16 SDPA"}, profile=profile, top=12):
        print(json.dumps(row), flush=True)
        rep.setdefault("forward", []).append(row)


bench = mean_call_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--lengths", default="32928,75600")
    ap.add_argument("--check-queries", type=int, default=1024)
    ap.add_argument("--forward", action="store_true", help="also time the full DiT forward with it (compiled, fp8)")
    ap.add_argument("--models", type=Path, default=None, help="--forward on a real ComfyUI models folder's DiT")
    ap.add_argument("--profile", action="store_true", help="--forward: each variant's kernel time by kind")
    args = ap.parse_args()
    import cudnn  # noqa: PLC0415

    rep: dict[str, Any] = {"torch": torch.__version__, "cudnn_backend": torch.backends.cudnn.version(),
                           "frontend": getattr(cudnn, "__version__", "?"), "gpu": torch.cuda.get_device_name(),
                           "runs": []}
    print(json.dumps(rep), flush=True)
    h, d = 40, 128
    rot = hadamard(d, "cuda")
    for length in [int(x) for x in args.lengths.split(",")]:
        flops = 4 * length * length * d * h
        cases, v = attention_cases(length, h, d)

        def torch_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)

        graphs: dict[str, Any] = {}
        for out_fp8 in (False, True):
            try:
                graphs["fp8_o8" if out_fp8 else "fp8_obf16"] = CudnnFp8(cudnn, 1, length, h, d, out_fp8)
            except Exception as e:  # noqa: BLE001
                print(f"build out_fp8={out_fp8} failed: {e!r}", flush=True)
                traceback.print_exc()
        for cname, (qf32, kf32) in cases.items():
            q, k = qf32.bfloat16(), kf32.bfloat16()
            nq = args.check_queries
            ref = F.scaled_dot_product_attention(q[:, :nq].float().transpose(1, 2), k.float().transpose(1, 2),
                                                 v.float().transpose(1, 2)).transpose(1, 2)
            row: dict[str, Any] = {"length": length, "case": cname}
            # attention entropy indicator: mean max probability of the first 256 queries, head 0
            p = torch.softmax((q[0, :256, 0].float() @ k[0, :, 0].float().T) * d**-0.5, -1)
            row["mean_max_p"] = round(p.max(-1).values.mean().item(), 4)

            def rel(o: torch.Tensor) -> float:
                o = o[:, :nq].float()
                return round(((o - ref).norm() / ref.norm()).item(), 5)

            o_bf = torch_cudnn(q, k, v)
            row["cudnn_bf16_rel"] = rel(o_bf)
            if cname == "unit":
                t = bench(lambda: torch_cudnn(q, k, v))
                row["cudnn_bf16_s"], row["cudnn_bf16_tfs"] = round(t, 5), round(flops / t / 1e12, 1)
            for gname, graph in graphs.items():
                for variant in ("plain", "smooth", "hadamard+smooth"):
                    qv, kv = q, k
                    if "smooth" in variant:
                        kv = kv - kv.float().mean(dim=1, keepdim=True).bfloat16()
                    if "hadamard" in variant:
                        qv, kv = (qv @ rot.bfloat16()), (kv @ rot.bfloat16())
                    try:
                        (q8, sq), (k8, sk), (v8, sv) = quant(qv), quant(kv), quant(v)
                        o = graph(q8, k8, v8, sq, sk, sv)
                        row[f"{gname}_{variant}_rel"] = rel(o.float() if gname == "fp8_obf16" else o.float())
                        if cname == "unit" and variant == "plain":
                            t = bench(lambda: graph(q8, k8, v8, sq, sk, sv))
                            row[f"{gname}_s"], row[f"{gname}_tfs"] = round(t, 5), round(flops / t / 1e12, 1)
                            t = bench(lambda: (quant(q), quant(k), quant(v)))
                            row["quant_qkv_s"] = round(t, 5)
                    except Exception as e:  # noqa: BLE001
                        row[f"{gname}_{variant}_error"] = repr(e)[:300]
            print(json.dumps(row), flush=True)
            rep["runs"].append(row)
            ref = None  # free
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_cudnn_fp8.json").write_text(json.dumps(rep, indent=1))
    if args.forward:
        del graphs
        torch.cuda.empty_cache()
        forward_probe(rep, args.models, args.profile)
        (args.out / "probe_cudnn_fp8.json").write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    sys.exit(main())
