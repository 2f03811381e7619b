"""The whole engine through its own loader and render loop: cold start, one chunk per preset, a 3-chunk job.

The decisions it informs: the default engine variant (eager / compiled / fp8 / low-memory), and what a job costs
end to end (stage times are the engine's own ``RenderResult.timings``). At full size it first writes a models
folder with random weights in the real ComfyUI formats (``engine.tiny.write_models(full_size=True)``: DiT and umT5
fp8-scaled, adapter fp16, VAE bf16, a rank-64 LoRA; ~36 GB, ~2 min on an H100 machine) unless --skip-write.

Cases: one 81-frame chunk (3.24 s of speech) at 448x896 with the lightx2v preset (4 steps x 2 passes), fast1
(4 x 1), 2 steps of the 3-pass guidance (x20 = a 40-step quality chunk), and fast1 over 9.0 s of speech = 3 chunks
((3-chunk total - 1-chunk total) / 2 = the steady cost of a further chunk). Variants ``quality`` / ``qualityfp8``
load without the LoRA and time 2 steps of the quality preset (fp8 then uses the folder's own fp8 weights).

    python -m bench.render --models /tmp/models [--skip-write] [--variant compiled --variant fp8] --out $OUT
    python -m bench.render --size tiny    # the tiny models folder on any machine (seconds on a GPU)
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common as c
from engine import load_engine
from engine.api import EngineOptions
from engine.settings import request_from_settings
from engine.tiny import write_models, write_tiny_models

BENCH = "render"
VARIANTS = ("eager", "compiled", "fp8", "low24", "low16", "low24fp8", "quality", "qualityfp8")


def speech(path: Path, seconds: float) -> Path:
    """A voiced, syllable-modulated 150 Hz tone, 16 kHz mono WAV."""
    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.2 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((sig * 32767).astype("<i2").tobytes())
    return path


def portrait(path: Path, h: int, w: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def cases(work: Path, size: c.Size, no_lora: bool) -> list[tuple[str, dict[str, Any], Path]]:
    one, three = speech(work / "s.wav", 3.24), speech(work / "s3.wav", 9.0)
    extra: dict[str, Any] = {} if size is c.FULL else {"size": [size.width, size.height]}
    if no_lora:  # a job must use the engine's LoRA policy: the official 40-step preset, 2 of its steps timed
        return [("quality 3-pass guidance, 2 steps (x20 = a 40-step quality chunk)",
                 {"preset": "quality", "steps": 2, **extra}, one)]
    return [("lightx2v 4 steps x 2 passes", {"preset": "lightx2v", **extra}, one),
            ("fast1 4 steps x 1 pass", {"preset": "fast1", **extra}, one),
            ("3-pass guidance, 2 steps (x20 = a 40-step quality chunk)",
             {"preset": "lightx2v", "steps": 2, "text_guidance": 5.0, "audio_guidance": 4.0, **extra}, one),
            ("fast1, 3 chunks (9.0 s of speech)", {"preset": "fast1", **extra}, three)]


def run_variant(report: c.Report, models: Path, variant: str, size: c.Size, device: str, *, drop_cache: bool,
                only: list[str]) -> None:
    low = variant.startswith("low")
    if low and device.startswith("cuda"):  # the memory of a 24 / 16 GB card, for the rest of this process
        c.set_memory_cap(float(variant[3:5]))
    if drop_cache:
        report.env["page_cache_dropped"] = subprocess.run("sync && echo 3 > /proc/sys/vm/drop_caches", shell=True,
                                                          capture_output=True).returncode == 0
    no_lora = variant.startswith("quality")
    with c.case(report, BENCH, f"{variant}: cold start (load + warm-up)", "s") as row:
        c.reset_peak()
        t0 = time.perf_counter()
        engine = load_engine(EngineOptions(
            models_dir=models, device=device, preset="quality" if no_lora else "lightx2v", fast=variant != "eager",
            fp8=variant.endswith("fp8"), memory_mode="low" if low else "auto"))
        c.sync()
        load_s = time.perf_counter() - t0
        warm_s, _ = c.wall_once(engine.warmup)
        row.seconds = round(load_s + warm_s, 1)
        row.metrics.update(load_s=round(load_s, 1), warmup_s=round(warm_s, 1), resident_gib=c.alloc_gib(),
                           dit=";".join(p for p in engine.identity().split(";") if p.startswith("dit_")))
    if row.error:
        return
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmp:
        work = Path(tmp)
        img = portrait(work / "p.png", size.height, size.width)
        for name, settings, wav in cases(work, size, no_lora):
            if only and not any(name.startswith(o) for o in only):
                continue
            with c.case(report, BENCH, f"{variant}: {name}", "s/job") as row:
                req = request_from_settings(settings, audio=wav, image=img)
                c.reset_peak()
                sec, res = c.wall_once(lambda e=engine, r=req: e.render(r, work / "o.mp4", lambda p: None,
                                                                        lambda: False))
                row.seconds, row.peak_gib = round(sec, 2), c.peak_gib()
                row.metrics.update({k: round(v, 2) for k, v in res.timings.items()})
                row.metrics.update(frames=res.frames, chunks=res.chunks, size=f"{res.height}x{res.width}")
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(report: c.Report, *, size: c.Size, device: str, models: Path | None, write: bool, variants: list[str],
        only: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        folder = models or Path(tmp) / "models"
        if write or models is None:
            with c.case(report, BENCH, f"write the {size.name} models folder", "s") as row:
                t0 = time.perf_counter()
                if size is c.FULL:
                    write_models(folder, full_size=True, device=device)
                else:
                    write_tiny_models(folder)
                row.seconds = round(time.perf_counter() - t0, 1)
                row.metrics["folder_gb"] = round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                                                 / 1e9, 2)
        for i, variant in enumerate(variants):
            run_variant(report, folder, variant, size, device, drop_cache=i == 0 and size is c.FULL, only=only)


def suite(size: c.Size, device: str, report: c.Report, *, models: Path | None = None) -> None:
    """What ``make bench`` runs from this entry point: the default engine, one-chunk fast1 and the 3-chunk job."""
    run(report, size=size, device=device, models=models, write=False, variants=["compiled"],
        only=["fast1"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="auto", choices=["auto", "full", "tiny"])
    ap.add_argument("--models", type=Path, default=None,
                    help="models folder (full size: written there first unless --skip-write; default: a temp dir)")
    ap.add_argument("--skip-write", action="store_true", help="use --models as it is (e.g. a real folder)")
    ap.add_argument("--variant", action="append", choices=VARIANTS, default=None,
                    help="engine variants, loaded one after the other (default: compiled)")
    ap.add_argument("--case", action="append", default=[], help="only cases whose name starts with this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = c.default_device()
    size = c.pick_size(args.size, device)
    report = c.Report(BENCH, c.command_line(), {**c.environment(device), "size": size.name})
    try:
        run(report, size=size, device=device, models=args.models, write=not args.skip_write,
            variants=args.variant or ["compiled"], only=args.case)
    finally:
        c.finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
