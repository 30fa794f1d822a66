"""Block scales and integer zero points found by search, not read off each block's extremes.

Round-to-nearest takes a block's step from its minimum and maximum, so one outlier stretches
the grid for the other weights of the block. Here, as llama.cpp does for its k-quants
(``make_qkx2_quants``), each block tries a range of steps around that first guess and, for
each, the integer zero point (and its neighbours), the codes, then the least-squares scale for
those codes; it keeps the fit with the smallest error. The error of each weight is weighted by
the mean square of the activation it multiplies on a built-in text (``calibrate``): rounding a
weight that meets large inputs costs more. Scales are rounded to float16 inside the search,
since that is what the file stores (``rewrite._float``).

Zero points are integers (MatMulNBits' packed uint zero points), the form its kernels run at
full speed; float zero points are exact but ~85x slower on CPUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.export.quant.blocks import BlockQuant

CHUNK_BLOCKS = 1 << 16


def _fit(x: np.ndarray, wt: np.ndarray, step: np.ndarray, lo: np.ndarray, max_code: int):
    """Codes, zero point and least-squares scale for blocks ``x`` (B, block) given a step; and the weighted error."""
    zero = np.clip(np.rint(-lo / step), 0, max_code)
    q = np.clip(np.rint(x / step[:, None]) + zero[:, None], 0, max_code)
    c = q - zero[:, None]
    num = (wt * x * c).sum(axis=1)
    den = (wt * c * c).sum(axis=1)
    scale = np.where(den > 0, num / np.where(den > 0, den, 1.0), step)
    scale = scale.astype(np.float16).astype(np.float64)
    err = (wt * (x - scale[:, None] * c) ** 2).sum(axis=1)
    return q, zero, scale, err


def search_blocks(x: np.ndarray, wt: np.ndarray, bits: int, grid: np.ndarray,
                  shifts: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 (B, block), zero points uint8 (B,), scales float32 (B,)) with the smallest weighted error."""
    max_code = 2 ** bits - 1
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = np.maximum(x.max(axis=1), 0.0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    best = None
    for delta in grid:
        step = span / (max_code * (1 + delta))
        for shift in shifts:
            fit = _fit(x, wt, step, lo + shift * step, max_code)
            if best is None:
                best = list(fit)
                continue
            better = fit[3] < best[3]
            for i in range(4):
                best[i][better] = fit[i][better]
    q, z, s, _ = best
    return q.astype(np.uint8), z.astype(np.uint8), s.astype(np.float32)


def quantize(w: np.ndarray, importance: np.ndarray | None, bits: int, block: int, grid: np.ndarray,
             shifts: tuple[float, ...], source: str) -> BlockQuant:
    """``w`` (N, K) -> ``bits``-bit blocks of ``block`` with integer zero points, searched per block."""
    n, k = w.shape
    nb = k // block
    blocks = w.reshape(n * nb, block).astype(np.float64)
    imp = np.ones(k) if importance is None else np.maximum(importance.astype(np.float64), 1e-12)
    imp = np.broadcast_to(imp.reshape(1, nb, block), (n, nb, block)).reshape(n * nb, block)
    q = np.empty((n * nb, block), np.uint8)
    zero = np.empty(n * nb, np.uint8)
    scale = np.empty(n * nb, np.float32)
    for start in range(0, n * nb, CHUNK_BLOCKS):
        end = start + CHUNK_BLOCKS
        q[start:end], zero[start:end], scale[start:end] = search_blocks(blocks[start:end], imp[start:end], bits, grid,
                                                                        shifts)
    return BlockQuant(q.reshape(n, k), scale.reshape(n, nb), bits, block, zero_points=zero.reshape(n, nb),
                      source=source)


class SearchedScheme:
    """Every matrix whose input size is a multiple of the block, quantized by ``quantize``; with ``gptq``, the
    matrices whose calibration inputs are known get their codes from ``gptq.quantize`` instead."""

    name = "searched"
    bits = 4
    block = 32
    grid = np.zeros(1)
    shifts: tuple[float, ...] = (0.0,)
    linear_block: int | None = None
    """Block size of the layers' matrices where it differs from ``block`` (which the embedding / LM head keeps)."""
    source = ""
    gptq = False
    smooth_alpha: float | None = None
    """SmoothQuant's alpha for the normalized layer inputs (``smooth``), applied before quantizing; None: not."""

    def __init__(self, activations: dict[str, np.ndarray] | None = None):
        self.activations = activations or {}
        """weight name -> the calibration activations it multiplies, (tokens, K); weights that read the same
        activation share one array."""
        self._prepared: tuple[np.ndarray, Any] | None = None
        """The last activation array GPTQ prepared and what it made of it (gate and up come one after the other)."""

    def _block(self, k: int, role: str) -> int:
        """The block for a matrix of ``k`` inputs: for a layer's matrix ``linear_block``, halved until it divides
        ``k`` (SmolLM2's 576 inputs take 64 when 128 is asked for), never below ``block``; else ``block``."""
        block = self.linear_block if role == "linear" and self.linear_block else self.block
        while block > self.block and k % block:
            block //= 2
        return self.block if k % block else block

    def matrix(self, w: np.ndarray, role: str, name: str) -> list[BlockQuant] | None:
        block = self._block(w.shape[1], role)
        if w.shape[1] % block:
            return None
        x = self.activations.get(name)
        if x is not None and x.shape[1] != w.shape[1]:
            x = None
        if self.gptq and x is not None:
            # A tied table is also the embedding, looked up row by row, and GPTQ fits it to the head's
            # inputs; it still paid on SmolLM2 (the table alone cost 3.4% instead of 4.8%, a one-off
            # measurement while choosing, as in gptq.SHRINK).
            from edgelm.export.quant import gptq

            if self._prepared is None or self._prepared[0] is not x:
                self._prepared = (x, gptq.Inputs(gptq.hessian(x)))
            return [gptq.quantize(w, self._prepared[1], self.bits, block, self.grid, self.shifts,
                                  self.source + " + GPTQ")]
        imp = None if x is None else (x.astype(np.float64) ** 2).mean(axis=0)
        return [quantize(w, imp, self.bits, block, self.grid, self.shifts, self.source)]
