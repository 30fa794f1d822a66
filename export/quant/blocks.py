"""Block-quantized matrices in the form onnxruntime's MatMulNBits and GatherBlockQuantized hold.

A weight matrix ``W`` of shape (N outputs, K inputs) is cut along K into blocks of ``block``
values. Each block has a float32 scale, and the stored integers are unsigned ``bits``-bit
codes ``q`` with MatMulNBits' conventions:

    W[n, k] = scales[n, b] * (q[n, k] - zero_point[n, b]) + offsets[n, b],   b = k // block

``zero_point`` is ``zero_points`` when given (integers, stored packed like ``q``), else
onnxruntime's default ``2**(bits - 1)``. ``offsets`` (float32, one per block) are not part of
MatMulNBits: they are what affine GGUF formats (Q4_1, Q4_K, Q5_K...) add per block, and the
graph adds them as (per-block sums of the activations) @ offsets (see ``graph_ops``).

Everything a scheme produces is a ``BlockQuant``; the graph rewriter only needs this type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


@dataclass
class Factored:
    """A per-block float32 array stored the compact way GGUF stores it, rebuilt exactly when the session loads.

    value = coef * scales + sign * (outer repeated over ``per`` blocks) * inner, where ``outer`` holds
    float16-exact values (a K-quant super-block's d or dmin) and ``inner`` small integers (its 6-bit
    sub-block scales or mins); ``inner`` None means the term is ``outer`` itself (one per block). The
    graph computes it with the same float32 operations in the same order, so the rebuilt values are
    bit-identical to ``values()`` here, which the rewrite checks against the decoded array.
    """

    outer: np.ndarray
    """(N, blocks // per) float32, float16-exact."""
    inner: np.ndarray | None
    """(N, blocks) integers in int8 or uint8 range, or None."""
    per: int = 1
    sign: float = 1.0
    coef: float = 0.0

    def term(self) -> np.ndarray:
        outer = np.repeat(self.outer.astype(np.float32), self.per, axis=1)
        return outer if self.inner is None else outer * self.inner.astype(np.float32)

    def values(self, scales: np.ndarray | None = None) -> np.ndarray:
        term = self.term() if self.sign > 0 else -self.term()
        if not self.coef:
            return term
        return np.float32(self.coef) * scales + term

    def rows(self, rows: np.ndarray) -> "Factored":
        return Factored(self.outer[rows], None if self.inner is None else self.inner[rows], self.per, self.sign,
                        self.coef)

    @staticmethod
    def stack(items: list["Factored | None"]) -> "Factored | None":
        first = items[0]
        if first is None or any(f is None or (f.inner is None) != (first.inner is None) or
                                (f.per, f.sign, f.coef) != (first.per, first.sign, first.coef) for f in items):
            return None
        return Factored(np.concatenate([f.outer for f in items]),
                        None if first.inner is None else np.concatenate([f.inner for f in items]),
                        first.per, first.sign, first.coef)


class BitPlaneSplit(NamedTuple):
    """A matrix of 5-bit codes as a 4-bit part plus a bit plane (``BlockQuant.four_plus_one``)."""

    low: "BlockQuant"
    plane: np.ndarray
    """(N, K / 8) uint8: code k's high bit in bit k % 8 of byte k // 8."""
    zero_point: float
    """The plane's zero point h0: the high part's value is 16 * scale * (bit - h0)."""


@dataclass
class BlockQuant:
    q: np.ndarray
    """(N, K) uint8 codes, one per weight, in [0, 2**bits)."""
    scales: np.ndarray
    """(N, K // block) float32."""
    bits: int
    block: int
    zero_points: np.ndarray | None = None
    """(N, K // block) uint8 integer zero points, or None for the default 2**(bits - 1)."""
    offsets: np.ndarray | None = None
    """(N, K // block) float32 added per block, or None."""
    source: str = ""
    """Where it came from, for reports: "Q4_1", "int4 (searched)", ..."""
    exact_of: list[str] = field(default_factory=list)
    """Names of the source tensors whose values this holds exactly (GGUF carry-over), for reports."""
    scale_factors: Factored | None = None
    offset_factors: Factored | None = None
    """How GGUF stores ``scales`` / ``offsets`` compactly (K-quants, Q4_1); None: stored as float16 or float32."""

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if self.bits not in (2, 4, 8):
            raise ValueError(f"MatMulNBits holds 2, 4 or 8 bits, not {self.bits}")
        if k % self.block:
            raise ValueError(f"K={k} is not a multiple of the block size {self.block}")
        if self.scales.shape != (n, k // self.block):
            raise ValueError(f"scales have shape {self.scales.shape}, expected {(n, k // self.block)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def n_blocks(self) -> int:
        return self.q.shape[1] // self.block

    @property
    def kind(self) -> tuple[int, int, bool, bool]:
        """What must agree for two matrices to share one MatMulNBits node."""
        return self.bits, self.block, self.zero_points is not None, self.offsets is not None

    def zero_point_values(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points.astype(np.float32)
        return np.full(self.scales.shape, float(2 ** (self.bits - 1)), np.float32)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix the graph computes with (up to float32 rounding of the per-block terms)."""
        n, k = self.q.shape
        q = self.q.reshape(n, self.n_blocks, self.block).astype(np.float32)
        w = self.scales[..., None] * (q - self.zero_point_values()[..., None])
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(n, k)

    def packed(self) -> np.ndarray:
        """(N, K // block, block * bits / 8) uint8: MatMulNBits' B layout, low bits first."""
        return _pack(self.q, self.bits).reshape(self.q.shape[0], self.n_blocks, -1)

    def packed_zero_points(self) -> np.ndarray | None:
        """(N, ceil(n_blocks * bits / 8)) uint8, each row padded to whole bytes as MatMulNBits reads them."""
        if self.zero_points is None:
            return None
        per_byte = 8 // self.bits
        n, nb = self.zero_points.shape
        padded = np.zeros((n, -(-nb // per_byte) * per_byte), np.uint8)
        padded[:, :nb] = self.zero_points
        return _pack(padded, self.bits)

    def with_block(self, block: int) -> "BlockQuant":
        """The same values with smaller blocks (each scale repeated): lets differently blocked parts share a node."""
        if block == self.block:
            return self
        if self.block % block:
            raise ValueError(f"cannot split blocks of {self.block} into blocks of {block}")
        rep = self.block // block
        grow = (lambda a: None if a is None else np.repeat(a, rep, axis=1))
        return BlockQuant(self.q, np.repeat(self.scales, rep, axis=1), self.bits, block, grow(self.zero_points),
                          grow(self.offsets), self.source, list(self.exact_of))

    def with_bits(self, bits: int) -> "BlockQuant":
        """The same values held in more bits (codes and zero point shifted to the wider default)."""
        if bits == self.bits:
            return self
        if bits < self.bits:
            raise ValueError(f"cannot hold {self.bits}-bit codes in {bits} bits")
        shift = 2 ** (bits - 1) - 2 ** (self.bits - 1)
        q = (self.q.astype(np.int32) + shift).astype(np.uint8)
        zp = None if self.zero_points is None else (self.zero_points.astype(np.int32) + shift).astype(np.uint8)
        return BlockQuant(q, self.scales, bits, self.block, zp, self.offsets, self.source, list(self.exact_of))

    def with_offsets(self) -> "BlockQuant":
        """The same values with an explicit (zero) offset, so it can share a node with affine parts."""
        if self.offsets is not None:
            return self
        return BlockQuant(self.q, self.scales, self.bits, self.block, self.zero_points,
                          np.zeros_like(self.scales), self.source, list(self.exact_of))

    def with_zero_points(self) -> "BlockQuant":
        if self.zero_points is not None:
            return self
        zp = np.full(self.scales.shape, 2 ** (self.bits - 1), np.uint8)
        return BlockQuant(self.q, self.scales, self.bits, self.block, zp, self.offsets, self.source,
                          list(self.exact_of))

    def four_plus_two(self) -> tuple["BlockQuant", "BlockQuant"] | None:
        """The same values as a 4-bit part plus a 2-bit part (scale x16), when 8-bit codes span at most 64 levels.

        GGUF's 5- and 6-bit formats (Q5_0, Q6_K) have no MatMulNBits form below 8 bits, so their codes sit in
        8 bits. A table that is only looked up (an untied embedding) can hold them as 4 + 2 bits instead:
        with u = q - base = low + 16 * high, s * (q - z) = s * (low - zl) + 16 s * (high - zh) whenever
        zl + 16 zh = z - base. Both terms and their sum are small integers times the block's scale, so
        float32 computes them exactly, as it does s * (q - z). None when the codes span more (Q8_0), or
        the part has zero points or offsets of its own.
        """
        if self.bits != 8 or self.zero_points is not None or self.offsets is not None or not self.q.size:
            return None
        z = 2 ** (self.bits - 1)
        lo, hi = int(self.q.min()), int(self.q.max())
        base = z - (8 + 16 * 2)  # both parts at their default zero points (8 and 2): nothing stored for them
        if not (base <= lo and hi - base < 64):
            base = lo
        if hi - base >= 64 or not 0 <= z - base < 64:
            return None
        zl, zh = (z - base) % 16, (z - base) // 16
        zl, zh = (None if zl == 8 else zl), (None if zh == 2 else zh)
        u = self.q.astype(np.int16) - base
        full = (lambda value: None if value is None else np.full(self.scales.shape, value, np.uint8))
        low = BlockQuant((u & 15).astype(np.uint8), self.scales, 4, self.block, full(zl), None, self.source,
                         list(self.exact_of), self.scale_factors)
        high = BlockQuant((u >> 4).astype(np.uint8), self.scales * np.float32(16), 2, self.block, full(zh), None,
                          self.source, list(self.exact_of))
        return low, high

    def four_plus_one(self) -> BitPlaneSplit | None:
        """The same values as a 4-bit part plus a bit plane, when 8-bit codes span at most 32 levels (GGUF Q5_0).

        With u = q - base = low + 16 * high (base the smallest code, high 0 or 1):
        s * (q - z) = s * (low - 8) + 16 s * (high - h0), h0 = (z - base - 8) / 16. The low part keeps
        MatMulNBits' default zero point (nothing stored); h0 is a small dyadic number, so (high - h0) * 16 s
        is a small integer times the block's scale, which float32 holds exactly, as it holds the sum.
        Returns the low part, the plane and h0, or None when the codes span more, or the part has zero points or offsets of its own. GatherBlockQuantized's
        narrowest codes are 2 bits, so the plane is looked up by plain ONNX ops (``rewrite._Builder._gather_plane``).
        """
        if self.bits != 8 or self.zero_points is not None or self.offsets is not None or not self.q.size \
                or self.q.shape[1] % 8:
            return None
        base, hi = int(self.q.min()), int(self.q.max())
        if hi - base >= 32:
            return None
        u = self.q.astype(np.int16) - base
        low = BlockQuant((u & 15).astype(np.uint8), self.scales, 4, self.block, None, None, self.source,
                         list(self.exact_of), self.scale_factors)
        return BitPlaneSplit(low, _pack((u >> 4).astype(np.uint8), 1), (2 ** (self.bits - 1) - base - 8) / 16)

    def take_rows(self, rows: np.ndarray) -> "BlockQuant":
        """The rows ``rows`` of this matrix (a GGUF tensor's rows in the order a graph matrix holds them)."""
        pick = (lambda a: None if a is None else a[rows])
        return BlockQuant(self.q[rows], self.scales[rows], self.bits, self.block, pick(self.zero_points),
                          pick(self.offsets), self.source, list(self.exact_of),
                          None if self.scale_factors is None else self.scale_factors.rows(rows),
                          None if self.offset_factors is None else self.offset_factors.rows(rows))

    def nbytes(self) -> int:
        """Bytes the graph stores for this matrix."""
        size = self.q.size * self.bits // 8 + self.scales.nbytes
        if self.zero_points is not None:
            size += self.packed_zero_points().nbytes
        if self.offsets is not None:
            size += self.offsets.nbytes
        return size


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack (rows, cols) codes along cols, ``8 // bits`` per byte, the first in the lowest bits."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    per_byte = 8 // bits
    rows, cols = codes.shape
    grouped = codes.astype(np.uint8).reshape(rows, cols // per_byte, per_byte)
    out = np.zeros((rows, cols // per_byte), np.uint8)
    for i in range(per_byte):
        out |= grouped[:, :, i] << np.uint8(bits * i)
    return out


def common_form(parts: list[BlockQuant]) -> list[BlockQuant]:
    """The parts converted to one kind (widest bits, smallest block, zero points/offsets if any has them).

    Used only when parts of different kinds must share one node; the rewriter prefers one
    node per kind, so this is the fallback for small leftovers.
    """
    bits = max(p.bits for p in parts)
    block = min(p.block for p in parts)
    zp = any(p.zero_points is not None for p in parts)
    off = any(p.offsets is not None for p in parts)
    out = []
    for p in parts:
        p = p.with_bits(bits).with_block(block)
        if zp:
            p = p.with_zero_points()
        if off:
            p = p.with_offsets()
        out.append(p)
    return out


def concat_rows(parts: list[BlockQuant]) -> BlockQuant:
    """Stack parts of one kind along N (outputs): e.g. q, k and v of a fused projection."""
    kinds = {p.kind for p in parts}
    if len(kinds) != 1:
        raise ValueError(f"parts of different kinds cannot be stacked: {kinds}")
    first = parts[0]
    cat = (lambda name: None if getattr(first, name) is None else np.concatenate([getattr(p, name) for p in parts]))
    sources = sorted({p.source for p in parts})
    return BlockQuant(np.concatenate([p.q for p in parts]), np.concatenate([p.scales for p in parts]), first.bits,
                      first.block, cat("zero_points"), cat("offsets"), "+".join(sources),
                      [name for p in parts for name in p.exact_of],
                      Factored.stack([p.scale_factors for p in parts]),
                      Factored.stack([p.offset_factors for p in parts]) if first.offsets is not None else None)
