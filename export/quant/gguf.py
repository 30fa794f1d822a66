"""Scheme ``gguf``: the GGUF file's own quantized weights, carried into the graph exactly.

transformers loads a GGUF by dequantizing it (and, for Llama, permuting q/k rows back to its
rotary layout); the traced graph then holds those float32 matrices, maybe stacked (q, k and v
in one fused projection). Rather than trusting tensor names through all that, each row of a
graph matrix is looked up by its *values* among the rows of the GGUF's quantized tensors
(dequantized with the ``gguf`` package, the same code transformers used). A matrix whose
every row is found is rebuilt from the GGUF's raw blocks (``gguf_blocks``), in whatever row
order and stacking the graph has, and checked: the rebuilt weights must equal the graph's
float32 weights to float32 rounding, or the export stops. Matrices with rows not found (F16
or F32 tensors, formats with no exact MatMulNBits form such as the IQ family) stay float32
and are listed in the report.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from edgelm.export.quant.blocks import BlockQuant
from edgelm.export.quant.gguf_blocks import decode, supported
from edgelm.runtime.errors import ExportError

CHUNK_ROWS = 8192
EXACT_RTOL = 4e-6
"""Rebuilt weights may differ from the dequantized float32 ones only by float32 rounding of the
per-block terms (a few ulp of the block's largest value); anything more is a bug, not noise."""


def row_keys(w: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint per row of a float32 matrix (equal rows, equal keys; -0.0 counts as 0.0)."""
    rows, cols = w.shape
    coef = np.random.default_rng(cols).integers(1, 2**63, size=cols, dtype=np.uint64) | np.uint64(1)
    keys = np.empty(rows, np.uint64)
    for start in range(0, rows, CHUNK_ROWS):
        chunk = np.ascontiguousarray(w[start:start + CHUNK_ROWS], dtype=np.float32) + np.float32(0.0)
        bits = chunk.view(np.uint32).astype(np.uint64)
        keys[start:start + CHUNK_ROWS] = (bits * coef).sum(axis=1, dtype=np.uint64)
    return keys


class GGUFScheme:
    """Looks up graph matrices among a GGUF file's quantized tensors and rebuilds them from its blocks."""

    name = "gguf"

    def __init__(self, path: str | Path, log: Callable[[str], None] = print):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        from edgelm.export.quant import gguf_file

        self.path = Path(path)
        _, tensors = gguf_file.read(self.path)
        self.tensors = {}
        self.unsupported: dict[str, str] = {}
        keys, owners, rows = [], [], []
        for tensor in tensors:
            kind = tensor.type_name
            if len(tensor.shape) != 2 or kind in ("F32", "F16", "BF16", "F64"):
                continue
            if not supported(kind):
                self.unsupported[tensor.name] = kind
                continue
            index = len(self.tensors)
            self.tensors[index] = tensor
            data = tensor.data
            for start in range(0, data.shape[0], CHUNK_ROWS):
                part = dequantize(np.asarray(data[start:start + CHUNK_ROWS]), GGMLQuantizationType[kind])
                keys.append(row_keys(part))
            n = data.shape[0]
            owners.append(np.full(n, index, np.int32))
            rows.append(np.arange(n, dtype=np.int64))
        if not self.tensors:
            raise ExportError(f"{self.path} holds no quantized matrices that --quantize gguf can carry over "
                              f"(formats seen: {sorted(set(self.unsupported.values())) or 'float only'}); "
                              "use --quantize int8 or int4")
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")
        self.keys = all_keys[order]
        self.owner = np.concatenate(owners)[order]
        self.row = np.concatenate(rows)[order]
        self._decoded: OrderedDict[int, BlockQuant] = OrderedDict()
        self.max_rel_diff = 0.0
        formats = sorted({t.type_name for t in self.tensors.values()})
        log(f"      GGUF: {len(self.tensors)} quantized matrices ({', '.join(formats)}) indexed by row")
        if self.unsupported:
            log(f"      GGUF: {len(self.unsupported)} tensors in formats with no exact MatMulNBits form "
                f"({', '.join(sorted(set(self.unsupported.values())))}) stay float32")

    def _decode(self, index: int) -> BlockQuant:
        if index not in self._decoded:
            tensor = self.tensors[index]
            self._decoded[index] = decode(tensor.type_name, np.asarray(tensor.data), tensor.name)
            while len(self._decoded) > 4:  # q, k, v (+1): enough for a fused projection, bounded memory
                self._decoded.popitem(last=False)
        return self._decoded[index]

    def locate(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(tensor index, row) in the GGUF for every row of ``w``, or None if any row is not there."""
        keys = row_keys(w)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        if not np.array_equal(self.keys[pos], keys):
            return None
        return self.owner[pos], self.row[pos]

    def matrix(self, w: np.ndarray, role: str, name: str) -> list[BlockQuant] | None:
        found = self.locate(w)
        if found is None:
            return None
        owners, rows = found
        parts = []
        start = 0
        n = len(owners)
        while start < n:
            end = start + 1
            while end < n and owners[end] == owners[start]:
                end += 1
            whole = self._decode(int(owners[start]))
            parts.append(whole.take_rows(rows[start:end]))
            start = end
        self._check(w, parts, name)
        return parts

    def _check(self, w: np.ndarray, parts: list[BlockQuant], name: str) -> None:
        start = 0
        for part in parts:
            n = part.shape[0]
            for lo in range(0, n, CHUNK_ROWS):
                hi = min(n, lo + CHUNK_ROWS)
                sub = part.take_rows(np.arange(lo, hi))
                ref = w[start + lo:start + hi]
                scale = max(float(np.abs(ref).max()), 1e-30)
                rel = float(np.abs(sub.dequantize() - ref).max()) / scale
                self.max_rel_diff = max(self.max_rel_diff, rel)
                if rel > EXACT_RTOL:
                    raise ExportError(
                        f"the GGUF blocks of {', '.join(part.exact_of)} rebuild {name} with a relative difference of "
                        f"{rel:.1e}: the carry-over is not exact for format {part.source} (please report this); "
                        "--quantize int8 exports the model without it")
            start += n

