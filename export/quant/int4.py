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


class Int4SymmetricScheme(Int4Scheme):
    """``int4`` without zero points: every block uses MatMulNBits' default zero point, so the kernel has no
    zero points to read or apply; a decode step costs less (``benchmarks/run.sh`` measures how much, beside
    ``int4``) and the loss grows: on SmolLM2 a perplexity ratio of 1.114 against ``int4``'s 1.090 on the
    built-in text, 1.093 against 1.041 on the held-out one (``edgelm bench --reference``). Keeping zero points
    on the embedding / LM head table alone changed nothing (1.1141); keeping them on the down projections
    recovered a third of the difference (1.1064). Both were one-off exports while choosing, not schemes."""

    name = "int4-sym"
    shifts = None
    source = "int4 symmetric (searched)"

