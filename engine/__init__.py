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

    return Engine(load_models(options), cache_dir=options.cache_dir, version=__version__)
