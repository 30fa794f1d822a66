"""Activation statistics of a float graph on a built-in text: which input channels matter.

For every matrix product with a weight initializer, the mean square of each input channel over
the calibration tokens (llama.cpp's "importance matrix"): a weight that multiplies a large
activation costs more when rounded, so the 4-bit search weighs its error by this.
The graph is run as it is (onnxruntime, float32) with its activations added as outputs.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import onnx


def builtin_text(name: str) -> str:
    """A text shipped in the package (``export/data``): ``calibration.txt`` or ``quality.txt``."""
    return resources.files("edgelm.export").joinpath("data", name).read_text(encoding="utf-8")


def weight_inputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """activation name -> the weight initializers it multiplies (MatMul / FusedMatMul B inputs; gate and up
    projections read the same one)."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "FusedMatMul") and len(node.input) > 1 and node.input[1] in inits \
                and node.input[0] not in inits:
            out.setdefault(node.input[0], []).append(node.input[1])
    return out


def feeds_for(session, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of a dynamic-cache causal graph for one row of tokens with an empty past."""
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name == "position_ids":
            feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif i.name.startswith("past_key_values."):
            heads, dim = i.shape[1], i.shape[3]
            feeds[i.name] = np.zeros((1, heads, 0, dim), np.float32)
    return feeds


def activations(model_path: Path, token_ids: list[int], window: int = 512) -> dict[str, np.ndarray]:
    """weight initializer name -> the activations it multiplies over ``token_ids``, (tokens, K) float32."""
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    names_in = {i.name for i in model.graph.input}
    if "cache_position" in names_in or "past_key_values.0.key" not in names_in:
        return {}  # a static-shape or masked graph: no plain prompt pass to observe
    acts = weight_inputs(model)
    known = {o.name for o in model.graph.output}
    for name in acts:
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)  # same folder: external data paths still resolve
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(tmp, opts, providers=["CPUExecutionProvider"])
        names = list(acts)
        rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for start in range(0, len(token_ids), window):
            ids = np.asarray([token_ids[start:start + window]], np.int64)
            if ids.shape[1] < 2:
                break
            values = session.run(names, feeds_for(session, ids))
            for name, value in zip(names, values):
                rows[name].append(value.reshape(-1, value.shape[-1]).astype(np.float32))
    finally:
        Path(tmp).unlink(missing_ok=True)
    out = {}
    for name, parts in rows.items():
        if parts:
            x = np.concatenate(parts)
            out.update((weight, x) for weight in acts[name])  # one array, shared by the weights that read it
    return out
