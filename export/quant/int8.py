"""Scheme ``int8``: weight-only 8-bit blocks, symmetric round-to-nearest.

Every weight matrix, the LM head and the embedding table included, becomes MatMulNBits (or
GatherBlockQuantized) codes with one float32 scale per block of 32 inputs. With 255 levels a
block, round-to-nearest is already within a fraction of a percent of float32 in perplexity
(``edgelm export`` measures it on every export), so no search is spent here; activations stay
float32 and are quantized per block inside the kernel (``accuracy_level`` 4).
"""

from __future__ import annotations

import numpy as np

from edgelm.export.quant.blocks import BlockQuant

BLOCK = 32


def symmetric(w: np.ndarray, bits: int, block: int, source: str) -> BlockQuant:
    """Round-to-nearest with scale = max|w| / (2**(bits-1) - 1) per block; codes around the default zero point."""
    n, k = w.shape
    levels = 2 ** (bits - 1) - 1
    blocks = w.reshape(n, k // block, block)
    scale = np.abs(blocks).max(axis=2) / levels
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint(blocks / safe[..., None]), -levels, levels) + 2 ** (bits - 1)
    return BlockQuant(q.astype(np.uint8).reshape(n, k), scale.astype(np.float32), bits, block, source=source)


class Int8Scheme:
    name = "int8"

    def matrix(self, w: np.ndarray, role: str, name: str) -> list[BlockQuant] | None:
        if w.shape[1] % BLOCK:
            return None
        return [symmetric(w, 8, BLOCK, "int8 (symmetric, block 32)")]
