"""The KV cache between decoding steps, kept as onnxruntime OrtValues.

The graph returns ``present = concat(past, new)``; handing that OrtValue straight back as
the next step's ``past`` means Python never copies or converts the cache (on CUDA it never
leaves the GPU). Only reordering rows (beams) and cropping (assisted decoding) touch the
data, and only when they are asked for.

The values are onnxruntime's C-level OrtValues (``OrtValue._ortvalue``), bound straight into
the C-level IOBinding: the Python wrappers re-validate and re-wrap 2 x layers values per
step, which shows in ``edgelm bench``'s "Python overhead" line on small quantized models.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort


def owned(arr: np.ndarray, device: str = "cpu", device_id: int = 0):
    """A C-level OrtValue holding a copy of ``arr`` in memory onnxruntime owns.

    ``OrtValue.ortvalue_from_numpy`` wraps the numpy buffer without copying and keeps it alive
    through the Python wrapper only; the C-level value must not outlive the wrapper's array.
    """
    arr = np.ascontiguousarray(arr)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype, device, device_id)
    if arr.size:
        value.update_inplace(arr)
    return value._ortvalue


def _bind_past(binding: ort.IOBinding, names: Sequence[str], values: list, present_names: Sequence[str],
               device: object) -> None:
    """Past values as inputs; presents left for onnxruntime to allocate on ``device``."""
    raw = binding._iobinding
    for name, value in zip(names, values):
        raw.bind_ortvalue_input(name, value)
    for name in present_names:
        raw.bind_output(name, device)


def fresh_binding(session: ort.InferenceSession) -> tuple[ort.IOBinding, bool]:
    """A new IOBinding for one run; False: it is not kept for the next step."""
    return session.io_binding(), False


def _presents(outputs, first: int) -> list:
    return [outputs[i] for i in range(first, len(outputs))]


class KVCache:
    """Past keys and values of every layer for a batch of rows."""

    def __init__(self, names: Sequence[str], values: list, device: str = "cpu", device_id: int = 0):
        self.names = list(names)
        self.values = values
        self.device = device
        self.device_id = device_id

    @classmethod
    def empty(cls, names: Sequence[str], batch: int, num_kv_heads: int, head_dim: int, dtype=np.float32,
              device: str = "cpu", device_id: int = 0) -> "KVCache":
        shape = [batch, num_kv_heads, 0, head_dim]
        return cls(names, [owned(np.zeros(shape, dtype=dtype), device, device_id) for _ in names], device, device_id)

    @property
    def length(self) -> int:
        return int(self.values[0].shape()[2]) if self.values else 0

    @property
    def batch(self) -> int:
        return int(self.values[0].shape()[0]) if self.values else 0

    def binding(self, session: ort.InferenceSession) -> tuple[ort.IOBinding, bool]:
        """A new binding per run: the presents are new values every step."""
        return fresh_binding(session)

    def bind(self, binding: ort.IOBinding, present_names: Sequence[str] = (), device: object = None,
             new: int = 0) -> None:
        """Bind the past; presents are bound to ``device`` for onnxruntime to allocate (concat grows them)."""
        _bind_past(binding, self.names, self.values, present_names, device)

    def adopt(self, outputs, first: int, new: int) -> None:
        """Take the graph's presents (C-level OrtValues, ``outputs[first:]``) as the next past: no copy."""
        self.values = _presents(outputs, first)

    def gathered(self, rows: np.ndarray) -> "KVCache":
        """A new cache holding ``rows`` of this one (contrastive search's candidates)."""
        out = KVCache(self.names, list(self.values), self.device, self.device_id)
        out._map(lambda a: a[np.asarray(rows)])
        return out

    def _map(self, fn) -> None:
        out = []
        for v in self.values:
            arr = np.ascontiguousarray(fn(v.numpy()))
            out.append(owned(arr, self.device, self.device_id))
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


class SharedKVCache:
    """Past and present in one buffer, for graphs with GroupQueryAttention (``edgelm export`` fused graphs).

    GroupQueryAttention writes the new keys/values in place when the present output is bound to
    the past input's buffer, and reads only ``total_sequence_length`` slots of it, which the
    graph takes from the attention mask's width. So nothing is concatenated or copied per step:
    the step's cost no longer grows with the length (the concat copied the whole cache every
    step), and cropping is free. Buffers grow (doubling, one copy) when a step would overflow.

    Since the buffers stay the same from step to step, so does their binding: the cache keeps one
    IOBinding and binds its 2 x layers values once (again only after growing or reordering), and
    each step rebinds just the token inputs and the logits. Binding 60 values per step cost ~3% of
    a quantized SmolLM2 step.

    On the CPU every layer's buffer is a slice of one numpy array (``store``, (2 x layers, batch,
    heads, capacity, head_dim)) that the OrtValues wrap without copying: beam search's per-step
    reorder is then one numpy operation over the moved rows and filled slots of all layers, in
    place, with the binding left as it is (per buffer, the 60 calls cost SmolLM2's 4 beams ~2 ms a
    step; new buffers per step, twice that and a rebind).
    """

    def __init__(self, names: Sequence[str], present_names: Sequence[str], store: np.ndarray, device: str = "cpu",
                 device_id: int = 0, length: int = 0):
        """``store`` (2 x layers, batch, heads, capacity, head_dim) holds the buffers and decides every dimension."""
        self.names = list(names)
        self.present_names = list(present_names)
        self.device, self.device_id, self.dtype = device, device_id, store.dtype
        self.length = length
        self.store: np.ndarray | None = None
        """The CPU buffers of every layer, which ``values`` wrap (None on other devices)."""
        self.dims: tuple[int, ...] = ()
        """The buffers' (2 x layers, batch, heads, capacity, head_dim), wherever they lie."""
        self.values: list = []
        self._binding: ort.IOBinding | None = None
        self._session: ort.InferenceSession | None = None
        self._bound = False
        """Whether ``self.values`` are bound in ``self._binding`` as they are now."""
        self._adopt(store)

    @classmethod
    def empty(cls, names: Sequence[str], present_names: Sequence[str], batch: int, num_kv_heads: int, head_dim: int,
              capacity: int = 256, device: str = "cpu", device_id: int = 0, dtype=np.float32) -> "SharedKVCache":
        return cls(names, present_names, np.zeros((len(names), batch, num_kv_heads, capacity, head_dim), dtype),
                   device, device_id)

    def _adopt(self, store: np.ndarray) -> None:
        """Take ``store`` as the buffers: wrapped where it lies on the CPU (the OrtValues live no longer than
        ``self.store``, which this object keeps), copied elsewhere."""
        if store.shape[0] != len(self.names):
            raise ValueError(f"a cache store of {store.shape[0]} buffers for {len(self.names)} past inputs")
        self.dims = tuple(int(d) for d in store.shape)
        if self.device == "cpu":
            self.store = np.ascontiguousarray(store)
            self.values = [ort.OrtValue.ortvalue_from_numpy(self.store[i])._ortvalue for i in range(len(self.names))]
        else:
            self.store = None
            self.values = [owned(store[i], self.device, self.device_id) for i in range(len(self.names))]
        self._bound = False

    def _stacked(self) -> np.ndarray:
        """Every layer's buffer as one (2 x layers, batch, heads, capacity, head_dim) array (a copy off the CPU)."""
        return self.store if self.store is not None else np.stack([v.numpy() for v in self.values])

    @property
    def batch(self) -> int:
        return self.dims[1]

    @property
    def capacity(self) -> int:
        return self.dims[3]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        old = self._stacked()
        grown = np.zeros((*old.shape[:3], capacity, old.shape[4]), self.dtype)
        grown[:, :, :, : self.length] = old[:, :, :, : self.length]
        self._adopt(grown)

    def binding(self, session: ort.InferenceSession) -> tuple[ort.IOBinding, bool]:
        """This cache's own binding for ``session``, kept from step to step (True); ``bind`` fills in the buffers
        only when they are not bound in it yet."""
        if self._binding is None or self._session is not session:
            self._binding, self._session, self._bound = session.io_binding(), session, False
        return self._binding, True

    def bind(self, binding: ort.IOBinding, present_names: Sequence[str] = (), device: object = None,
             new: int = 0) -> None:
        if self.length + new > self.capacity:
            self._grow(self.length + new)
        if binding is self._binding and self._bound:
            return
        raw = binding._iobinding
        for name, present, value in zip(self.names, self.present_names, self.values):
            raw.bind_ortvalue_input(name, value)
            raw.bind_ortvalue_output(present, value)
        self._bound = binding is self._binding

    def adopt(self, outputs, first: int, new: int) -> None:
        """The graph wrote the new slots in place: nothing to take (``outputs`` may be None: the decoder need not
        collect them for this cache)."""
        self.length += new

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def reorder(self, rows: np.ndarray) -> None:
        """Rows ``rows`` of the cache (beam search, once per step): on the CPU with the batch size unchanged, the
        moved rows' filled slots rewritten in place (the binding stays valid); else new buffers."""
        rows = np.asarray(rows)
        if rows.shape[0] == self.batch and np.array_equal(rows, np.arange(self.batch)):
            return
        if rows.shape[0] == self.batch and self.store is not None:
            moved = np.flatnonzero(rows != np.arange(self.batch))
            n = self.length
            self.store[:, moved, :, :n] = self.store[:, rows[moved], :, :n]  # the right side is gathered first
            return
        self._adopt(self._stacked()[:, rows])
        self._binding = None  # the batch size may have changed: a new binding, not a rebind

    def gathered(self, rows: np.ndarray) -> "SharedKVCache":
        """A new cache with its own buffers holding ``rows`` (the graph writes in place: never share them)."""
        rows = np.asarray(rows)
        return SharedKVCache(self.names, self.present_names, self._stacked()[:, rows], self.device, self.device_id,
                             self.length)

    def numpy(self) -> list[np.ndarray]:
        return [v.numpy()[:, :, : self.length] for v in self.values]


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
        self.values = [owned(np.zeros((batch, num_kv_heads, capacity, head_dim), dtype)) for _ in names]
        self.length = 0
        self.mask = np.zeros((batch, capacity), dtype=np.int64)
        """Which slots hold real tokens (the graph's attention_mask over the whole buffer)."""

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    def binding(self, session: ort.InferenceSession) -> tuple[ort.IOBinding, bool]:
        return fresh_binding(session)

    def bind(self, binding: ort.IOBinding, present_names: Sequence[str] = (), device: object = None,
             new: int = 0) -> None:
        _bind_past(binding, self.names, self.values, present_names, device)

    def adopt(self, outputs, first: int, new: int) -> None:
        """The graph returns the whole buffer with the new slot written: it becomes the next past."""
        self.values = _presents(outputs, first)
        self.length += new

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
        self.values = [owned(v.numpy()[rows]) for v in self.values]
        self.mask = self.mask[rows]

    def numpy(self) -> list[np.ndarray]:
        return [v.numpy()[:, :, : self.length] for v in self.values]
