"""The DiT forward and the per-chunk network work: which attention kernel, compile, fp8 (docs/performance.md §4-§8).

One model is built once (the released shapes with random weights, or ``--models DIR``'s DiT through the engine's
loader) and every variant runs on the same inputs, in this order:

  reference-equivalent   what the official code does per forward: eager bf16, the FA2-class flash SDPA kernel
                         first, the single-speaker reference-attention map computed in every block and dropped
  eager                  eager bf16, cuDNN first, no map (the closeness reference)
  compiled               blocks compiled, cuDNN first (the engine default on CUDA)
  compiled + FA3         where FlashAttention-3 imports (the default there)
  compiled fp8 ...       fp8 GEMMs with fast accumulation (``engine.fp8``), with and without FA3, on GPUs with fp8

Per variant: seconds per forward (median of --repeat, CUDA events), compile seconds (first call minus steady),
peak GiB, closeness to eager (and with --fp32-truth to an fp32 forward), the ratio to the reference, and for
compiled variants whether another step and another chunk recompiled. Options add:

  --vae          VAE encode (81 / 9 / 1 frames) and decode of one chunk, bf16 and fp32 (the VAE dtype decision)
  --kernels      self-attention alone: cuDNN vs FA2-class flash (vs FA3), seconds per call, TF/s, error vs fp32
  --restart-cache  compile cost at a first start and at a restart sharing Inductor's on-disk cache (two child
                 processes of this script)
  --fp8-grid     weights on the fp8-scaled file grid; fp8 variants use that payload, as on a user's fp8 file

    python -m bench.forward --out $OUT [--fp32-truth] [--bucket 448x896] [--models DIR] [--vae] [--kernels]
    python -m bench.forward --size tiny   # any machine, seconds: checks the code path, times mean nothing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import common as c
from engine import dit, fast
from engine.attention import attention, flash3_attention

PFLOP_480P = 1.825  # docs/performance.md §2, per forward at ~33k tokens
BENCH = "forward"


def flash_first() -> contextlib.AbstractContextManager[None]:
    """SDPA with the FA2-class flash kernel first, as the official code's flash-attention 2 call."""
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def with_discarded_map(masks: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Self-attention that first computes the reference-attention map and drops it (the official single speaker)."""
    lr = masks.shape[-1]

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dit.reference_attention_map(q, k[:, :lr], masks)
        return attention(q, k, v)

    return kernel


def set_kernel(model: dit.WanInfiniteTalk, kernel: Callable[..., torch.Tensor]) -> None:
    for block in model.blocks:
        block.self_attn.kernel = kernel


@dataclass
class Setup:
    args: argparse.Namespace
    size: c.Size
    device: str
    backend: str  # torch.compile backend: inductor on a GPU, aot_eager on a CPU (no C compiler needed)


def variants(fa3: bool, fp8: bool, fp8_plain: bool) -> list[tuple[str, str, bool, bool]]:
    """(name, mode, fp8 GEMMs, FA3) in run order; mode is reference / eager / compiled."""
    rows = [("reference-equivalent: eager bf16, FA2-class flash, single-speaker map", "reference", False, False),
            ("eager bf16, cuDNN first", "eager", False, False),
            ("compiled bf16", "compiled", False, False)]
    if fa3:
        rows.append(("compiled bf16 + FA3", "compiled", False, True))
    if fp8:
        if fp8_plain:
            rows.append(("compiled fp8", "compiled", True, False))
        rows.append(("compiled fp8, fast accumulation", "compiled", True, False))
        if fa3:
            rows.append(("compiled fp8, fast accumulation + FA3", "compiled", True, True))
    return rows


def run_forward(s: Setup, report: c.Report) -> None:
    args, size, device = s.args, s.size, s.device
    h, w = c.parse_bucket(args.bucket) if args.bucket else (size.height, size.width)
    frames = args.frames or size.frames
    torch.set_float32_matmul_precision("highest")
    model = c.bench_dit(args.models, device, torch.bfloat16, size.dit)
    cfg = model.cfg
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if args.fp8_grid:
        stored = (c.folder_fp8_payload(args.models, cfg.num_layers, fast.FP8_TARGETS, device) if args.models
                  else c.round_to_file_fp8(model, fast.FP8_TARGETS))
    kw = c.dit_inputs(cfg, h, w, frames, device, torch.bfloat16, seed=0)
    kw_next = c.dit_inputs(cfg, h, w, frames, device, torch.bfloat16, seed=1, t=500.0)  # another step and chunk
    lh, lw = h // 16, w // 16
    masks = torch.zeros(1, 3, lh * lw, device=device)
    masks[:, 0] = 1.0  # one speaker covering the frame, as the official single-speaker masks
    truth: dict[str, torch.Tensor] = {}
    common = dict(bucket=f"{h}x{w}", frames=frames, tokens=c.tokens(h, w, frames))
    fa3_ok = device.startswith("cuda") and _fa3(device)
    plan = variants(fa3_ok, fast.supports_fp8(device), args.fp8_plain)
    for name, mode, gemm_fp8, fa3 in plan:
        if _skipped(name, args):
            continue
        with c.case(report, BENCH, name, "s/forward") as row, torch.no_grad():
            row.metrics.update(common)
            if gemm_fp8 and not any(isinstance(m, fast.Fp8Linear) for m in model.modules()):
                fast.enable_fp8(model, weights_fp8=stored)
            for m in model.modules():
                if isinstance(m, fast.Fp8Linear):
                    m.fast_accum = "fast accumulation" in name
            set_kernel(model, with_discarded_map(masks) if mode == "reference" else
                       flash3_attention if fa3 else attention)
            out = _measure(model, kw, kw_next, mode, row, s)
            if mode == "eager":
                truth["eager"] = out.float().clone()
                if args.fp32_truth:
                    truth["fp32"] = c.fp32_forward(model, kw)
            for ref in ("eager", "fp32"):
                if ref in truth and not (ref == "eager" and mode == "eager"):
                    cl = c.closeness(out.float(), truth[ref])
                    row.metrics[f"rel_l2_vs_{ref}"] = round(cl["rel_l2"], 5)
                    row.metrics[f"cos_vs_{ref}"] = round(cl["cos"], 6)
    torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the next part of a suite
    ref_rows = [r for r in report.rows if r.case.startswith("reference-equivalent") and r.seconds]
    for r in report.rows:
        if ref_rows and r.seconds and r.bench == BENCH:
            r.metrics["x_vs_reference"] = round(ref_rows[0].seconds / r.seconds, 2)  # type: ignore[operator]
    del model
    c.alloc_gib()


def _fa3(device: str) -> bool:
    from engine.attention import flash3_available

    return flash3_available(device)


def _skipped(name: str, args: argparse.Namespace) -> bool:
    if args.only and not any(name.startswith(o) for o in args.only):
        return True
    return any(name.startswith(sk) for sk in args.skip)


def _measure(model: dit.WanInfiniteTalk, kw: dict[str, Any], kw_next: dict[str, Any], mode: str, row: c.Row,
             s: Setup) -> torch.Tensor:
    """Time one variant; compiled ones also report compile seconds and recompiles on another step and chunk."""
    from torch._dynamo.utils import counters

    ctx = flash_first() if mode == "reference" else fast.preferred_attention()
    with ctx:
        if mode == "compiled":
            torch._dynamo.reset()
            counters.clear()
            fast.compile_blocks(model, backend=s.backend)
            first, _ = c.wall_once(lambda: c.dit_forward(model, kw))
        else:
            c.dit_forward(model, kw)  # warm-up: kernel selection
        c.reset_peak()
        sec, out = c.timed(lambda: c.dit_forward(model, kw), s.args.repeat)
        row.seconds, row.peak_gib = round(sec, 3), c.peak_gib()
        if mode == "compiled":
            row.metrics["compile_s"] = round(first - sec, 1)
            frames_ok = int(counters["frames"]["ok"])
            with torch._dynamo.config.patch(error_on_recompile=True):
                c.dit_forward(model, kw_next)
            row.metrics["recompiles"] = int(counters["frames"]["ok"]) - frames_ok
    row.metrics["finite"] = bool(torch.isfinite(out).all())
    return out


def run_vae(s: Setup, report: c.Report) -> None:
    """The VAE's per-chunk work: the conditioning clip and motion frames encoded, one chunk's latents decoded."""
    size, device = s.size, s.device
    h, w = c.parse_bucket(s.args.bucket) if s.args.bucket else (size.height, size.width)
    frames = s.args.frames or size.frames
    dtypes = [torch.bfloat16, torch.float32] if s.args.vae_dtype == "both" else [
        {"bf16": torch.bfloat16, "fp32": torch.float32}[s.args.vae_dtype]]
    for dtype in dtypes:
        model = c.random_vae(size.vae, device, dtype)
        clip = torch.rand(1, 3, frames, h, w, device=device, dtype=dtype) * 2 - 1
        z = torch.randn(1, size.vae.z_dim, (frames - 1) // 4 + 1, h // 8, w // 8, device=device, dtype=dtype)
        label = str(dtype).removeprefix("torch.")
        # The render's VAE calls per chunk: the conditioning clip, the 9 motion frames, the first frame, the decode.
        ops: list[tuple[str, Callable[[], object]]] = [
            (f"encode {n} frame{'s' * (n > 1)}", lambda n=n, m=model, x=clip: m.encode(x[:, :, :n]))
            for n in sorted({frames, 9, 1}, reverse=True) if n <= frames
        ]
        ops.append((f"decode {z.shape[2]} latents (decode_iter)",
                    lambda m=model, z=z: [None for _ in m.decode_iter(z)]))
        for name, fn in ops:
            with c.case(report, "vae", f"{label} {name}", "s/call") as row, torch.no_grad():
                c.reset_peak()
                sec, _ = c.timed(fn, s.args.repeat, warmup=1)
                row.seconds, row.peak_gib = round(sec, 3), c.peak_gib()
                row.metrics.update(bucket=f"{h}x{w}", dtype=label)
        del model
        c.alloc_gib()


def run_kernels(s: Setup, report: c.Report) -> None:
    """Self-attention alone at the DiT's head layout: seconds per call, TF/s and error against fp32 math."""
    cfg, device = s.size.dit, s.device
    heads, hd = cfg.num_heads, cfg.dim // cfg.num_heads
    h, w = c.parse_bucket(s.args.bucket) if s.args.bucket else (s.size.height, s.size.width)
    length = c.tokens(h, w, s.args.frames or s.size.frames)
    cases, v = c.attention_cases(length, heads, hd, device)
    q, k = (t.bfloat16() for t in cases["unit"])
    kernels: list[tuple[str, Callable[[], torch.Tensor]]] = [("SDPA flash (FA2-class)", lambda: _sdpa(
        SDPBackend.FLASH_ATTENTION, q, k, v))]
    if device.startswith("cuda"):
        kernels.insert(0, ("SDPA cuDNN", lambda: _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v)))
        if _fa3(device):
            kernels.append(("FlashAttention-3 bf16", lambda: flash3_attention(q, k, v)))
    n = min(2, heads)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = attention(q[:, :, :n].double(), k[:, :, :n].double(), v[:, :, :n].double())
    for name, fn in kernels:
        with c.case(report, "attention", f"{name}, {length} tokens", "s/call") as row, torch.no_grad():
            sec = c.mean_call_s(fn, iters=s.args.repeat * 3)
            out = fn()
            cl = c.closeness(out[:, :, :n], ref)
            row.seconds = round(sec, 5)
            row.metrics.update(tf_s=round(4 * length**2 * hd * heads / sec / 1e12, 1),
                               rel_l2_vs_fp64=round(cl["rel_l2"], 5), x40_layers_s=round(40 * sec, 3))


def _sdpa(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return attention(q, k, v)


def run_restart_cache(s: Setup, report: c.Report) -> None:
    """Compile seconds of a first start and of a restart: two child processes share a fresh Inductor cache."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache, tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for run in ("first start (empty cache)", "restart (cache from the first start)"):
            with c.case(report, "compile-cache", run, "s compile") as row:
                cmd = [sys.executable, "-m", "bench.forward", "--size", s.size.name, "--only", "compiled bf16",
                       "--skip", "compiled bf16 +", "--repeat", "1", "--out", out]
                if s.args.bucket:
                    cmd += ["--bucket", s.args.bucket]
                subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
                child = c.load_report(Path(out) / f"{BENCH}.json").rows[0]
                if child.error:
                    raise RuntimeError(child.error)
                row.seconds = child.metrics["compile_s"]
                row.metrics.update(steady_s_per_forward=child.seconds, bucket=child.metrics["bucket"])


def suite(size: c.Size, device: str, report: c.Report, *, repeat: int = 2) -> None:
    """What ``make bench`` runs from this entry point: every forward variant and the VAE."""
    s = Setup(parse_args(["--repeat", str(repeat)]), size, device, _backend(device))
    run_forward(s, report)
    run_vae(s, report)


def _backend(device: str) -> str:
    return "inductor" if device.startswith("cuda") else "aot_eager"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.forward", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="auto", choices=["auto", "full", "tiny"],
                    help="auto: full size on a GPU with enough memory, else tiny")
    ap.add_argument("--bucket", default=None, help="HxW (default: the size's, 448x896 at full size)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", type=Path, default=None, help="a ComfyUI models folder (default: random weights)")
    ap.add_argument("--fp32-truth", action="store_true", help="also compare every output with an fp32 forward")
    ap.add_argument("--fp8-grid", action="store_true", help="weights on the fp8-scaled file grid; fp8 uses them")
    ap.add_argument("--fp8-plain", action="store_true", help="also fp8 without fast accumulation")
    ap.add_argument("--only", action="append", default=[], help="run only variants starting with this")
    ap.add_argument("--skip", action="append", default=[], help="skip variants starting with this")
    ap.add_argument("--no-forward", action="store_true", help="only the parts asked for below")
    ap.add_argument("--vae", action="store_true", help="also the VAE's per-chunk work")
    ap.add_argument("--vae-dtype", choices=["bf16", "fp32", "both"], default="both")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="set torch.backends.cudnn.benchmark (cuDNN times its conv algorithms per shape; the engine "
                         "does not set it): compare the VAE rows both ways, and their peak memory")
    ap.add_argument("--kernels", action="store_true", help="also self-attention kernels alone")
    ap.add_argument("--restart-cache", action="store_true", help="also compile cost at a restart")
    ap.add_argument("--out", default=None, help="folder for forward.json (default $OUT, else .bench/out)")
    return ap.parse_args(argv)


@contextlib.contextmanager
def _report(device: str, out: str | None) -> Iterator[c.Report]:
    report = c.Report(BENCH, c.command_line(), c.environment(device))
    try:
        yield report
    finally:
        c.finish(report, out, f"; ideal at the bf16 / fp8 dense peak of an H100 SXM: {PFLOP_480P * 1000 / 989:.2f} / "
                 f"{PFLOP_480P * 1000 / 1979:.2f} s per full-size forward")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = c.default_device()
    s = Setup(args, c.pick_size(args.size, device), device, _backend(device))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    with _report(device, args.out) as report:
        report.env.update(size=s.size.name, cudnn_benchmark=args.cudnn_benchmark)
        if not args.no_forward:
            run_forward(s, report)
        if args.vae:
            run_vae(s, report)
        if args.kernels:
            run_kernels(s, report)
        if args.restart_cache:
            run_restart_cache(s, report)
    print(json.dumps({"failed": sum(1 for r in report.rows if r.error)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
