"""SmoothQuant before int8 (export/quant/smooth.py): exact in float, only where it may be, and it helps int8 activations."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgelm.export import onnx_files
from edgelm.export.quant import calibrate
from edgelm.export.quant.smooth import scales, smooth

K, N = 64, 16


def _int8_rows(x: np.ndarray, block: int) -> np.ndarray:
    """What MatMulNBits at accuracy_level 4 does to its input: int8 per block of ``block`` on the block's max."""
    t, k = x.shape
    xb = x.reshape(t, k // block, block)
    step = np.abs(xb).max(axis=2, keepdims=True) / 127.0
    step[step == 0] = 1.0
    return (np.rint(xb / step) * step).reshape(t, k)


def _outlier_activations(rng, tokens: int = 256) -> np.ndarray:
    x = rng.standard_normal((tokens, K)).astype(np.float32)
    x[:, 5] *= 60.0  # one channel tens of times larger, as in a Llama RMSNorm output
    x[:, 40] *= 25.0
    return x


def test_smoothing_shrinks_what_int8_activations_lose():
    """The reason the int8 scheme smooths: with an outlier channel in a block, the other channels of the block keep a
    few int8 levels; after x / s and W * s the float product is the same and the int8-rounded one is much closer."""
    rng = np.random.default_rng(0)
    x = _outlier_activations(rng)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    s = scales(x, [w], 0.7)
    exact = x.astype(np.float64) @ w
    assert np.allclose((x / s) @ (w * s[:, None]), exact, rtol=1e-4, atol=1e-4)
    before = np.linalg.norm(_int8_rows(x, 32) @ w - exact)
    after = np.linalg.norm(_int8_rows(x / s, 32) @ (w * s[:, None]) - exact)
    assert after < 0.5 * before, (before, after)
    assert np.isclose(np.exp(np.log(s).mean()), 1.0)  # geometric mean 1: the weights' scale is not inflated


def _graph() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> RMSNorm(g1) -> MatMul(A), MatMul(B)   (eligible: both products read it, the gain is its own)
       h -> RMSNorm(g2) -> MatMul(C) and a graph output   (not: the normalized value is visible)
       h -> RMSNorm(g3) -> MatMul(D) and Relu             (not: a non-MatMul reader)"""
    rng = np.random.default_rng(1)
    inits = {name: (rng.standard_normal((K, N)) * 0.05).astype(np.float32) for name in "ABCD"}
    for g in ("g1", "g2", "g3"):
        inits[g] = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "g1"], ["n1"], epsilon=1e-5, axis=-1),
        helper.make_node("MatMul", ["n1", "A"], ["a"]),
        helper.make_node("MatMul", ["n1", "B"], ["b"]),
        helper.make_node("SimplifiedLayerNormalization", ["x", "g2"], ["n2"], epsilon=1e-5, axis=-1),
        helper.make_node("MatMul", ["n2", "C"], ["c"]),
        helper.make_node("SimplifiedLayerNormalization", ["x", "g3"], ["n3"], epsilon=1e-5, axis=-1),
        helper.make_node("MatMul", ["n3", "D"], ["d"]),
        helper.make_node("Relu", ["n3"], ["r"]),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b", "c", "n2", "d", "r")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])], outs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, inits


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_only_norms_read_by_weight_products_alone_are_smoothed_and_outputs_stay_the_same():
    rng = np.random.default_rng(2)
    x = _outlier_activations(rng, 64)
    model, inits = _graph()
    before = _run(model, x)
    # The calibration activations only set s (and are divided by it); any array with outlier channels will do.
    acts = {"A": x.copy(), "C": x.copy(), "D": x.copy()}
    acts["B"] = acts["A"]
    shared = acts["A"]
    assert smooth(model, acts, 0.0, log=lambda _: None) == 0 and acts["A"] is shared  # alpha 0: off
    assert smooth(model, acts, 0.7, log=lambda _: None) == 1
    after_inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not np.array_equal(after_inits["g1"], inits["g1"])
    for name in ("g2", "g3", "C", "D"):
        assert np.array_equal(after_inits[name], inits[name]), name
    s = inits["g1"] / after_inits["g1"]
    assert np.allclose(after_inits["A"], inits["A"] * s[:, None], rtol=1e-6)
    assert acts["A"] is acts["B"] and acts["A"] is not shared  # one array for both readers, divided by s
    assert np.allclose(acts["A"] * s, shared, rtol=1e-5, atol=1e-6)
    assert acts["C"] is not acts["A"] and np.array_equal(acts["C"], shared)
    for got, want in zip(_run(model, x), before):
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_smoothing_a_real_export_leaves_its_logits_alone(exported, tmp_path):
    """On the tiny Llama's float graph (fused attention, Skip-RMSNorm): every layer's two normalized inputs are
    smoothed, the final norm (last_hidden_state) is not, and the graph computes the same logits."""
    folder = exported("tiny-llama")
    ids = list(range(3, 120))
    acts = calibrate.activations(folder / "model.onnx", ids)
    model = onnx_files.load_graph(folder / "model.onnx")
    layers = json.loads((folder / "edgelm.json").read_text())["num_layers"]
    inits = {t.name: t for t in model.graph.initializer}
    norms = [n for n in model.graph.node if n.op_type.endswith("SimplifiedLayerNormalization")]
    index = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}
    before = {n.output[0]: np.array(onnx_files.array(inits[n.input[index[n.op_type]]])) for n in norms}
    assert smooth(model, acts, 0.7, log=lambda _: None) == 2 * layers
    inits = {t.name: t for t in model.graph.initializer}
    changed = {n.output[0] for n in norms
               if not np.array_equal(onnx_files.array(inits[n.input[index[n.op_type]]]), before[n.output[0]])}
    assert len(changed) == 2 * layers and "last_hidden_state" not in changed, changed
    out = tmp_path / "smoothed"
    out.mkdir()
    onnx_files.save(model, out / "model.onnx")
    feeds = calibrate.feeds_for(ort.InferenceSession(str(folder / "model.onnx")), np.asarray([ids[:40]], np.int64))
    names = ["logits", "last_hidden_state"]
    want = ort.InferenceSession(str(folder / "model.onnx")).run(names, feeds)
    got = ort.InferenceSession(str(out / "model.onnx")).run(names, feeds)
    for a, b in zip(got, want):  # float rounding apart, the same model
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4), np.abs(a - b).max()


def test_int8_export_records_its_smoothing(exported):
    folder = exported("tiny-llama", quantize="int8")
    man = json.loads((folder / "edgelm.json").read_text())
    q = man["validation"]["quantization"]
    assert q["smoothed"] == {"activations": 2 * man["num_layers"], "alpha": 0.7}
    assert "SmoothQuant" in q["method"]
    int4 = json.loads((exported("tiny-llama", quantize="int4") / "edgelm.json").read_text())
    assert "smoothed" not in int4["validation"]["quantization"]  # measured worse at 4 bits: not applied


def test_smooth_sweep_script_scores_each_alpha_and_the_float_compute_row(checkpoint, exported, tmp_path, capsys):
    """benchmarks/smooth_sweep.py (behind the README's choice of alpha): one int8 export per alpha, alpha 0 without
    smoothing, plus that export computing in float32; the scheme's own alpha is restored afterwards."""
    import importlib.util
    from pathlib import Path

    from edgelm.export.quant.int8 import Int8Scheme

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "smooth_sweep.py"
    spec = importlib.util.spec_from_file_location("smooth_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    reference = exported("tiny-llama")
    assert sweep.main([str(checkpoint("tiny-llama")), "--reference", str(reference), "--alphas", "0,0.7",
                       "--out", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| alpha")]
    assert [r.split(" | ")[0] for r in rows] == ["| alpha 0 (no smoothing)",
                                                 "| alpha 0, float32 compute (activations not quantized)",
                                                 "| alpha 0.7"]
    assert Int8Scheme.smooth_alpha == 0.7
    plain = json.loads((tmp_path / "int8-alpha0" / "edgelm.json").read_text())["validation"]["quantization"]
    smoothed = json.loads((tmp_path / "int8-alpha0.7" / "edgelm.json").read_text())["validation"]["quantization"]
    assert "smoothed" not in plain and smoothed["smoothed"]["alpha"] == 0.7
    kl = [float(r.split(" | ")[3]) for r in rows]
    assert all(k > 0 for k in kl)
    with pytest.raises(SystemExit):
        sweep.main([str(checkpoint("tiny-llama")), "--reference", str(reference), "--alphas", "0.5,2"])
