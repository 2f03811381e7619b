"""The progress line and the time left in a render (daemon/progress.py)."""

from __future__ import annotations

import pytest

from daemon.progress import Eta, describe_progress, format_duration
from engine.api import Progress


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s"), (0.4, "0 s"), (42.4, "42 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"),
    (3599, "59 min 59 s"), (3600, "1 h 00 min"), (3720, "1 h 02 min"), (-3, "0 s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_describe_progress() -> None:
    p = Progress("denoise", 2, 5, 3, 4, 0.32)
    assert describe_progress(p) == "denoise chunk 2/5 step 3/4 (32%)"
    assert describe_progress(p, 185.2) == "denoise chunk 2/5 step 3/4 (32%), about 3 min 05 s left"
    assert describe_progress(Progress("prepare", 0, 0, 0, 0, 0.0)) == "prepare (0%)"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_eta_extrapolates_from_the_first_denoise_report() -> None:
    clock = Clock()
    eta = Eta(clock, min_elapsed_s=2.0)
    # 3 chunks x (4 steps + decode) = 15 equal slices of 3 s; the preparation took 20 s and must not count
    assert eta.update(Progress("prepare", 0, 0, 0, 0, 0.0)) is None
    clock.t += 20.0
    slices = [(c, s) for c in range(3) for s in range(5)]
    results = []
    for n, (c, s) in enumerate(slices, 1):
        clock.t += 3.0
        stage = "decode" if s == 4 else "denoise"
        results.append(eta.update(Progress(stage, c + 1, 3, min(s + 1, 4), 4, n / 15)))
    assert results[0] is None  # the origin
    assert results[1] is None or results[1] == pytest.approx(13 * 3.0)
    for n, r in enumerate(results[2:], 3):
        assert r == pytest.approx((15 - n) * 3.0)  # exact for a steady rate
    assert results[-1] == 0.0


def test_eta_waits_for_time_and_progress() -> None:
    clock = Clock()
    eta = Eta(clock, min_elapsed_s=2.0)
    assert eta.update(Progress("denoise", 1, 1, 1, 40, 0.02)) is None
    clock.t += 1.0
    assert eta.update(Progress("denoise", 1, 1, 2, 40, 0.04)) is None  # too soon to trust a rate
    clock.t += 5.0
    assert eta.update(Progress("denoise", 1, 1, 2, 40, 0.02)) is None  # no progress since the origin
    assert eta.update(Progress("denoise", 1, 1, 4, 40, 0.08)) == pytest.approx(0.92 * 6.0 / 0.06)
