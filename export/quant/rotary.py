"""A quantized graph's rotary tables computed when the session loads, not stored.

GroupQueryAttention reads cos/sin tables of (max positions, head_dim / 2) float32: 8.4 MB for a
32K-position model such as Qwen2.5 (1.4% of its ``gguf`` export), as much as a few of its
quantized matrices. Their content is a function of the rotary embedding's inverse frequencies,
so a quantized export stores those (head_dim / 2 floats) and nodes that rebuild the tables;
onnxruntime folds the nodes when the session loads (and the load cache keeps the result).

Only quantized graphs get this: onnxruntime's Cos and Sin differ from PyTorch's in the last bit
for about a sixth of the entries (the products positions x frequencies are the same, both are
one float32 multiplication). Float32 exports promise transformers' tokens exactly and keep the
tables PyTorch computed; a quantized graph computes with int8 activations, beside which one ulp
of a rotary factor is nothing, and its perplexity against the float graph is measured anyway.
Each rebuilt table is checked against the stored one before the stored one is dropped.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from edgelm.export import onnx_files

ULP_TOLERANCE = 4
"""Most ulps (of the table's largest value) a rebuilt entry may differ by; more means the inverse
frequencies do not describe the stored table (another rope type), and the table stays."""


def _nodes(inv_freq: np.ndarray, scale: float, rows: int, cos_name: str, sin_name: str, prefix: str):
    """Nodes (and their initializers) computing cos/sin(outer(arange(rows), inv_freq)) * scale."""
    inits = [numpy_helper.from_array(np.asarray(0, np.float32), f"{prefix}_start"),
             numpy_helper.from_array(np.asarray(rows, np.float32), f"{prefix}_limit"),
             numpy_helper.from_array(np.asarray(1, np.float32), f"{prefix}_delta"),
             numpy_helper.from_array(np.asarray([1], np.int64), f"{prefix}_axis"),
             numpy_helper.from_array(np.ascontiguousarray(inv_freq, np.float32)[None, :], f"{prefix}_inv_freq")]
    nodes = [helper.make_node("Range", [f"{prefix}_start", f"{prefix}_limit", f"{prefix}_delta"], [f"{prefix}_positions"],
                              name=f"{prefix}_Range"),
             helper.make_node("Unsqueeze", [f"{prefix}_positions", f"{prefix}_axis"], [f"{prefix}_column"],
                              name=f"{prefix}_Unsqueeze"),
             helper.make_node("Mul", [f"{prefix}_column", f"{prefix}_inv_freq"], [f"{prefix}_freqs"], name=f"{prefix}_Mul")]
    for op, out in (("Cos", cos_name), ("Sin", sin_name)):
        if scale == 1.0:
            nodes.append(helper.make_node(op, [f"{prefix}_freqs"], [out], name=f"{prefix}_{op}"))
        else:
            nodes.append(helper.make_node(op, [f"{prefix}_freqs"], [f"{prefix}_{op}_raw"], name=f"{prefix}_{op}"))
            nodes.append(helper.make_node("Mul", [f"{prefix}_{op}_raw", f"{prefix}_scale"], [out],
                                          name=f"{prefix}_{op}_Scale"))
    if scale != 1.0:
        inits.append(numpy_helper.from_array(np.asarray(scale, np.float32), f"{prefix}_scale"))
    return nodes, inits


def tables_at_load(model: onnx.ModelProto, inv_freq: np.ndarray, scale: float) -> int:
    """Replace, in place, the GroupQueryAttention cos/sin tables by nodes rebuilding them; returns the bytes saved
    (0 when the graph has no such tables, or the rebuilt ones do not match the stored ones)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    pairs = {(n.input[7], n.input[8]) for n in graph.node
             if n.op_type == "GroupQueryAttention" and len(n.input) > 8 and n.input[7] and n.input[8]}
    if len(pairs) != 1:
        return 0
    cos_name, sin_name = pairs.pop()
    if cos_name not in inits or sin_name not in inits:
        return 0
    stored = {name: onnx_files.array(inits[name]) for name in (cos_name, sin_name)}
    rows, half = stored[cos_name].shape
    if half != inv_freq.size or stored[sin_name].shape != (rows, half):
        return 0
    nodes, new_inits = _nodes(inv_freq, scale, rows, cos_name, sin_name, "edgelm_rotary")
    check = helper.make_graph(nodes, "rotary", [], [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                                    for n in (cos_name, sin_name)], new_inits)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    session = ort.InferenceSession(helper.make_model(check, opset_imports=[helper.make_opsetid("", opset)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    for name, rebuilt in zip((cos_name, sin_name), session.run(None, {})):
        table = stored[name]
        ulp = np.spacing(np.float32(max(float(np.abs(table).max()), 1e-30)))
        if rebuilt.shape != table.shape or float(np.abs(rebuilt - table).max()) > ULP_TOLERANCE * ulp:
            return 0
    saved = sum(onnx_files.nbytes(inits[name]) for name in (cos_name, sin_name))
    keep = [t for t in graph.initializer if t.name not in (cos_name, sin_name)]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return saved
