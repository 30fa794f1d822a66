"""Scheme ``int4``: 4-bit blocks whose scale and zero point are searched, not rounded from min/max.

Plain round-to-nearest takes each block's scale from its extremes, so one outlier stretches
the grid for the other 31 weights. Here, as llama.cpp does for its k-quants
(``make_qkx2_quants``), each block tries a range of scales around that first guess; for each,
the integer zero point that fits the block, the codes, and then the least-squares scale for
those codes; it keeps the one with the smallest error. The error is weighted by how much each
weight matters: the mean square of the activation it multiplies, measured on a built-in text
(``calibrate``), times the weight's own size (large weights hurt more when rounded).

Zero points are integers (uint4), the form MatMulNBits runs at full speed; float zero points
are exact but ~85x slower on CPUs. Everything, the embedding table and LM head included, is
4-bit with blocks of 32: the folder is about the size of onnxruntime-genai's int4 build.
"""

from __future__ import annotations

import numpy as np

from edgelm.export.quant.blocks import BlockQuant

BLOCK = 32
MAX_CODE = 15
import os
GRID = np.linspace(-float(os.environ.get("G", "0.12")), float(os.environ.get("G", "0.12")), int(os.environ.get("GN", "13")))
SHIFTS = (0.0,) if os.environ.get("SH", "0") == "0" else (-1.0, 0.0, 1.0)
WMODE = os.environ.get("WM", "sqrt")
"""Relative changes of the first-guess step (range / 15) that the search tries, as llama.cpp's rdelta grid."""
CHUNK_BLOCKS = 1 << 16


def _fit(x: np.ndarray, wt: np.ndarray, step: np.ndarray, lo: np.ndarray):
    """Codes, zero point and least-squares scale for blocks ``x`` (B, 32) given a step; and the weighted error."""
    zero = np.clip(np.rint(-lo / step), 0, MAX_CODE)
    q = np.clip(np.rint(x / step[:, None]) + zero[:, None], 0, MAX_CODE)
    c = q - zero[:, None]
    num = (wt * x * c).sum(axis=1)
    den = (wt * c * c).sum(axis=1)
    scale = np.where(den > 0, num / np.where(den > 0, den, 1.0), step)
    scale = scale.astype(np.float16).astype(np.float64)  # what the file stores (see rewrite._float)
    err = (wt * (x - scale[:, None] * c) ** 2).sum(axis=1)
    return q, zero, scale, err


def search_blocks(x: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 (B, 32), zero points uint8 (B,), scales float32 (B,)) minimising the weighted error."""
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = np.maximum(x.max(axis=1), 0.0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    best = None
    for delta in GRID:
        step = span / (MAX_CODE * (1 + delta))
        for shift in SHIFTS:
            fit = _fit(x, wt, step, lo + shift * step)
            if best is None:
                best = list(fit)
                continue
            better = fit[3] < best[3]
            for i in range(4):
                best[i][better] = fit[i][better]
    q, z, s, _ = best
    return q.astype(np.uint8), z.astype(np.uint8), s.astype(np.float32)


def quantize(w: np.ndarray, importance: np.ndarray | None, source: str = "int4 (searched)") -> BlockQuant:
    n, k = w.shape
    nb = k // BLOCK
    blocks = w.reshape(n * nb, BLOCK).astype(np.float64)
    imp = np.ones(k) if importance is None else np.maximum(importance.astype(np.float64), 1e-12)
    imp = np.broadcast_to(imp.reshape(1, nb, BLOCK), (n, nb, BLOCK)).reshape(n * nb, BLOCK)
    q = np.empty((n * nb, BLOCK), np.uint8)
    zero = np.empty(n * nb, np.uint8)
    scale = np.empty(n * nb, np.float32)
    for start in range(0, n * nb, CHUNK_BLOCKS):
        x = blocks[start:start + CHUNK_BLOCKS]
        sigma2 = (x * x).mean(axis=1, keepdims=True)
        wt = imp[start:start + CHUNK_BLOCKS] * (np.sqrt(sigma2 + x * x) if WMODE == "sqrt" else 1.0)
        q[start:start + CHUNK_BLOCKS], zero[start:start + CHUNK_BLOCKS], scale[start:start + CHUNK_BLOCKS] = \
            search_blocks(x, wt)
    return BlockQuant(q.reshape(n, k), scale.reshape(n, nb), 4, BLOCK, zero_points=zero.reshape(n, nb), source=source)


class Int4Scheme:
    name = "int4"

    def __init__(self, importance: dict[str, np.ndarray] | None = None):
        self.importance = importance or {}

    def matrix(self, w: np.ndarray, role: str, name: str) -> list[BlockQuant] | None:
        if w.shape[1] % BLOCK:
            return None
        if os.environ.get("EMB8") and role == "embedding":
            from edgelm.export.quant.int8 import symmetric
            return [symmetric(w, 8, 32, "int8")]
        imp = self.importance.get(name)
        if imp is not None and imp.shape[0] != w.shape[1]:
            imp = None
        return [quantize(w, imp)]
