"""``make demo``: the real daemon, the real engine code, a tiny random models folder, one job.

    python -m daemon.demo --workdir demo

Writes ``demo/models`` (tiny random weights in the real ComfyUI layout), ``demo/config.yaml``, a
synthetic portrait, a second of speech-like sound and a sidecar into ``demo/inbox``, then runs the
daemon until that job is finished and prints where the results are.

Every run drops a job of its own: the sidecar carries a fresh seed. The daemon keys jobs on their
content (files + settings), so dropping the very same files again would be skipped as "already
rendered" and the demo would wait for a job that never comes. A demo is run to see the whole path
work (often again after a change), so a new seed makes a new job rather than a lookup of an old
one. ``make clean-demo`` removes the folder. Tiny random weights render noise,
not a face: this proves the plumbing (watch -> queue -> engine -> outbox), not the model.
The engine is imported lazily, as in cli.py.
"""

from __future__ import annotations

import argparse
import math
import secrets
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from daemon.cli import _engine, _load_engine
from daemon.config import load_config
from daemon.jobs import TERMINAL
from daemon.service import run_daemon
from daemon.store import Store


def _portrait(path: Path, size: int = 128) -> None:
    """A face-like drawing: skin ellipse, eyes, mouth on a gradient."""
    grad = np.linspace(40, 110, size, dtype=np.float32)
    px = np.stack([np.tile(grad[:, None], (1, size)), np.full((size, size), 60.0),
                   np.tile(grad[None, ::-1], (size, 1))], axis=-1).astype(np.uint8)
    img = Image.fromarray(px)
    d = ImageDraw.Draw(img)
    c, rx, ry = size / 2, size * 0.3, size * 0.36
    d.ellipse([c - rx, c - ry, c + rx, c + ry], fill=(224, 182, 150))
    for ex in (c - rx / 2.5, c + rx / 2.5):
        d.ellipse([ex - 5, c - ry / 3 - 4, ex + 5, c - ry / 3 + 4], fill=(40, 30, 30))
    d.ellipse([c - rx / 3, c + ry / 2.5 - 5, c + rx / 3, c + ry / 2.5 + 5], fill=(150, 60, 60))
    img.save(path)


def _speech(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    """A voiced, syllable-modulated tone (not silence, not a pure sine), 16-bit mono WAV."""
    import wave

    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * math.pi * np.cumsum(140 + 20 * np.sin(2 * math.pi * 0.7 * t)) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    sig = 0.2 * voiced * (0.5 * (1 + np.sin(2 * math.pi * 4.0 * t))) ** 2
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(sig, -1, 1) * 32767).astype("<i2").tobytes())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m daemon.demo")
    ap.add_argument("--workdir", default="demo")
    ap.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    args = ap.parse_args(argv)
    work = Path(args.workdir).resolve()
    models = work / "models"
    if not (models / "vae").is_dir():
        print(f"writing a tiny random models folder to {models} ...", flush=True)
        _engine("engine.tiny").write_tiny_models(models, seed=0)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "paths": {"inbox": "./inbox", "outbox": "./outbox", "state": "./state"},
        "watch": {"mode": "poll", "poll_interval_s": 0.2, "stable_window_s": 0.5},
        "jobs": {"min_free_mb": 64},
        "engine": {"models_dir": "./models", "device": "auto", "cache_dir": "./state/cache"},
        "render": {"size": [64, 64], "seed": 1},
        "logging": {"format": "console"},
    }, sort_keys=False), encoding="utf-8")
    cfg = load_config(config_path)
    cfg.paths.inbox.mkdir(parents=True, exist_ok=True)
    seed = secrets.randbelow(2**31)
    stem = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{seed}"
    _speech(cfg.paths.inbox / f"{stem}.wav")
    _portrait(cfg.paths.inbox / f"{stem}.png")
    # The sidecar last: it is the job's manifest (docs/daemon.md §2).
    (cfg.paths.inbox / f"{stem}.yaml").write_text(yaml.safe_dump({"seed": seed}), encoding="utf-8")
    print(f"demo: job {stem} (seed {seed}) dropped into {cfg.paths.inbox}", flush=True)

    stop = threading.Event()
    outcome: dict[str, str] = {}

    def watch() -> None:
        deadline = time.monotonic() + args.timeout
        while not stop.wait(0.5):
            if time.monotonic() > deadline:
                outcome["error"] = f"no result after {args.timeout:g} s"
                break
            if not cfg.paths.database.exists():
                continue
            store = Store.open(cfg.paths.database)
            try:
                job = store.find(stem)
            finally:
                store.close()
            if job is not None and job.status in TERMINAL:
                outcome["status"] = job.status.value
                outcome["detail"] = str(job.outputs.get("mp4") or job.error)
                break
        stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = run_daemon(cfg, _load_engine, stop=stop)
    watcher.join(5)
    if outcome.get("status") == "done":
        print(f"\ndemo: rendered {cfg.paths.outbox / outcome['detail']} (+ .json, .log); "
              f"inputs archived in {cfg.paths.archive}")
        return 0
    print(f"\ndemo: {outcome.get('status', 'stopped')}: {outcome.get('detail') or outcome.get('error', '')} "
          f"(daemon exit code {code})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
