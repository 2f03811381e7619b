"""InfiniteTalk engine. Importing this package is cheap: torch loads only in ``load_engine``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.api import EngineOptions, Renderer

__version__ = "0.1.0"

log = logging.getLogger("infinitetalkd.engine")


def load_engine(options: EngineOptions) -> Renderer:
    """Load every model for ``options`` onto its device and return a resident renderer."""
    from engine.models_dir import load_models
    from engine.render import Engine

    models = load_models(options)
    fast = options.fast and models.device.type == "cuda"
    if fast:
        from engine.fast import compile_blocks

        # engine.fp8 was applied by load_models (models_dir._to_fp8), block by block while loading: fast
        # accumulation, 6 % faster forwards at the same error as fp32 promotion (bench/RESULTS.md, 2026-11-25
        # session 2: rel L2 vs fp32 0.04845 vs 0.04846).
        compile_blocks(models.dit)
    return Engine(models, cache_dir=options.cache_dir, version=__version__, fast=fast,
                  warm_buckets=tuple(options.warm_buckets) if fast else ())
