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
    if options.attention == "fa3" and not fast:
        raise ValueError("engine.attention: fa3 needs the fast path on a CUDA GPU (engine.fast: true and a CUDA "
                         "engine.device); use auto or sdpa here")
    if fast:
        import logging

        from engine.attention import flash3_available
        from engine.fast import compile_blocks, use_flash3

        # engine.fp8, if on, was applied by load_models while loading (models_dir._to_fp8)
        fa3 = options.attention == "fa3" or (options.attention == "auto" and flash3_available(models.device))
        if fa3:
            use_flash3(models.dit)  # raises, saying what to do, when engine.attention: fa3 cannot run here
        logging.getLogger(__name__).info(
            "DiT self-attention: %s", "FlashAttention-3" if fa3 else
            "SDPA, cuDNN first (on a Hopper GPU, FlashAttention-3 makes a forward ~9 %% faster: README 'Speed')")
        compile_blocks(models.dit)
    return Engine(models, cache_dir=options.cache_dir, version=__version__, fast=fast,
                  warm_buckets=tuple(options.warm_buckets) if fast else ())
