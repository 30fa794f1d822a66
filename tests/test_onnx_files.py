"""Streaming ONNX save/load (export/onnx_files): weights stay on disk, files come out loadable and exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgelm.export import onnx_files


def _model(rows: int, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """y = (x @ A) @ B + c, with A and B large enough to go external when ``rows`` is large."""
    rng = np.random.default_rng(seed)
    arrays = {"A": rng.standard_normal((16, rows)).astype(np.float32),
              "B": rng.standard_normal((rows, 8)).astype(np.float32),
              "c": rng.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["hb"]),
             helper.make_node("Add", ["hb", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), arrays


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def big(monkeypatch):
    monkeypatch.setattr(onnx_files, "EXTERNAL_ABOVE", 1024)  # external data without writing 64 MB


def test_large_model_streams_to_aligned_external_data(tmp_path, big):
    model, arrays = _model(4096)
    x = np.ones((1, 16), np.float32)
    expected = (x @ arrays["A"]) @ arrays["B"] + arrays["c"]
    onnx_files.save(model, tmp_path / "model.onnx")
    assert (tmp_path / onnx_files.EXTERNAL_DATA).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temporary left
    on_disk = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in on_disk.graph.initializer
                if t.data_location == TensorProto.EXTERNAL}
    assert set(external) == {"A", "B"}  # c (32 bytes) stays inside the proto
    for info in external.values():
        assert info["location"] == onnx_files.EXTERNAL_DATA  # relative on disk: the folder can move
        assert int(info["offset"]) % onnx_files.ALIGN == 0
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", x), expected, rtol=1e-5)
    # The in-memory model now points at the file instead of holding the bytes.
    assert all(not t.raw_data for t in model.graph.initializer if t.name in ("A", "B"))
    np.testing.assert_array_equal(onnx_files.array(next(t for t in model.graph.initializer if t.name == "B")),
                                  arrays["B"])


def test_load_graph_maps_weights_and_saves_over_its_own_data_file(tmp_path, big):
    model, arrays = _model(4096, seed=1)
    onnx_files.save(model, tmp_path / "model.onnx")
    loaded = onnx_files.load_graph(tmp_path / "model.onnx")
    a = next(t for t in loaded.graph.initializer if t.name == "A")
    assert a.data_location == TensorProto.EXTERNAL and not a.raw_data
    mapped = onnx_files.array(a)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, arrays["A"])
    # A graph change plus a new in-memory tensor, saved over the very data file the others are read from.
    new_c = np.full(8, 2.0, np.float32)
    loaded.graph.initializer.remove(next(t for t in loaded.graph.initializer if t.name == "c"))
    loaded.graph.initializer.append(numpy_helper.from_array(np.repeat(new_c[None], 512, 0), "c_big"))
    loaded.graph.node.append(helper.make_node("ReduceMean", ["c_big"], ["c"], axes=[0], keepdims=0))
    onnx_files.save(loaded, tmp_path / "model.onnx")
    x = np.full((1, 16), 0.5, np.float32)
    np.testing.assert_allclose(_run(tmp_path / "model.onnx", x), (x @ arrays["A"]) @ arrays["B"] + new_c, rtol=1e-5)


def test_external_graph_saved_elsewhere_and_small_model_inlined(tmp_path, big):
    model, arrays = _model(4096, seed=2)
    (tmp_path / "a").mkdir()
    onnx_files.save(model, tmp_path / "a" / "model.onnx")
    loaded = onnx_files.load_graph(tmp_path / "a" / "model.onnx")
    (tmp_path / "b").mkdir()
    onnx_files.save(loaded, tmp_path / "b" / "model.onnx")
    x = np.ones((1, 16), np.float32)
    expected = (x @ arrays["A"]) @ arrays["B"] + arrays["c"]
    for sub in ("a", "b"):
        np.testing.assert_allclose(_run(tmp_path / sub / "model.onnx", x), expected, rtol=1e-5)
    # Below the external-data size the weights go back into one self-contained file.
    onnx_files.EXTERNAL_ABOVE = 1 << 40
    (tmp_path / "c").mkdir()
    onnx_files.save(onnx_files.load_graph(tmp_path / "b" / "model.onnx"), tmp_path / "c" / "model.onnx")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["model.onnx"]
    np.testing.assert_allclose(_run(tmp_path / "c" / "model.onnx", x), expected, rtol=1e-5)
