"""TeaCache for the DiT's block stack: skip all 40 blocks on steps whose timestep embedding barely moved.

The official InfiniteTalk code offers this as ``--use_teacache`` (threshold ``--teacache_thresh``, 0.2 suggested),
off by default; so is it here (sidecar ``teacache: 0.2``). It changes the output — an approximation traded for
speed, meant for the 40-step ``quality`` preset (docs/model.md §8.4: of little use at 4-8 steps).

The rule, as learned from MeiGen-AI/InfiniteTalk ``wan/modules/multitalk_model.py`` (``teacache_init`` with its
default ``use_ret_steps=True`` and ``forward``; the code is not copied):

- the signal is the timestep modulation ``e0`` ([B, 6, dim], fp32) the blocks receive; per call the relative L1
  change ``mean|e0 - e0_prev| / mean|e0_prev|`` is mapped through a degree-4 polynomial fitted by the TeaCache
  authors for this model (one for the 480p and one for the 720p buckets) and accumulated;
- the first 5 calls of each pass in a chunk always run the blocks; later, while the accumulated value stays
  below the threshold the blocks are skipped and the tokens get the residual (blocks' output minus input) the
  same pass produced the last time it ran; once it reaches the threshold the blocks run and the sum restarts;
- everything restarts with each chunk (upstream counts calls and wraps after steps x 3 of them).

One deliberate difference: upstream keys its three caches by call count modulo 3, which presumes 3 passes per
step and mixes the passes up at 2 (text guidance 1) or 1; here the caller keeps one :class:`TeaCache` per pass
name, so every pass reuses only its own residual. The skip decisions depend on the timesteps alone, so all passes
of a step decide alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TeaCache", "COEFFICIENTS", "WARMUP_CALLS", "coefficients_for", "plan"]

# Rescaling polynomials (highest power first) of upstream's ``teacache_init`` for ``use_ret_steps=True``.
COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "480p": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "720p": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
WARMUP_CALLS = 5  # upstream ret_steps = 5 steps (x 3 calls)

# Between the 480p buckets (~640 x 640 pixels) and the 720p ones (~960 x 960): explicit sizes pick by area.
_AREA_SPLIT = (640 * 640 + 960 * 960) // 2


def coefficients_for(height: int, width: int) -> tuple[float, ...]:
    """The polynomial of the bucket family this output size belongs to (by pixel count)."""
    return COEFFICIENTS["720p" if height * width > _AREA_SPLIT else "480p"]


class TeaCache:
    """The block-skip state of one guidance pass over one chunk. Call it in place of running the blocks:
    ``tokens = cache(tokens, e0, run_blocks)``. ``threshold`` > 0; ``skipped`` / ``calls`` count the calls."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...], warmup_calls: int = WARMUP_CALLS) -> None:
        if threshold <= 0:
            raise ValueError(f"a TeaCache threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.coefficients = coefficients
        self.warmup_calls = warmup_calls
        self.calls = 0
        self.skipped = 0
        self._accumulated = 0.0
        self._prev_e0: Tensor | None = None
        self._residual: Tensor | None = None

    def _rescale(self, x: float) -> float:
        y = 0.0
        for c in self.coefficients:  # Horner, highest power first (numpy.poly1d order)
            y = y * x + c
        return y

    def _should_run(self, e0: Tensor) -> bool:
        prev = self._prev_e0
        if self.calls < self.warmup_calls or prev is None or self._residual is None:
            self._accumulated = 0.0
            return True
        rel = ((e0 - prev).abs().mean() / prev.abs().mean()).item()  # one small device sync per forward
        self._accumulated += self._rescale(rel)
        if self._accumulated < self.threshold:
            return False
        self._accumulated = 0.0
        return True

    def __call__(self, tokens: Tensor, e0: Tensor, run: Callable[[Tensor], Tensor]) -> Tensor:
        """tokens [B, L, dim] before the blocks, e0 [B, 6, dim] -> tokens after the blocks (or their estimate)."""
        run_blocks = self._should_run(e0)
        self._prev_e0 = e0.detach().clone()
        self.calls += 1
        if not run_blocks:
            assert self._residual is not None
            self.skipped += 1
            return tokens + self._residual
        out = run(tokens)
        self._residual = (out - tokens).detach()
        return out


def plan(e0s: list[Tensor], threshold: float, coefficients: tuple[float, ...],
         warmup_calls: int = WARMUP_CALLS) -> list[bool]:
    """Which of a chunk's steps run the blocks (True) for the timestep modulations ``e0s`` of its steps.

    The decisions depend on nothing else, so this predicts a render's skips from the time-embedding weights
    alone (bench/teacache_schedule.py reads them from a DiT file on the CPU)."""
    cache = TeaCache(threshold, coefficients, warmup_calls)
    ran: list[bool] = []
    probe = torch.zeros(1)
    for e0 in e0s:
        before = cache.skipped
        cache(probe, e0, lambda x: x)
        ran.append(cache.skipped == before)
    return ran
