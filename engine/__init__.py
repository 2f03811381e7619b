"""InfiniteTalk engine. Importing this package is cheap: torch loads only in ``load_engine``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.api import EngineOptions, Renderer

__version__ = "0.1.0"


def load_engine(options: EngineOptions) -> Renderer:
    """Load every model for ``options`` onto its device and return a resident renderer."""
    from engine.attention import flash3_available
    from engine.fast import wants_flash3
    from engine.models_dir import load_models, resolve_device
    from engine.render import Engine

    # engine.attention: fa3 that cannot run is a config error: say so before minutes of loading
    dev, dtype = resolve_device(options.device, options.dtype)
    fast = options.fast and dev.type == "cuda"
    fa3 = wants_flash3(options.attention, fast=fast, available=fast and flash3_available(dev), dtype=dtype)
    models = load_models(options)
    if fast:
        from engine.events import emit
        from engine.fast import compile_blocks, use_flash3

        # engine.fp8, if on, was applied by load_models while loading (models_dir._to_fp8)
        if fa3:
            use_flash3(models.dit)
        emit("engine.self_attention", kernel="fa3" if fa3 else "sdpa_cudnn_first",
             hint=None if fa3 or options.attention != "auto" else
             "on a Hopper GPU, FlashAttention-3 makes a forward faster (README 'Speed')")
        compile_blocks(models.dit)
    return Engine(models, cache_dir=options.cache_dir, version=__version__, fast=fast,
                  warm_buckets=tuple(options.warm_buckets) if fast else ())
