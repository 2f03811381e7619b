"""What ``infinitetalkd render`` shows on stderr: the output size up front, then a progress bar.

The engine is reached through the ``engine`` import callable the command line passes in, so this module
stays torch-free until a render actually runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from daemon.progress import Eta, describe_progress
from engine.api import EngineOptions, Progress, RenderRequest

__all__ = ["ProgressBar", "output_size", "announce"]

ImportFn = Callable[[str], Any]
# Above this many output pixels a CPU render gets a warning before it starts (a 128x128 test render is fine).
_CPU_QUICK_PIXELS = 256 * 256


class ProgressBar:
    """Progress on stderr: one redrawn line on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = ""
        self._eta = Eta()

    def __call__(self, p: Progress) -> None:
        text = describe_progress(p, self._eta.update(p))
        if self.tty:
            filled = int(p.fraction * 30)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {text:<64}")
            sys.stderr.flush()
            return
        key = f"{p.stage} {p.chunk} {int(p.fraction * 20)}"  # a line per stage/chunk change or 5 %
        if key != self._last:
            self._last = key
            print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def output_size(request: RenderRequest, engine: ImportFn) -> tuple[int, int, str] | None:
    """(width, height, why) of the video the request will make; None when the source cannot be read here
    (the engine then says what is wrong with it)."""
    if request.size is not None:
        return request.size[0], request.size[1], "the size setting"
    try:
        if request.image is not None:
            from PIL import Image

            with Image.open(request.image) as im:
                w, h = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation: a quarter turn
                    w, h = h, w
            what = "portrait"
        else:
            assert request.video is not None
            info = engine("engine.media").probe(request.video)
            w, h, what = int(info["width"]), int(info["height"]), "video"
        bh, bw = engine("engine.frames").choose_bucket(h, w, request.resolution)
    except Exception:  # only a preview: the render itself reports what is wrong with the source
        return None
    return bw, bh, f"the {request.resolution} bucket for a {w}x{h} {what}"


def announce(request: RenderRequest, options: EngineOptions, engine: ImportFn) -> None:
    """Say up front what the render makes, and that a full-size render on the CPU takes very long."""
    size = output_size(request, engine)
    on_cpu = options.device == "cpu" or (options.device == "auto" and not engine("torch").cuda.is_available())
    device = "the CPU" if on_cpu else (options.device if options.device != "auto" else "the GPU")
    if size is not None:
        print(f"output {size[0]}x{size[1]} ({size[2]}), 25 fps, on {device}", file=sys.stderr)
    if on_cpu and (size is None or size[0] * size[1] > _CPU_QUICK_PIXELS):
        print("note: on the CPU a render of this size is very slow (each 81-frame chunk runs the "
              "14B model for many minutes); use a GPU, or --set size=[128,128] for a quick test",
              file=sys.stderr)
