"""What every benchmark in bench/ shares: timing, memory, closeness, inputs, models, environment, and the one
result format. Imports only torch and engine/; no other bench module (the entry points import this, never the
reverse). Everything here also runs on a CPU, so tests/test_bench_common.py checks it without a GPU.

Result format (:class:`Report`, schema :data:`SCHEMA`): one JSON document per run of an entry point, written as
``<out>/<bench>.json``: the command, the UTC date, the environment, and rows. A :class:`Row` is one measured case:
a headline time (``seconds`` in ``unit``), the peak GPU memory, any further figures in ``metrics``, or ``error``.
:func:`format_table` prints rows of any entry point as one Markdown table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import dit, vae

SCHEMA = "infinitetalkd-bench/1"
GIB = 2**30

# ---------------------------------------------------------------------------------------------------------------
# Sizes: "full" = the released networks at the 448x896 bucket, 81 frames; "tiny" = the tests' networks at a size
# a CPU runs in seconds (it exercises the code path, its times mean nothing).


@dataclass(frozen=True)
class Size:
    name: str
    dit: dit.DiTConfig
    vae: vae.VAEConfig
    height: int
    width: int
    frames: int

    @property
    def tokens(self) -> int:
        return tokens(self.height, self.width, self.frames)


FULL = Size("full", dit.RELEASED, vae.RELEASED, 448, 896, 81)
TINY = Size("tiny", dit.TINY, vae.TINY, 32, 64, 9)

# The resident full-size DiT needs ~39 GiB plus activations; below this a GPU runs the tiny sizes.
FULL_SIZE_MIN_GIB = 48.0


def pick_size(name: str, device: str) -> Size:
    """``full`` / ``tiny``, or ``auto``: full on a CUDA device with at least :data:`FULL_SIZE_MIN_GIB`, else tiny."""
    if name == "full":
        return FULL
    if name == "tiny":
        return TINY
    if name != "auto":
        raise ValueError(f"size must be auto, full or tiny (got {name!r})")
    if device.startswith("cuda") and torch.cuda.get_device_properties(0).total_memory / GIB >= FULL_SIZE_MIN_GIB:
        return FULL
    return TINY


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_bucket(text: str) -> tuple[int, int]:
    """``"448x896"`` -> (448, 896): height x width, as the engine names buckets."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bucket must be HxW, e.g. 448x896 (got {text!r})") from None
    return h, w


def tokens(height: int, width: int, frames: int) -> int:
    """DiT tokens of one chunk: latent frames x (H/16) x (W/16) (docs/model.md §2)."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


# ---------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: str | None = None) -> None:
    if (device is None or str(device).startswith("cuda")) and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int, *, warmup: int = 0) -> tuple[float, Any]:
    """Median seconds of ``repeat`` calls after ``warmup`` untimed ones, and the last result. On a GPU each call
    is timed with CUDA events (device time between two points of the stream, not host time); on a CPU with
    ``perf_counter``."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, repeat)):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def wall_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call between two synchronisations (a first call: compile, kernel selection)."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def mean_call_s(fn: Callable[[], object], iters: int = 10) -> float:
    """Seconds per call of a short function: 2 warm-up calls, then the mean of ``iters`` between synchronisations
    (for kernels too short to time one at a time)."""
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


# ---------------------------------------------------------------------------------------------------------------
# Memory


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """Peak GPU memory allocated since :func:`reset_peak`, GiB; None on a CPU."""
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else None


def alloc_gib() -> float | None:
    """GPU memory allocated now (after a collection), GiB; None on a CPU."""
    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated() / GIB, 2)


def set_memory_cap(cap_gib: float | None) -> None:
    """Cap torch's caching allocator at ``cap_gib`` (a 24 / 16 GB card's memory) or lift the cap (None); a no-op
    on a CPU. The CUDA context and other processes are outside the cap."""
    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_gib is None else min(1.0, cap_gib * GIB / total))


# ---------------------------------------------------------------------------------------------------------------
# Closeness


def closeness(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 ``||out - ref|| / ||ref||`` and cosine similarity, in float64."""
    a, b = out.double().flatten(), ref.double().flatten()
    return {
        "rel_l2": float((a - b).norm() / b.norm()),
        "cos": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
    }


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def dit_inputs(cfg: dit.DiTConfig, h: int, w: int, frames: int, device: str, dtype: torch.dtype, *,
               seed: int = 0, t: float = 900.0) -> dict[str, torch.Tensor]:
    """One speaker, 120 text tokens (the DiT pads to 512), 257 CLIP tokens: the inputs of one denoising pass."""
    g = torch.Generator(device=device).manual_seed(seed)
    f, lh, lw = (frames - 1) // 4 + 1, h // 8, w // 8

    def rnd(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=g).to(dt)

    return dict(
        x=rnd(1, cfg.out_dim, f, lh, lw, dt=torch.float32),
        t=torch.tensor([t], device=device),
        context=rnd(1, 120, cfg.text_dim),
        clip_fea=rnd(1, 257, cfg.clip_dim),
        y=rnd(1, cfg.in_dim - cfg.out_dim, f, lh, lw),
        audio=rnd(1, 1, frames, cfg.audio_window, cfg.audio_feature_dim),
    )


def dit_forward(model: dit.WanInfiniteTalk, kw: dict[str, Any]) -> torch.Tensor:
    """One DiT pass on :func:`dit_inputs`' raw inputs, embedding included. The one place bench/ calls the network:
    engine/dit.py takes the text/image/audio conditioning either as keyword tensors or, in its newer form, as a
    conditioning object built by ``model.condition(context, clip_fea, audio)``; both are served here."""
    if hasattr(model, "condition"):
        cond = model.condition(kw["context"], kw["clip_fea"], kw["audio"])
        return model(kw["x"], kw["t"], kw["y"], cond, kw.get("ref_target_masks"))
    return model(**kw)


def attention_cases(length: int, heads: int = 40, head_dim: int = 128, device: str = "cuda",
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Self-attention inputs [1, length, heads, head_dim] for kernel probes: (q, k) in fp32 for three
    distributions — "unit" (unit variance: near-uniform softmax), "peaky" (larger logits plus a per-channel K
    offset), "outliers" (4 K channels 12x larger, the mirror channels of Q, plus a larger offset) — and one bf16 V."""
    g = torch.Generator(device=device).manual_seed(length)
    shape = (1, length, heads, head_dim)
    q = torch.randn(*shape, device=device, generator=g)
    k = torch.randn(*shape, device=device, generator=g)
    v = torch.randn(*shape, device=device, generator=g).bfloat16()
    chan_bias = torch.randn(1, 1, heads, head_dim, device=device, generator=g)
    outl = torch.ones(1, 1, heads, head_dim, device=device)
    outl[..., :4] = 12.0
    return {"unit": (q, k), "peaky": (q * 1.8, k * 1.8 + 2 * chan_bias),
            "outliers": (q * outl.flip(-1) * 0.7, k * outl * 0.7 + 3 * chan_bias)}, v


# ---------------------------------------------------------------------------------------------------------------
# Models: random weights built straight on the device, or a real ComfyUI models folder through the engine's loader


def random_dit(cfg: dit.DiTConfig, device: str, dtype: torch.dtype) -> dit.WanInfiniteTalk:
    """Built on meta, materialised once on ``device`` in ``dtype`` (no fp32 copy, no host copy), then filled:
    matrices ~ N(0, 1/fan_in), norm weights 1, other vectors N(0, 0.02). Weight values do not change kernel speed."""
    model = dit.build(cfg, "meta").to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5, generator=gen)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def random_vae(cfg: vae.VAEConfig, device: str, dtype: torch.dtype) -> vae.WanVAE:
    """The VAE with random weights: RMS-norm gains 1, matrices ~ N(0, 1/fan_in), biases 0."""
    model = vae.build(cfg, "meta").to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim > 1:
                p.normal_(0.0, 1.0 / max(1, p[0].numel()) ** 0.5, generator=gen)
            else:
                p.zero_()
    return model.eval().requires_grad_(False)


def folder_dit(models_dir: Path, device: str, dtype: torch.dtype, *, speakers: int = 1) -> dit.WanInfiniteTalk:
    """The DiT + InfiniteTalk patch (single- or multi-speaker) of a ComfyUI models folder, loaded the way the
    engine loads it (engine.models_dir.load_dit: fp8-scaled files dequantised, strict key check), no LoRA.

    Raises FileNotFoundError naming the role when the folder lacks the DiT or the patch."""
    from engine import weights as wt
    from engine.models_dir import load_dit, locate

    found = locate(models_dir)
    patch_role = "patch_single" if speakers == 1 else "patch_multi"
    for role in ("dit", patch_role):
        if found[role] is None:
            raise FileNotFoundError(f"{models_dir}: no {role} file (run 'infinitetalkd doctor --models-dir "
                                    f"{models_dir}' to see what is expected where)")
    base, patch = wt.read_header(found["dit"]), wt.read_header(found[patch_role])  # type: ignore[arg-type]
    model, _ = load_dit(base, patch, device=torch.device(device), dtype=dtype)
    assert isinstance(model, dit.WanInfiniteTalk)
    return model.eval().requires_grad_(False)


def bench_dit(models_dir: Path | None, device: str, dtype: torch.dtype,
              cfg: dit.DiTConfig = dit.RELEASED) -> dit.WanInfiniteTalk:
    """Real weights from ``models_dir`` when given, else ``cfg``'s shapes with random weights."""
    if models_dir is not None:
        return folder_dit(models_dir, device, dtype)
    return random_dit(cfg, device, dtype)


def round_to_file_fp8(model: dit.WanInfiniteTalk, targets: tuple[str, ...]) -> dict[str, tuple[torch.Tensor,
                                                                                                torch.Tensor]]:
    """Put the ``targets`` Linears of every block on a per-tensor e4m3 grid, as a ComfyUI fp8-scaled file stores
    them (engine.weights.write_scaled_fp8: scale = absmax / 448), in place: afterwards the 16-bit weights hold
    the file's dequantised values, like a model loaded from such a file. Returns the stored payload per layer
    (``"blocks.3.ffn.0"`` -> (e4m3 weight, scale [])) for engine.fast.enable_fp8(weights_fp8=...), so random
    weights can show the fp8 path the way it runs on a user's file (forward.py ``--fp8-grid``)."""
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for rel in targets:
                layer = block.get_submodule(rel)
                w = layer.weight.float()
                absmax = w.abs().max()
                scale = torch.where(absmax > 0, absmax / torch.finfo(torch.float8_e4m3fn).max, torch.ones_like(absmax))
                q = (w / scale).to(torch.float8_e4m3fn)
                layer.weight.copy_(q.float() * scale)
                stored[f"blocks.{i}.{rel}"] = (q, scale.float())
    return stored


def folder_fp8_payload(models_dir: Path, num_blocks: int, targets: tuple[str, ...],
                       device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The e4m3 payload a real fp8-scaled DiT file stores for the ``targets`` of every block (empty for a bf16
    file), keyed for engine.fast.enable_fp8(weights_fp8=...)."""
    from engine import weights as wt
    from engine.models_dir import locate

    path = locate(models_dir)["dit"]
    if path is None:
        raise FileNotFoundError(f"{models_dir}: no dit file")
    keys = [f"blocks.{i}.{rel}.weight" for i in range(num_blocks) for rel in targets]
    return {k[: -len(".weight")]: v for k, v in wt.iter_fp8_weights(wt.read_header(path), keys, device=device)}


def fp32_forward(model: dit.WanInfiniteTalk, kw: dict[str, Any]) -> torch.Tensor:
    """The forward in fp32 arithmetic without an fp32 copy of the whole model: the non-block modules are cast to
    fp32 for the call, each block just before it runs and back right after (bf16 -> fp32 -> bf16 is exact for
    values that came from bf16). Eager; set ``torch.set_float32_matmul_precision("highest")`` to avoid TF32."""
    dtype = next(model.parameters()).dtype
    others = [m for name, m in model.named_children() if name != "blocks"]

    def to_fp32(m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        m.float()

    def back(m: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        m.to(dtype)

    hooks = []
    for block in model.blocks:
        hooks.append(block.register_forward_pre_hook(to_fp32))
        hooks.append(block.register_forward_hook(back))
    try:
        for m in others:
            m.float()
        return dit_forward(model, kw).float()
    finally:
        for h in hooks:
            h.remove()
        for m in others:
            m.to(dtype)


def compare_forwards(models: Path | None, variants: list[tuple[str, bool, Callable[..., torch.Tensor]]],
                     baselines: dict[bool, str], *, profile: bool, top: int = 8) -> Iterator[dict[str, object]]:
    """For the attention probes: the full-size DiT (random weights unless ``models``) compiled at 448x896x81 once
    per variant (name, fp8 GEMMs with fast accumulation?, self-attention kernel), in order; the bf16 -> fp8
    conversion happens at the first fp8 variant. Yields one row per variant: s / forward (median of 3), compile s,
    peak GiB, closeness to the variant named in ``baselines[fp8 GEMMs]`` when that ran before (same GEMMs, other
    attention), and with ``profile`` the kernel time by kind. A variant that raises yields its traceback instead."""
    import traceback

    from engine import fast

    model = bench_dit(models, "cuda", torch.bfloat16)
    kw = dit_inputs(model.cfg, 448, 896, 81, "cuda", torch.bfloat16)
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), fast.preferred_attention():
        for name, gemm_fp8, kernel in variants:
            row: dict[str, object] = {"forward": name}
            try:
                if gemm_fp8 and not any(isinstance(m, fast.Fp8Linear) for m in model.modules()):
                    fast.enable_fp8(model, fast_accum=True)
                for block in model.blocks:
                    block.self_attn.kernel = kernel
                torch._dynamo.reset()
                fast.compile_blocks(model)
                reset_peak()
                first, _ = wall_once(lambda: dit_forward(model, kw))
                sec, out = timed(lambda: dit_forward(model, kw), 3)
                outs[name] = out.float().clone()
                row.update(s_per_forward=round(sec, 3), compile_s=round(first - sec, 1), peak_gib=peak_gib())
                base = baselines.get(gemm_fp8)
                if base and name != base and base in outs:
                    c = closeness(outs[name], outs[base])
                    row.update(rel_l2_vs_bf16_attention=round(c["rel_l2"], 5), cos=round(c["cos"], 6))
                if profile:
                    row["profile"] = kernel_breakdown(lambda: dit_forward(model, kw), top=top)
            except Exception:  # noqa: BLE001 - a probe variant that fails is a result, not the end of the run
                row["error"] = traceback.format_exc()[-2000:]
            yield row


def kernel_breakdown(fn: Callable[[], object], top: int = 25) -> dict[str, object]:
    """Run ``fn`` once under torch.profiler (CUDA activity) and sum the device time of its kernels by kind:
    attention (SDPA / flash / fmha / cuDNN graph kernels), GEMM (cuBLAS / CUTLASS / scaled_mm), Triton (the fused
    elementwise kernels Inductor writes), other. Returns the sums in ms and the ``top`` kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    kinds = {"attention": 0.0, "gemm": 0.0, "triton": 0.0, "other": 0.0}
    rows = []
    for evt in prof.key_averages():
        us = float(getattr(evt, "self_device_time_total", 0.0) or getattr(evt, "self_cuda_time_total", 0.0))
        if us <= 0:
            continue
        name = evt.key.lower()
        if name.startswith("triton"):  # before attention: Inductor names fused kernels after the ops they feed
            kind = "triton"
        elif any(s in name for s in ("fmha", "flash", "attention", "attn", "sdpa")):
            kind = "attention"
        elif any(s in name for s in ("gemm", "cutlass", "xmma", "nvjet", "scaled_mm", "matmul", "gmma")):
            kind = "gemm"
        else:
            kind = "other"
        kinds[kind] += us / 1e3
        rows.append((us / 1e3, evt.count, kind, evt.key[:120]))
    rows.sort(reverse=True)
    return {"ms_by_kind": {k: round(v, 1) for k, v in kinds.items()},
            "top": [{"ms": round(ms, 2), "calls": n, "kind": k, "kernel": name} for ms, n, k, name in rows[:top]]}


# ---------------------------------------------------------------------------------------------------------------
# Environment


def environment(device: str) -> dict[str, Any]:
    """What a figure depends on besides the code: versions, GPU, kernels available."""
    info: dict[str, Any] = dict(python=platform.python_version(), torch=torch.__version__, device=device,
                                host_cpus=os.cpu_count(), platform=platform.platform(terse=True))
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                    gpu_gib=round(props.total_memory / GIB, 2), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        from engine.attention import flash3_available
        from engine.fast import supports_fp8

        info.update(supports_fp8=supports_fp8(device), fa3_available=flash3_available(device))
    return info


def gpu_label(env: dict[str, Any]) -> str:
    return str(env.get("gpu") or f"CPU ({env.get('host_cpus')} cores)")


def finish(report: Report, out: str | None, note: str = "") -> Path:
    """The end of every entry point: write the report's JSON, print its table and where it went."""
    path = report.write(out_dir(out))
    print(format_table(report.rows))
    print(f"({gpu_label(report.env)}; {path}{note})")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The result format


@dataclass
class Row:
    """One measured case of one entry point."""

    bench: str  # the entry point: forward, vae, render, lowmem, writer
    case: str  # what ran, in words
    seconds: float | None = None  # the headline time, in ``unit``
    unit: str = "s"  # e.g. "s/forward", "s/job", "s/call"
    peak_gib: float | None = None  # peak GPU memory allocated during the case
    metrics: dict[str, Any] = field(default_factory=dict)  # everything else (closeness, stage times, ...)
    error: str | None = None  # the case failed: the last line of the error


@dataclass
class Report:
    """One run of one entry point (or of the suite): what ran, where, when, and the rows."""

    bench: str
    command: str
    env: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    schema: str = SCHEMA

    def add(self, row: Row, *, echo: bool = True) -> Row:
        self.rows.append(row)
        if echo:
            print(json.dumps(dataclasses.asdict(row), default=str), flush=True)
        return row

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.bench}.json"
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path


_ROW_FIELDS = {f.name for f in dataclasses.fields(Row)}
_REPORT_FIELDS = {f.name for f in dataclasses.fields(Report)}


def load_report(path: Path) -> Report:
    """Read a result file back; raises ValueError naming the file when it is not in this schema."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a bench result of schema {SCHEMA} (schema: {doc.get('schema')!r})"
                         if isinstance(doc, dict) else f"{path}: not a JSON object")
    if set(doc) != _REPORT_FIELDS:
        raise ValueError(f"{path}: fields {sorted(set(doc) ^ _REPORT_FIELDS)} differ from the schema")
    rows = []
    for i, r in enumerate(doc["rows"]):
        if not isinstance(r, dict) or set(r) != _ROW_FIELDS:
            raise ValueError(f"{path}: row {i} does not have the fields {sorted(_ROW_FIELDS)}")
        rows.append(Row(**r))
    return Report(**{**doc, "rows": rows})


def command_line() -> str:
    """The command that is running, as one would type it again."""
    args = sys.argv[1:]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        head = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        head = ["python", *sys.argv[:1]]
    return shlex.join([*head, *args])


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def format_table(rows: list[Row], *, details: int = 4) -> str:
    """Rows of any entry points as one Markdown table: bench, case, time, unit, peak GiB, and the first
    ``details`` scalar metrics as key=value (or the error)."""
    lines = ["| bench | case | time | unit | peak GiB | details |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            extra = f"error: {r.error}"
        else:
            scalars = [(k, v) for k, v in r.metrics.items() if isinstance(v, (int, float, str, bool)) or v is None]
            extra = ", ".join(f"{k}={_cell(v)}" for k, v in scalars[:details])
        lines.append(f"| {r.bench} | {_cell(r.case)} | {_cell(r.seconds)} | {r.unit} | {_cell(r.peak_gib)} "
                     f"| {_cell(extra)} |")
    return "\n".join(lines) + "\n"


def out_dir(arg: str | None) -> Path:
    """Where results go: ``--out``, else ``$OUT`` (the lent GPU machines' return folder), else .bench/out (which
    git ignores)."""
    return Path(arg or os.environ.get("OUT") or ".bench/out")


@contextlib.contextmanager
def case(report: Report, bench: str, name: str, unit: str = "s") -> Iterator[Row]:
    """Measure one case: yields a Row to fill; an exception becomes the row's error (the run goes on: one failed
    variant is a result, not the end of a benchmark), and the row is added to ``report`` either way."""
    row = Row(bench=bench, case=name, unit=unit)
    try:
        yield row
    except Exception as e:  # noqa: BLE001
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
    report.add(row)
