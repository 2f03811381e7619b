"""Progress as people read it: the stage/chunk/step line, and the time left in a render.

InfiniteTalk users' first complaint is speed, and a render with no idea of its end looks stuck
(docs/daemon.md §8.2: "report expected time per chunk"). The time left is extrapolated from the
rate of progress since denoising began: loading the inputs, the audio features and the I2V
conditioning happen once before the first denoise report and would skew the rate, while from
there on ``Progress.fraction`` grows in near-equal slices of time (a denoise step; a chunk's
decode counts as one more step). Nothing here is stored: the STATUS line, the job's progress text
and ``infinitetalkd render``'s bar carry it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.api import Progress

__all__ = ["Eta", "describe_progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min`` (rounded to whole seconds / minutes)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    m = round(s / 60)
    return f"{m // 60} h {m % 60:02d} min"


def describe_progress(p: Progress, eta_s: float | None = None) -> str:
    """``denoise chunk 2/5 step 3/4 (32%)``, with ``, about 3 min 05 s left`` when ``eta_s`` is known."""
    parts = [p.stage]
    if p.chunks and p.chunk:
        parts.append(f"chunk {p.chunk}/{p.chunks}")
    if p.steps:
        parts.append(f"step {p.step}/{p.steps}")
    text = " ".join(parts) + f" ({p.fraction:.0%})"
    if eta_s is not None:
        text += f", about {format_duration(eta_s)} left"
    return text


class Eta:
    """Seconds left in one render, from the progress reports it is fed (one instance per render).

    :meth:`update` returns None until denoising has run for ``min_elapsed_s`` and made progress,
    then ``(1 - fraction) x seconds spent / fraction gained`` since the first denoise report.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, min_elapsed_s: float = 2.0) -> None:
        self._clock = clock
        self._min = min_elapsed_s
        self._origin: tuple[float, float] | None = None  # (clock, fraction) at the first denoise report

    def update(self, p: Progress) -> float | None:
        now = self._clock()
        if self._origin is None:
            if p.stage == "denoise":
                self._origin = (now, p.fraction)
            return None
        t0, f0 = self._origin
        gained, spent = p.fraction - f0, now - t0
        if gained <= 0 or spent < self._min:
            return None
        return max(0.0, (1.0 - p.fraction) * spent / gained)
