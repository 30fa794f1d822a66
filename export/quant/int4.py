"""Scheme ``int4``: 4-bit blocks of 32 with integer zero points, searched per block, codes rounded by GPTQ.

See ``search`` for the block search and ``gptq`` for the rounding. On SmolLM2's built-in quality
text the perplexity loss is 56% with plain round-to-nearest, 14% with the search alone and 9% with
the search and GPTQ (``edgelm export`` prints the figure for every export).
Everything, the embedding table and LM head included, is 4-bit: the folder is smaller than
onnxruntime-genai's int4 build of the same model (float16 scales, folded to float32 at load).
"""

from __future__ import annotations

import numpy as np

from edgelm.export.quant.search import SearchedScheme


class Int4Scheme(SearchedScheme):
    name = "int4"
    bits = 4
    block = 32
    grid = np.linspace(-0.12, 0.12, 13)
    """Relative changes of the first-guess step (range / 15) that the search tries (llama.cpp's rdelta grid)."""
    shifts = (-1.0, 0.0, 1.0)
    """Zero points tried around the one the step implies."""
    source = "int4 (searched)"
    gptq = True
