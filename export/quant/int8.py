"""Scheme ``int8``: weight-only 8-bit blocks with integer zero points, searched per block.

Every weight matrix, the LM head and the embedding table included, becomes MatMulNBits (or
GatherBlockQuantized) codes. Asymmetric blocks use all 256 levels over each block's range, the
scale search (``search``, a narrow grid: at 8 bits the first guess is nearly right) trims the
rest, and GPTQ (``gptq``) picks the codes: on SmolLM2's built-in text 0.1% perplexity, against
0.5% for the search alone and 0.8% for symmetric round-to-nearest, at the same size and speed.

The layers' matrices take blocks of 64, the embedding / LM head table blocks of 32. A decode
step reads every weight's byte plus its block's scale (float32 once loaded) and zero point, so
64 reads about 5% fewer bytes, and onnxruntime's kernel does half the per-block work: SmolLM2's
bare graph ran 1.09x faster than with 32 everywhere (``bench_graph --interleaved``, controls
within 1.5% of 1) for a perplexity ratio of 1.0025 instead of 1.0010 (1.0033 held out;
onnxruntime-genai's int8: 1.0034). The table at 64 too cost 1.0080 (an earlier one-off
export): its rows are what the logits are made of, so it keeps 32.

Before any of that, the normalized inputs of the q/k/v and gate/up products are smoothed
(``smooth``, alpha 0.7): what 8-bit weights lose is small next to what onnxruntime's int8
activations lose, and smoothing moves the activations' outlier channels into the weights, which
have bits to spare. ``benchmarks/smooth_sweep.py`` on SmolLM2, one export per alpha (mean KL
divergence from the float32 graph per token, built-in / held-out text; an AVX-512 host, 2026-12-08):
0.0054 / 0.0052 without, 0.0041 / 0.0043 at alpha 0.3, 0.0033 / 0.0032 at 0.5, 0.0028 / 0.0027 at
0.7, 0.0027 / 0.0027 at 0.85, 0.0029 / 0.0029 at 1; the unsmoothed weights computed in float32,
0.0005 (an AVX2 host read the same within 0.0002). Perplexity ratios on 1,452 tokens move by a few
tenths of a percent between such exports whatever the change (1.0025 to 1.0064 in that sweep, even
last-bit changes of the scales move them), so the choice rests on the divergence; 0.85 is no better
held out and its weights carry more of the outliers.
"""

from __future__ import annotations

import numpy as np

from edgelm.export.quant.search import SearchedScheme


class Int8Scheme(SearchedScheme):
    name = "int8"
    bits = 8
    block = 32
    linear_block = 64
    grid = np.linspace(-0.02, 0.02, 5)
    source = "int8 (searched)"
    gptq = True
    smooth_alpha = 0.7
