"""--quantize gguf: a GGUF's quantized blocks carried into the graph, compared with the gguf package's own dequantization.

Small GGUF files are written here with the ``gguf`` package, one tensor per block format
(Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 quantized by the package; the K formats, which it cannot quantize, as
random valid blocks), then read back the way the exporter reads them.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from edgelm.export.quant.gguf import GGUFScheme  # noqa: E402
from edgelm.export.quant.gguf_blocks import decode  # noqa: E402
from edgelm.export.quant.rewrite import rewrite  # noqa: E402

SIMPLE = {"Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q8_0": T.Q8_0}
K_FORMATS = {  # format: (block bytes, byte offsets of the fp16 super-scales)
    "Q2_K": (T.Q2_K, 84, (80, 82)),
    "Q3_K": (T.Q3_K, 110, (108,)),
    "Q4_K": (T.Q4_K, 144, (0, 2)),
    "Q5_K": (T.Q5_K, 176, (0, 2)),
    "Q6_K": (T.Q6_K, 210, (208,)),
}
ROWS, COLS = 48, 512


def _raw(fmt: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """(rows, bytes per row) raw blocks of one tensor in ``fmt`` and its GGML type."""
    if fmt in SIMPLE:
        w = (rng.standard_normal((ROWS, COLS)) * 0.05).astype(np.float32)
        w[3, :64] += 0.4  # an uneven row, so that offsets (Q4_1/Q5_1) matter
        return quantize(w, SIMPLE[fmt]), SIMPLE[fmt]
    qtype, size, scale_at = K_FORMATS[fmt]
    blocks = rng.integers(0, 256, (ROWS * COLS // 256, size), dtype=np.uint8)
    for at in scale_at:  # sane fp16 super-scales (random bytes could be inf/nan)
        blocks[:, at:at + 2] = (rng.random(len(blocks)) * 1e-3 + 1e-4).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(ROWS, -1), qtype


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A GGUF holding one 48 x 512 tensor per supported block format."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "blocks.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for fmt in [*SIMPLE, *K_FORMATS]:
        raw, qtype = _raw(fmt, rng)
        writer.add_tensor(f"w.{fmt}", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("fmt", [*SIMPLE, *K_FORMATS])
def test_blocks_equal_gguf_dequantization(gguf_file, fmt):
    """Each format's codes, scales and offsets rebuild exactly what gguf.quants.dequantize gives."""
    t = _tensors(gguf_file)[f"w.{fmt}"]
    ref = dequantize(np.asarray(t.data), t.tensor_type)
    bq = decode(fmt, np.asarray(t.data), t.name)
    assert bq.shape == ref.shape == (ROWS, COLS)
    assert bq.q.max() < 2 ** bq.bits
    ours = bq.dequantize()
    scale = np.abs(ref).max()
    assert scale > 0
    assert np.abs(ours - ref).max() <= 4e-7 * scale, fmt
    # and through MatMulNBits' packed layout: unpacking the packed codes gives the codes back
    packed = bq.packed().reshape(ROWS, -1)
    if bq.bits == 4:
        unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(ROWS, COLS)
    else:
        unpacked = packed
    np.testing.assert_array_equal(unpacked, bq.q)


def _graph(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x -> MatMul(W0.T) -> MatMul(W1.T) ...: a chain of float matrix products."""
    nodes, inits = [], []
    cur = "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"y{i}"]))
        cur = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, COLS])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_graph_weights_found_and_rebuilt_exactly(gguf_file):
    """Rows permuted (as transformers does to Llama's q/k) and stacked from several formats (a fused q/k/v) are still
    found, and the rewritten graph (float compute) gives the float graph's outputs."""
    tensors = _tensors(gguf_file)
    deq = {name: dequantize(np.asarray(t.data), t.tensor_type) for name, t in tensors.items()}
    perm = np.random.default_rng(1).permutation(ROWS)
    stacked = np.concatenate([deq["w.Q5_0"], deq["w.Q8_0"][perm], deq["w.Q4_K"]])  # three kinds in one matrix
    square = np.concatenate([deq[f"w.{f}"] for f in ("Q4_1", "Q6_K", "Q2_K", "Q3_K", "Q5_K", "Q4_0", "Q5_1",
                                                       "Q4_K", "Q8_0", "Q5_0", "Q6_K")])[:COLS]
    float_model = _graph([square, stacked])
    model = _graph([square, stacked])
    scheme = GGUFScheme(gguf_file, log=lambda s: None)
    report = rewrite(model, scheme, accuracy_level=0)
    assert sum(report.quantized.values()) == square.size + stacked.size and not report.kept_float
    assert scheme.max_rel_diff <= 4e-6
    ops = [n.op_type for n in model.graph.node]
    assert not {"W0", "W1"} & {t.name for t in model.graph.initializer}, "the float weights are still there"
    # square: 11 formats, one node of their common form; stacked: Q5_0 + Q8_0 share 8-bit blocks, Q4_K another node
    assert ops.count("Concat") == 1 and ops.count("MatMulNBits") == 3
    x = np.random.default_rng(2).standard_normal((1, 3, COLS)).astype(np.float32)
    ref, ours = _run(float_model, x), _run(model, x)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_matrix_not_in_gguf_stays_float(gguf_file):
    other = np.random.default_rng(3).standard_normal((16, COLS)).astype(np.float32)
    model = _graph([other])
    report = rewrite(model, GGUFScheme(gguf_file, log=lambda s: None))
    assert not report.quantized and len(report.kept_float) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


def _lookup_graph(table: np.ndarray, tied: bool) -> onnx.ModelProto:
    """input_ids -> Gather(table) -> embeds; with ``tied``, also the head FusedMatMul(embeds, table, transB=1)."""
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["embeds"], axis=0)]
    outputs = [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, None)]
    if tied:
        nodes.append(helper.make_node("FusedMatMul", ["embeds", "table"], ["logits"], domain="com.microsoft",
                                      transB=1))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              outputs, [numpy_helper.from_array(table, "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("fmt,tied,bits", [("Q5_0", False, {4}), ("Q6_K", False, {4, 2}), ("Q5_0", True, {8}),
                                           ("Q8_0", False, {8}), ("Q4_1", False, {4}), ("Q4_K", False, {4})])
def test_lookup_table_rows_equal_gguf_dequantization(gguf_file, fmt, tied, bits):
    """An embedding table looked up with GatherBlockQuantized gives the gguf package's dequantized rows exactly.

    A table only looked up whose codes need 5 or 6 bits is stored as a 4-bit part plus a high part: 2 bits for
    Q6_K (6 bits a weight instead of 8), a 1-bit plane looked up by plain ops for Q5_0 (no bigger than the GGUF's
    own blocks); one a tied head also reads keeps the head's 8-bit form; Q8_0 needs all 8 bits; formats with
    per-block offsets (Q4_1, Q4_K) add them to the looked-up rows."""
    t = _tensors(gguf_file)[f"w.{fmt}"]
    table = dequantize(np.asarray(t.data), t.tensor_type)
    model = _lookup_graph(table, tied)
    report = rewrite(model, GGUFScheme(gguf_file, log=lambda s: None), accuracy_level=0)
    assert report.quantized == {fmt: table.size}
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in gathers} == bits
    assert "table" not in {i.name for i in model.graph.initializer}, "the float table is still there"
    if fmt == "Q6_K" and not tied:  # 4 + 2 bits of codes and a float16 scale a block, where 8-bit codes take 8
        eight_bit = table.size + table.size // 16 * 2
        assert report.weight_bytes < 0.8 * eight_bit, (report.weight_bytes, eight_bit)
    if fmt == "Q5_0" and not tied:  # 4 + 1 bits of codes and the float16 scale: the GGUF's 22 bytes per 32 weights
        assert report.weight_bytes <= int(t.n_bytes) + 256, (report.weight_bytes, int(t.n_bytes))  # + a few shapes
        assert "BitShift" in {n.op_type for n in model.graph.node}
    ids = np.array([[0, 3, 47, 3, 12]], np.int64)  # row 3 is the uneven one (offsets matter there)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(["embeds"], {"input_ids": ids})[0]
    np.testing.assert_array_equal(rows[0], table[ids[0]])


def test_gguf_scheme_needs_gguf_source(tmp_path, checkpoint):
    from edgelm.export import export_model
    from edgelm.runtime.errors import ExportError

    with pytest.raises(ExportError, match="checkpoint folder"):
        export_model(checkpoint("tiny-llama"), tmp_path / "out", quantize="gguf", log=lambda s: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_smollm2_gguf_export_is_exact(tmp_path, exported):
    """The real SmolLM2 GGUF (Q4_1 + Q8_0): every matrix carried over, weights rebuilt exactly, the tied table stored
    once and quantized, the folder within 1.25x the GGUF, and a float-compute copy of the graph gives the float
    export's logits."""
    from edgelm.export import export_model
    from edgelm.models.real import smollm2_gguf
    from edgelm.runtime import CausalLM

    src = smollm2_gguf(log=lambda s: None)
    out = tmp_path / "gguf"
    man = export_model(src, out, log=lambda s: None)  # a .gguf source defaults to --quantize gguf
    q = man.validation["quantization"]
    assert q["scheme"] == "gguf" and set(q["weights"]) == {"Q4_1", "Q8_0"}
    assert q["weights"]["Q8_0"] == 49152 * 576 and not q["kept_float32"]
    assert q["max_relative_difference_to_gguf"] <= 4e-6
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    assert size <= 1.25 * src.stat().st_size, (size, src.stat().st_size)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "FusedMatMul" not in ops
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 49152 * 576]
    assert not floats, "the float32 embedding table came back"
    quality = man.validation["quality"]
    assert 0.99 < quality["ratio"] < 1.02, quality

    # Float compute (accuracy_level 0) on the same weights gives the float export's logits.
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    onnx.save(model, str(out / "model.onnx"))
    exact = CausalLM.load(out)
    reference = CausalLM.load(exported("smollm2-135m-instruct"))
    ids = np.asarray([exact.tokenizer.encode("The capital of France is Paris, and the capital of Spain is")], np.int64)
    pos = np.arange(ids.shape[1])[None]
    a, _ = exact.decoder.step(ids, np.ones_like(ids), pos, exact.decoder.new_cache(1))
    b, _ = reference.decoder.step(ids, np.ones_like(ids), pos, reference.decoder.new_cache(1))
    assert np.abs(a - b).max() < 2e-3, np.abs(a - b).max()
    assert json.loads((out / "edgelm.json").read_text())["dtype"].startswith("gguf")
