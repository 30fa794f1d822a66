"""A GGUF file's tensor table and a few metadata values, read without building every metadata field.

The ``gguf`` package's ``GGUFReader`` turns every metadata value into numpy views, which for a
262k-token vocabulary (Gemma 3) takes minutes in Python; the exporter only needs the tensors and
``general.name``/``general.alignment``. This reads the header, skips the metadata (string arrays by
their lengths), reads the tensor infos and memory-maps the data. Tensor types and shapes follow the
GGUF specification (v2/v3, little-endian); block sizes come from the ``gguf`` package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.runtime.errors import ExportError

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]
    """Numpy order (rows, ..., row length): GGUF lists dimensions innermost first."""
    data: np.ndarray
    """(rows, bytes per row) uint8 for block formats, memory-mapped."""


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return text

    def value(self, kind: int, keep: bool):
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])
        if kind == _STRING:
            return self.string() if keep else self._skip_string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALAR:
                self.pos += struct.calcsize(_SCALAR[item]) * count
            else:
                for _ in range(count):
                    self.value(item, keep=False)
            return None
        raise ExportError(f"unknown GGUF metadata type {kind}: the file is damaged or newer than this reader")

    def _skip_string(self) -> None:
        length = self.unpack("<Q")  # (not `self.pos += self.unpack(...)`: that would add to the old position)
        self.pos += length


def read(path: str | Path) -> tuple[dict[str, object], list[GGUFTensor]]:
    """(the scalar and string metadata, the tensors) of a GGUF file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(raw))
    try:
        if bytes(raw[:4]) != b"GGUF":
            raise ExportError(f"{path} is not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.unpack("<I")
        if version < 2:
            raise ExportError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"), keep=True)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            kind, offset = cur.unpack("<I"), cur.unpack("<Q")
            infos.append((name, dims, kind, offset))
    except struct.error as exc:
        raise ExportError(f"{path} ends inside its header ({exc}): the file is truncated") from None
    align = int(meta.get("general.alignment") or 32)
    start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, kind, offset in infos:
        qtype = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        row_bytes = shape[-1] // block * size
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        begin = start + offset
        if begin + rows * row_bytes > raw.size:
            raise ExportError(f"{path} is truncated: tensor {name} runs past the end of the file")
        tensors.append(GGUFTensor(name, qtype.name, shape, raw[begin:begin + rows * row_bytes].reshape(rows, row_bytes)))
    return meta, tensors
