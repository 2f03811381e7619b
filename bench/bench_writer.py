"""mp4 encoding of rendered chunks, in the caller's thread vs the background writer (engine/media.py).

Writes --chunks chunks of 81 frames (448x896 by default, a moving random texture so x264 has real work) with
48 kHz audio, each chunk preceded by --gpu-s seconds of work in the caller's thread (bf16 matmuls on the GPU when
there is one, sleep otherwise) standing in for the next chunk's denoising. Reports the total, the time the caller
spent blocked in write() and close(), for the foreground and the background writer, alternating --repeat times.

    python bench/bench_writer.py --chunks 3 --gpu-s 3 [--content noise]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.media import VideoWriter  # noqa: E402


def busy(seconds: float) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for _ in range(10):
                    a = (a @ a).clamp_(-1, 1)
                torch.cuda.synchronize()
            return
    except ImportError:
        pass
    time.sleep(seconds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--gpu-s", type=float, default=3.0)
    ap.add_argument("--size", default="448x896")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--content", choices=["texture", "noise"], default="texture",
                    help="texture: a random texture moving 4 px a frame; noise: fresh noise every frame (x264's worst "
                         "case, like the output of a random-weight model)")
    ap.add_argument("--from-model", action="store_true",
                    help="convert each chunk through engine.frames.from_model from a float tensor on the GPU first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    out_dir = Path(args.out or os.environ.get("OUT") or "bench/out")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if args.content == "noise":
        chunk = (rng.random((81, h, w, 3)) * 255).astype(np.uint8)
    else:
        base = (rng.random((h, w + 81 * 4, 3)) * 255).astype(np.uint8)
        chunk = np.stack([base[:, 4 * i: 4 * i + w] for i in range(81)])
    audio = (rng.standard_normal(48000 * 4 * args.chunks) * 0.1).astype(np.float32)
    results: dict[str, list[dict[str, float]]] = {"foreground": [], "background": []}
    for _ in range(args.repeat):
        for mode in ("foreground", "background"):
            blocked = 0.0
            t0 = time.perf_counter()
            writer = VideoWriter(out_dir / f"{mode}.mp4", width=w, height=h, audio=audio, audio_rate=48000,
                                 background=mode == "background")
            for _c in range(args.chunks):
                busy(args.gpu_s)
                frames = chunk
                if args.from_model:  # as render.py makes them: a float video on the GPU -> uint8 on the CPU
                    import torch

                    from engine.frames import from_model

                    dev = "cuda" if torch.cuda.is_available() else "cpu"
                    frames = from_model(torch.from_numpy(chunk).to(dev).permute(3, 0, 1, 2).float() / 127.5 - 1)
                t1 = time.perf_counter()
                writer.write(frames)
                blocked += time.perf_counter() - t1
            t1 = time.perf_counter()
            writer.close()
            close_s = time.perf_counter() - t1
            row = {"total_s": time.perf_counter() - t0, "blocked_in_write_s": blocked, "close_s": close_s}
            results[mode].append(row)
            print(mode, json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    summary = {m: {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]} for m, rows in results.items()}
    report = {"args": vars(args), "cpu_count": os.cpu_count(), "summary": summary, "runs": results}
    (out_dir / "bench_writer.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
