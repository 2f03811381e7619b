"""Compile cost of the DiT blocks at daemon start: first start vs a restart with Inductor's on-disk cache.

Runs the same child process twice with one fresh ``TORCHINDUCTOR_CACHE_DIR`` (the systemd unit points it at
/var/cache/infinitetalkd/inductor, so a restarted daemon finds the kernels of its previous run): each child builds the
full-size DiT with random weights, compiles the blocks (engine.fast.compile_blocks, cuDNN-first attention), and
reports the first forward minus a steady forward (= compile cost) at the 448x896 bucket.

    python bench/bench_compile_cache.py [--fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(fp8: bool) -> None:
    import torch

    from bench.bench_fast import make_inputs, timed, wall_once
    from bench.common import random_dit
    from engine import dit, fast

    t0 = time.perf_counter()
    model = random_dit(dit.RELEASED, "cuda", torch.bfloat16)
    if fp8:
        fast.enable_fp8(model, fast_accum=True)
    kw = make_inputs(dit.RELEASED, 448, 896, 81, "cuda", torch.bfloat16, seed=0)
    with torch.no_grad(), fast.preferred_attention():
        fast.compile_blocks(model)
        first, _ = wall_once(lambda: model(**kw))
        steady, _ = timed(lambda: model(**kw), 2)
    print(json.dumps({"first_call_s": round(first, 2), "steady_s": round(steady, 3),
                      "compile_s": round(first - steady, 1), "process_s": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.fp8)
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=str(Path(cache) / "triton"))
        for run in ("first start (empty cache)", "restart (cache from the first start)"):
            cmd = [sys.executable, __file__, "--child"] + (["--fp8"] if args.fp8 else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            row = {"run": run, "fp8": args.fp8, **json.loads(out.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| run | compile s | steady s / forward | whole child process s |")
    for r in rows:
        print(f"| {r['run']} | {r['compile_s']} | {r['steady_s']} | {r['process_s']} |")


if __name__ == "__main__":
    main()
