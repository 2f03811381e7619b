"""Which steps TeaCache would skip, from a DiT file's time-embedding weights alone (runs on a CPU, seconds).

The skip decisions of engine/teacache.py depend only on the timestep modulation ``e0`` of each step, i.e. on the
step count, the shift and three small Linear layers of the DiT (``time_embedding.0/2``, ``time_projection.1``).
This reads those from the DiT file (fp8-scaled or not, through engine.weights), computes ``e0`` for every step
exactly as the DiT does (fp32), and prints the schedule and the share of DiT forwards saved per chunk. With the
real file it predicts the speed-up of ``teacache: X`` for a preset; with the tiny test folder it only shows the
mechanism (random weights).

    python bench/teacache_schedule.py --models DIR [--steps 40] [--shift 7] [--threshold 0.2] [--family 480p]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import models_dir as md  # noqa: E402
from engine import sampling  # noqa: E402
from engine import weights as wt  # noqa: E402
from engine.dit import sinusoidal_embedding  # noqa: E402
from engine.teacache import COEFFICIENTS, plan  # noqa: E402

KEYS = ("time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
        "time_projection.1.weight", "time_projection.1.bias")


def modulations(dit_file: Path, steps: int, shift: float) -> list[torch.Tensor]:
    info = wt.read_header(dit_file)
    w = dict(wt.iter_tensors(info, dtype=torch.float32, device="cpu", keys=KEYS))
    freq_dim = w["time_embedding.0.weight"].shape[1]
    out = []
    for t in sampling.timesteps(steps, shift)[:steps]:
        s = sinusoidal_embedding(torch.tensor([t]), freq_dim)
        e = F.linear(F.silu(F.linear(s, w[KEYS[0]], w[KEYS[1]])), w[KEYS[2]], w[KEYS[3]])
        out.append(F.linear(F.silu(e), w[KEYS[4]], w[KEYS[5]]).unflatten(1, (6, -1)))  # [1, 6, dim]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, required=True, help="a ComfyUI models folder")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--shift", type=float, default=7.0)
    ap.add_argument("--threshold", type=float, action="append", default=None)
    ap.add_argument("--family", choices=sorted(COEFFICIENTS), default="480p")
    args = ap.parse_args()
    dit_file = md.locate(args.models)["dit"]
    if dit_file is None:
        sys.exit(f"{args.models}: no DiT file (see 'infinitetalkd doctor --models-dir {args.models}')")
    e0s = modulations(dit_file, args.steps, args.shift)
    for threshold in args.threshold or [0.2]:
        ran = plan(e0s, threshold, COEFFICIENTS[args.family])
        print(json.dumps({"dit": dit_file.name, "steps": args.steps, "shift": args.shift, "family": args.family,
                          "threshold": threshold, "steps_run": sum(ran), "steps_skipped": len(ran) - sum(ran),
                          "forwards_saved": round(1 - sum(ran) / len(ran), 3),
                          "schedule": "".join("R" if r else "." for r in ran)}))


if __name__ == "__main__":
    main()
