"""TeaCache (engine/teacache.py): the skip rule, the residual reuse, the DiT hook and a render with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import dit
from engine.teacache import COEFFICIENTS, TeaCache, coefficients_for
from tests.conftest import dit_inputs
from tests.engine.forward import fwd

IDENTITY = (1.0, 0.0)  # rescale(x) = x: the accumulated value is the sum of the relative changes


class Blocks:
    """Stands in for the block stack: adds a call-dependent offset, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return tokens * 2 + self.calls


def e0_steps(changes: list[float]) -> list[torch.Tensor]:
    """e0 tensors whose relative L1 change from one to the next is exactly each value of ``changes``."""
    out = [torch.ones(1, 6, 4)]
    for c in changes:
        out.append(out[-1] * (1 + c))
    return out


def test_first_calls_run_then_the_accumulated_change_decides() -> None:
    cache, blocks = TeaCache(0.25, IDENTITY, warmup_calls=2), Blocks()
    tokens = torch.zeros(1, 3, 4)
    ran = []
    for e0 in e0_steps([0.1] * 9):
        before = blocks.calls
        cache(tokens, e0, blocks)
        ran.append(blocks.calls > before)
    # 2 warm-up calls; then 0.1 (skip), 0.2 (skip), 0.3 >= 0.25 (run, restart), 0.1, 0.2, 0.3 ...
    assert ran == [True, True, False, False, True, False, False, True, False, False]
    assert (cache.calls, cache.skipped) == (10, 6)


def test_a_skipped_call_adds_the_last_residual_of_this_cache() -> None:
    cache, blocks = TeaCache(1.0, IDENTITY, warmup_calls=1), Blocks()
    e = e0_steps([0.1, 0.1])
    first = cache(torch.full((1, 2, 4), 3.0), e[0], blocks)  # runs: 3 * 2 + 1 = 7, residual 4
    assert torch.equal(first, torch.full((1, 2, 4), 7.0))
    later = cache(torch.full((1, 2, 4), 10.0), e[1], blocks)  # skipped: 10 + 4
    assert blocks.calls == 1 and torch.equal(later, torch.full((1, 2, 4), 14.0))


def test_threshold_and_coefficients() -> None:
    with pytest.raises(ValueError, match="> 0"):
        TeaCache(0.0, IDENTITY)
    assert coefficients_for(448, 896) == COEFFICIENTS["480p"] and coefficients_for(640, 640) == COEFFICIENTS["480p"]
    assert coefficients_for(960, 960) == COEFFICIENTS["720p"] and coefficients_for(704, 1280) == COEFFICIENTS["720p"]
    # the polynomial is evaluated highest power first, like numpy.poly1d
    assert TeaCache(0.2, (2.0, 3.0, 5.0))._rescale(2.0) == 2 * 4 + 3 * 2 + 5


def test_dit_with_a_cache_that_runs_is_bit_identical_and_a_skip_reuses_the_residual() -> None:
    torch.manual_seed(0)
    model = dit.WanInfiniteTalk(dit.TINY).eval().requires_grad_(False)
    kw = dit_inputs(model.cfg)
    with torch.no_grad():
        plain = fwd(model, **kw)
        cache = TeaCache(1e9, IDENTITY, warmup_calls=1)  # runs once, then skips every call
        first = fwd(model, **kw, block_cache=cache)
        assert torch.equal(first, plain)
        # same inputs again, blocks skipped: tokens + the residual of the first call = the blocks' output
        again = fwd(model, **kw, block_cache=cache)
        assert cache.skipped == 1
        torch.testing.assert_close(again, plain, rtol=1e-5, atol=1e-5)
        # new inputs while skipping: an estimate, not the forward (the approximation the option trades for speed)
        other = dict(kw, x=kw["x"] + 1)
        assert not torch.allclose(fwd(model, **other, block_cache=cache), fwd(model, **other), atol=1e-3)


def test_render_with_teacache_skips_blocks_and_reports_it(tiny_models: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import load_engine, render
    from engine.api import EngineOptions
    from engine.settings import request_from_settings
    from tests.conftest import make_portrait, speech_like, write_wav

    # a constant 0.1 per call (random tiny weights say nothing about the fitted polynomial): with threshold 0.25,
    # after the 5 warm-up steps every third step of each pass runs. The lightx2v preset runs 2 passes.
    monkeypatch.setattr(render, "coefficients_for", lambda h, w: (0.1,))
    engine = load_engine(EngineOptions(models_dir=tiny_models, device="cpu", preset="lightx2v"))
    img, wav = make_portrait(tmp_path / "face.png"), write_wav(tmp_path / "s.wav", speech_like(1.0))
    settings = {"size": [64, 64], "steps": 9}
    res = engine.render(request_from_settings({**settings, "teacache": 0.25}, audio=wav, image=img),
                        tmp_path / "a.mp4", lambda p: None, lambda: False)
    assert res.chunks == 1 and res.dit_calls == 9 * 2
    assert res.blocks_skipped == 2 * 3  # steps 6, 7 and 9 of each pass


def test_plan_predicts_the_caches_decisions() -> None:
    from engine.teacache import plan

    assert plan(e0_steps([0.1] * 9), 0.25, IDENTITY, warmup_calls=2) == [True, True, False, False, True, False,
                                                                          False, True, False, False]
