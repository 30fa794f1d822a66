"""The KV cache between decoding steps, kept as onnxruntime OrtValues.

The graph returns ``present = concat(past, new)``; handing that OrtValue straight back as
the next step's ``past`` means Python never copies or converts the cache (on CUDA it never
leaves the GPU). Only reordering rows (beams) and cropping (assisted decoding) touch the
data, and only when they are asked for.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort


class KVCache:
    """Past keys and values of every layer for a batch of rows."""

    def __init__(self, names: Sequence[str], values: list[ort.OrtValue], device: str = "cpu", device_id: int = 0):
        self.names = list(names)
        self.values = values
        self.device = device
        self.device_id = device_id

    @classmethod
    def empty(cls, names: Sequence[str], batch: int, num_kv_heads: int, head_dim: int, dtype=np.float32,
              device: str = "cpu", device_id: int = 0) -> "KVCache":
        shape = [batch, num_kv_heads, 0, head_dim]
        if device == "cpu":
            make = lambda: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype))  # noqa: E731
        else:
            make = lambda: ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, device_id)  # noqa: E731
        return cls(names, [make() for _ in names], device, device_id)

    @property
    def length(self) -> int:
        return int(self.values[0].shape()[2]) if self.values else 0

    @property
    def batch(self) -> int:
        return int(self.values[0].shape()[0]) if self.values else 0

    def bind(self, binding: ort.IOBinding) -> None:
        for name, value in zip(self.names, self.values):
            binding.bind_ortvalue_input(name, value)

    def replace(self, presents: list[ort.OrtValue]) -> None:
        """Adopt the graph's presents as the next past (no copy)."""
        self.values = presents

    def _map(self, fn) -> None:
        out = []
        for v in self.values:
            arr = np.ascontiguousarray(fn(v.numpy()))
            out.append(ort.OrtValue.ortvalue_from_numpy(arr, self.device, self.device_id))
        self.values = out

    def reorder(self, rows: np.ndarray) -> None:
        """Gather rows (beam search picks which hypotheses survive)."""
        rows = np.asarray(rows)
        if rows.shape[0] == self.batch and np.array_equal(rows, np.arange(self.batch)):
            return
        self._map(lambda a: a[rows])

    def crop(self, length: int) -> None:
        """Drop cached positions past ``length`` (rejected draft tokens in assisted decoding)."""
        if length >= self.length:
            return
        self._map(lambda a: a[:, :, :length])

    def numpy(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.values]


class StaticKVCache:
    """Fixed-size cache buffers of a static-shape export; ``length`` counts the filled slots.

    The graph writes one slot per call and returns the whole buffer, which is bound back as the
    next past, so nothing is reallocated. Cropping only lowers ``length``: slots past it are
    masked out and overwritten by later tokens.
    """

    def __init__(self, names: Sequence[str], batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype=np.float32):
        self.names = list(names)
        self.capacity = capacity
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, num_kv_heads, capacity, head_dim), dtype))
                       for _ in names]
        self.length = 0
        self.mask = np.zeros((batch, capacity), dtype=np.int64)
        """Which slots hold real tokens (the graph's attention_mask over the whole buffer)."""

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    def bind(self, binding: ort.IOBinding) -> None:
        for name, value in zip(self.names, self.values):
            binding.bind_ortvalue_input(name, value)

    def replace(self, presents: list[ort.OrtValue]) -> None:
        self.values = presents

    def crop(self, length: int) -> None:
        if length < self.length:
            self.mask[:, length:] = 0
            self.length = length

    def reorder(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.shape[0] != self.batch:
            raise ValueError("a static cache cannot change its batch size")
        if np.array_equal(rows, np.arange(self.batch)):
            return
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows])) for v in self.values]
        self.mask = self.mask[rows]

    def numpy(self) -> list[np.ndarray]:
        return [v.numpy()[:, :, : self.length] for v in self.values]
