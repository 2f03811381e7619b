"""``make bench`` / ``python -m bench``: the benchmark suite on whatever this machine has, one table at the end.

On a CUDA GPU with at least 48 GiB (``bench.common.FULL_SIZE_MIN_GIB``) everything runs at the released sizes
(448x896, 81 frames, random weights): every DiT forward variant and the VAE (bench/forward.py), low-memory
streaming under 24 / 16 GiB caps (bench/lowmem.py) and the mp4 writer next to GPU work (bench/writer.py). Not yet
timed as a whole on a GPU; as separate scripts these parts took 1-5 minutes each on an H100. The whole-engine
render (bench/render.py) writes a 36 GB models folder first, so at full size it runs only with ``--render`` (or
``--models DIR``, an existing folder). Anywhere else (a smaller GPU, a CPU) the same code runs at the tests' tiny
sizes, render included: a smoke test of the suite whose times mean nothing. The checkpoint part (bench/checkpoint.py:
a checkpoint write's share of the chunk time, the checkpoint's size at real buckets) runs on the tiny models
everywhere. The result is ``<out>/suite.json`` in the schema of bench/common.py and one Markdown table. The parts:
forward (with the VAE), lowmem, writer, render, checkpoint.

    python -m bench [--size auto|full|tiny] [--render] [--models DIR] [--only forward,lowmem,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import common as c

PARTS = ("forward", "lowmem", "writer", "render", "checkpoint")


def _parts(args: argparse.Namespace, size: c.Size) -> dict[str, Callable[[c.Size, str, c.Report], None]]:
    """The suite's parts; each imports its entry point when it runs (the writer needs PyAV, the render the whole
    engine: a machine without them still runs the other parts)."""

    def forward(s: c.Size, d: str, r: c.Report) -> None:
        from bench import forward as m

        m.suite(s, d, r, repeat=args.repeat)

    def lowmem(s: c.Size, d: str, r: c.Report) -> None:
        from bench import lowmem as m

        m.suite(s, d, r, repeat=args.repeat)

    def writer(s: c.Size, d: str, r: c.Report) -> None:
        from bench import writer as m

        m.suite(s, d, r, repeat=args.repeat)

    def render(s: c.Size, d: str, r: c.Report) -> None:
        from bench import render as m

        m.suite(s, d, r, models=args.models)

    def checkpoint(s: c.Size, d: str, r: c.Report) -> None:
        from bench import checkpoint as m

        m.suite(s, d, r)

    parts = {"forward": forward, "lowmem": lowmem, "writer": writer}
    if size is c.TINY or args.render or args.models:
        parts["render"] = render
    parts["checkpoint"] = checkpoint
    return {k: v for k, v in parts.items() if not args.only or k in args.only}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="auto", choices=["auto", "full", "tiny"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--render", action="store_true", help="at full size, also the whole render (writes 36 GB)")
    ap.add_argument("--models", type=Path, default=None, help="an existing models folder for the render")
    ap.add_argument("--only", type=lambda s: [p for p in s.split(",") if p], default=[],
                    help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--out", default=None, help="folder for suite.json (default $OUT, else .bench/out)")
    args = ap.parse_args(argv)
    unknown = [p for p in args.only if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    device = c.default_device()
    size = c.pick_size(args.size, device)
    report = c.Report("suite", c.command_line(), {**c.environment(device), "size": size.name})
    print(f"bench suite: {size.name} sizes on {c.gpu_label(report.env)}", flush=True)
    try:
        for name, part in _parts(args, size).items():
            try:
                part(size, device, report)
            except Exception as e:  # noqa: BLE001 - one part failing (out of memory, say) is reported, not fatal
                traceback.print_exc()
                report.add(c.Row(bench=name, case="(set-up)", error=f"{type(e).__name__}: {str(e)[:200]}"))
    finally:
        path = report.write(c.out_dir(args.out))
        print()
        print(c.format_table(report.rows))
        print(f"{size.name} sizes; {c.gpu_label(report.env)}; torch {report.env['torch']}; {report.date}; "
              f"command: {report.command}; results: {path}")
    return 1 if any(r.error for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
