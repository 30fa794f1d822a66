"""ONNX files handled without ever holding all their weights in Python memory.

``onnx.load(..., load_external_data=True)`` plus ``onnx.save_model(save_as_external_data=True)``
holds every weight once in the proto and again while it is serialized: on Qwen2.5 0.5B that
round trip (twice per export: tied-embedding rewrite, offline optimization) was what set the
export's peak memory (7 GB for 2 GB of float32 weights). Here a graph is loaded without its
weights; external tensors keep an *absolute* location while in memory, ``array`` maps them from
disk (read-only, no copy) when a rewrite needs their values, and ``save`` streams every large
tensor into the destination's data file one at a time, wherever its bytes come from (an
external file, possibly the very file being replaced, or a tensor built in memory).

onnx's helpers cannot do this: ``convert_model_to_external_data`` needs the bytes in the
proto, and ``load_external_data_for_model`` reads them all in.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXTERNAL_DATA = "model.onnx.data"
EXTERNAL_ABOVE = 64 * 1024**2
"""Models above this many bytes of weights keep them in ``model.onnx.data``: onnxruntime then maps
them instead of parsing a protobuf that holds them (lower peak memory at load, faster load)."""
MIN_EXTERNAL = 1024
"""Tensors smaller than this stay inside the proto (shapes, scalars)."""
ALIGN = 4096
"""Each tensor starts on a page boundary, so onnxruntime can map it straight from the file."""


def _info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _set_info(t: TensorProto, location: str, offset: int | None = None, length: int | None = None) -> None:
    info = _info(t)
    info["location"] = location
    if offset is not None:
        info["offset"], info["length"] = str(offset), str(length)
    del t.external_data[:]
    for key, value in info.items():
        t.external_data.add(key=key, value=value)


def load_graph(path: str | Path) -> onnx.ModelProto:
    """The model at ``path`` with external tensors left on disk, their locations made absolute."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for t in _tensors(model):
        if is_external(t):
            location = Path(_info(t)["location"])
            _set_info(t, str(location if location.is_absolute() else (path.parent / location).resolve()))
    return model


def _tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == TensorProto.EXTERNAL:
                yield attr.t


def _mapped_bytes(t: TensorProto) -> np.ndarray:
    info = _info(t)
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else os.path.getsize(info["location"]) - offset
    if length == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(info["location"], dtype=np.uint8, mode="r", offset=offset, shape=(length,))


def array(t: TensorProto) -> np.ndarray:
    """A tensor's values; an external one is mapped from its file (read-only) rather than read in."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return _mapped_bytes(t).view(dtype).reshape(tuple(t.dims))


def nbytes(t: TensorProto) -> int:
    n = int(np.prod(t.dims)) if t.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _payload(t: TensorProto) -> np.ndarray | bytes:
    if is_external(t):
        return _mapped_bytes(t)
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def _clear_data(t: TensorProto) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(name)


def save(model: onnx.ModelProto, path: str | Path) -> None:
    """Write ``model`` to ``path`` (weights in ``model.onnx.data`` beside it when large), streaming tensors.

    ``model`` may reference external data anywhere, including the data file being replaced; its large
    tensors are moved out of memory into the new file, and afterwards it references that file
    (absolute locations, as ``load_graph`` gives), so it can be changed and saved again.
    Both files are written under temporary names and renamed, data file first.
    """
    path = Path(path)
    data_path = path.with_name(EXTERNAL_DATA)
    tensors = list(_tensors(model))
    external = sum(nbytes(t) for t in tensors) > EXTERNAL_ABOVE
    fd, tmp_data = tempfile.mkstemp(prefix=".data-", dir=path.parent)
    fd_model, tmp_model = tempfile.mkstemp(prefix=".model-", dir=path.parent)
    os.close(fd_model)
    moved: list[tuple[TensorProto, int, int]] = []
    try:
        with os.fdopen(fd, "wb") as out:
            for t in tensors:
                if not external or nbytes(t) < MIN_EXTERNAL:
                    if is_external(t):  # a small model, or a small tensor: back inside the proto
                        t.raw_data = bytes(_mapped_bytes(t))
                        t.data_location = TensorProto.DEFAULT
                        del t.external_data[:]
                    continue
                payload = _payload(t)
                offset = out.tell()
                if offset % ALIGN:
                    out.write(b"\0" * (ALIGN - offset % ALIGN))
                    offset = out.tell()
                out.write(memoryview(payload))
                moved.append((t, offset, out.tell() - offset))
                del payload
        for t, offset, length in moved:
            _clear_data(t)
            t.data_location = TensorProto.EXTERNAL
            _set_info(t, EXTERNAL_DATA, offset, length)
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
        if moved:
            _publish(tmp_data, data_path)
            tmp_data = ""
        else:
            data_path.unlink(missing_ok=True)  # a stale data file of an earlier, larger save
        _publish(tmp_model, path)
        tmp_model = ""
    finally:
        for leftover in (tmp_data, tmp_model):
            if leftover:
                Path(leftover).unlink(missing_ok=True)
    absolute = str(data_path.resolve())
    for t, _, _ in moved:
        _set_info(t, absolute)


def _publish(tmp: str, final: Path) -> None:
    """Rename ``tmp`` over ``final`` with the umask's permissions (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, final)


def session_on_edit(model: onnx.ModelProto, folder: str | Path, options: object = None) -> object:
    """An onnxruntime CPU session on ``model``, an edited copy of ``folder``'s graph loaded without its weights
    (benchmark probes: inner values made outputs). The copy is saved beside the original so that its external
    data paths resolve, and removed as soon as the session holds the graph; the folder is left as it was."""
    import onnxruntime as ort

    fd, tmp = tempfile.mkstemp(suffix=".probe.onnx", dir=folder)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        return ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
    finally:
        os.remove(tmp)
