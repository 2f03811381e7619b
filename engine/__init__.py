"""InfiniteTalk engine. Importing this package is cheap: torch loads only in ``load_engine``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.api import EngineOptions, Renderer

__version__ = "0.1.0"


def load_engine(options: EngineOptions) -> Renderer:
    """Load every model for ``options`` onto its device and return a resident renderer."""
    from engine.models_dir import load_models
    from engine.render import Engine

    models = load_models(options)
    fast = options.fast and models.device.type == "cuda"
    if fast:
        from engine.fast import compile_blocks

        # engine.fp8, if on, was applied by load_models while loading (models_dir._to_fp8)
        compile_blocks(models.dit)
    return Engine(models, cache_dir=options.cache_dir, version=__version__, fast=fast,
                  warm_buckets=tuple(options.warm_buckets) if fast else ())
