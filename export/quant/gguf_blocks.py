"""GGUF block formats rewritten, without loss, as MatMulNBits blocks.

Every GGML block format that llama.cpp's Q4/Q5/Q6/Q8 files use is affine per (sub-)block:
the weights of one sub-block are ``scale * integer + constant``. Each decoder below reads a
tensor's raw blocks and returns the same numbers as a ``BlockQuant``: the integer codes
(shifted to MatMulNBits' unsigned convention), the float32 scale of each sub-block as GGML
computes it (the fp16 super-scale times the sub-block's integer scale), and a float32 offset
where the format has one. ``BlockQuant.dequantize`` then equals the ``gguf`` package's own
dequantization to float32 rounding (tests compare every format tensor by tensor).

How each format maps (``zp`` = MatMulNBits' default zero point, 8 for 4 bits, 128 for 8 bits):

==========  ==========================  =====================================
format      GGML                        here
==========  ==========================  =====================================
Q4_0        d * (q - 8), q in 0..15     4 bits, block 32, codes as stored
Q4_1        d * q + m                   4 bits, block 32, offset m + 8d
Q5_0        d * (q - 16), q in 0..31    8 bits, block 32, code q + 112
Q5_1        d * q + m                   8 bits, block 32, code q + 128, offset m
Q8_0        d * q, q in -128..127       8 bits, block 32, code q + 128
Q2_K        d*sc * q - dmin*m (16s)     4 bits, block 16, code q + 8, offset -dmin*m
Q3_K        d*(sc - 32) * q (16s)       4 bits, block 16, code q + 8
Q4_K        d*sc * q - dmin*m (32s)     4 bits, block 32, offset 8*d*sc - dmin*m
Q5_K        d*sc * q - dmin*m (32s)     8 bits, block 32, code q + 128, offset -dmin*m
Q6_K        d*sc * (q - 32) (16s)       8 bits, block 16, code q + 96
==========  ==========================  =====================================

K-quant scales and mins are kept as GGUF keeps them (an fp16 super-block scale times small integer
sub-block scales: ``blocks.Factored``) and multiplied out, bit for bit, when the session loads;
Q4_1's offset likewise from its fp16 min. Five-bit formats take 8-bit codes (MatMulNBits holds 2, 4 or 8 bits): exact, but larger than
the GGUF (9 bits a weight for Q5_0 instead of 5.5). The layouts follow ggml's
``ggml-common.h`` block structs, as the ``gguf`` package's reference decoders read them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgelm.export.quant.blocks import BlockQuant, Factored

QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32 via fp16, as ggml reads its scales."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes of a 32-block -> (n, 32): low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _q5_high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32): bit j is element j's fifth bit."""
    bits = np.ascontiguousarray(qh).view(np.uint32)
    return ((bits >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def _q4_0(b: np.ndarray):
    d, qs = b[:, :2], b[:, 2:]
    return _nibbles(qs), _f16(d), None, 4, 32, {}


def _q4_1(b: np.ndarray):
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    return _nibbles(qs), d, m + np.float32(8) * d, 4, 32, {"offset": (m, None, 1, 1.0, 8.0)}


def _q5_0(b: np.ndarray):
    d, qh, qs = _f16(b[:, :2]), b[:, 2:6], b[:, 6:]
    q = _nibbles(qs) | (_q5_high_bits(qh) << np.uint8(4))
    return q + np.uint8(112), d, None, 8, 32, {}


def _q5_1(b: np.ndarray):
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:8], b[:, 8:]
    q = _nibbles(qs) | (_q5_high_bits(qh) << np.uint8(4))
    return q + np.uint8(128), d, m, 8, 32, {}


def _q8_0(b: np.ndarray):
    d, qs = _f16(b[:, :2]), b[:, 2:]
    return qs ^ np.uint8(0x80), d, None, 8, 32, {}


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray):
    n = b.shape[0]
    d, dmin, scales, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:]
    sc, mn = _k_scale_min(scales)
    scale = d * sc
    # 32-byte chunks: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
    chunks = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (chunks & np.uint8(0x0F)).reshape(n, QK_K)
    return q, scale, np.float32(8) * scale - dmin * mn, 4, 32, {"scale": (d, sc, 8), "offset": (dmin, mn, 8, -1.0, 8.0)}


def _q5_k(b: np.ndarray):
    n = b.shape[0]
    d, dmin, scales, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:16], b[:, 16:48], b[:, 48:]
    sc, mn = _k_scale_min(scales)
    low = (qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    high = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    q = low.reshape(n, 8, 32) | (high << np.uint8(4))
    return (q.reshape(n, QK_K) + np.uint8(128), d * sc, -(dmin * mn), 8, 32,
            {"scale": (d, sc, 8), "offset": (dmin, mn, 8, -1.0, 0.0)})


def _q6_k(b: np.ndarray):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    sc = np.ascontiguousarray(scales).view(np.int8).astype(np.float32)
    low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(0x03)
    q = low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << np.uint8(4))  # 0..63, value q - 32
    return q.reshape(n, QK_K) + np.uint8(96), d * sc, None, 8, 16, {"scale": (d, sc, 16)}


def _q2_k(b: np.ndarray):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    sc, mn = (scales & np.uint8(0x0F)).astype(np.float32), (scales >> np.uint8(4)).astype(np.float32)
    dl, ml = d * sc, dmin * mn
    q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    return (q.reshape(n, QK_K) + np.uint8(8), dl, -ml, 4, 16,
            {"scale": (d, sc, 16), "offset": (dmin, mn, 16, -1.0, 0.0)})


def _q3_k(b: np.ndarray):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low, high = scales[:, :8], scales[:, 8:]
    lo = (low.reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16) & np.uint8(0x0F)
    hi = (high.reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16) & np.uint8(0x03)
    sc = ((lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    qh = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    q = ql.reshape(n, QK_K).astype(np.int16) - ((qh.reshape(n, QK_K) ^ np.uint8(1)).astype(np.int16) << 2)
    return (q + 8).astype(np.uint8), d * sc, None, 4, 16, {"scale": (d, sc, 16)}


DECODERS: dict[str, tuple[int, int, Callable]] = {
    # name: (weights per GGML block, bytes per GGML block, decoder)
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0),
    "Q2_K": (QK_K, 84, _q2_k),
    "Q3_K": (QK_K, 110, _q3_k),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}


def supported(type_name: str) -> bool:
    return type_name in DECODERS


def decode(type_name: str, raw: np.ndarray, name: str = "") -> BlockQuant:
    """A GGUF tensor's raw blocks, (rows, bytes per row) uint8, as a BlockQuant of (rows, row length)."""
    per_block, size, fn = DECODERS[type_name]
    rows = raw.shape[0]
    if raw.shape[1] % size:
        raise ValueError(f"{name}: a {type_name} row has {raw.shape[1]} bytes, not a multiple of {size}")
    cols = raw.shape[1] // size * per_block
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, size)
    q, scales, offsets, bits, sub, factors = fn(blocks)
    per_row = cols // sub

    def factored(outer: np.ndarray, inner: np.ndarray | None, per: int, sign: float = 1.0,
                 coef: float = 0.0) -> Factored:
        return Factored(np.ascontiguousarray(outer, np.float32).reshape(rows, per_row // per),
                        None if inner is None else np.ascontiguousarray(inner).reshape(rows, per_row).astype(
                            np.int8 if np.asarray(inner).min() < 0 else np.uint8), per, sign, coef)

    return BlockQuant(
        q=np.ascontiguousarray(q, dtype=np.uint8).reshape(rows, cols),
        scales=np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, per_row),
        bits=bits, block=sub,
        offsets=None if offsets is None else np.ascontiguousarray(offsets, dtype=np.float32).reshape(rows, per_row),
        source=type_name, exact_of=[name] if name else [],
        scale_factors=factored(*factors["scale"]) if "scale" in factors else None,
        offset_factors=factored(*factors["offset"]) if "offset" in factors else None)
