"""ONNX file layout and graph clean-ups applied after tracing, before validation checks them.

- Weights go to one external data file (``model.onnx.data``) once the model is large (see
  ``onnx_files``, which also keeps them out of Python memory while the graph is rewritten).
- Fused (Llama-family) graphs are optimized offline: onnxruntime's own "extended" graph
  optimizations (RMSNorm -> SimplifiedLayerNormalization, ...), then the residual add + RMSNorm
  pairs become SkipSimplifiedLayerNormalization (one kernel), which the runtime optimizer does
  not do (60 residual Adds fewer per SmolLM2 step; ``edgelm export`` logs the node counts).
- A tied embedding is stored once: the tracer writes the LM head's transposed weight as its own
  initializer beside the embedding table; the LM head becomes ``FusedMatMul(hidden, table,
  transB=1)`` over the embedding table itself. (Gathering from ``Transpose(lm_head)`` instead,
  as onnxruntime-genai's builder does, makes onnxruntime materialise the transpose at load, a
  second copy of the table during start-up.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edgelm.export.onnx_files import EXTERNAL_DATA, array, load_graph, save

__all__ = ["EXTERNAL_DATA", "LOGITS_TO_KEEP", "add_logits_to_keep", "fuse_skip_rms_norm", "optimize_offline", "save",
           "share_tied_embedding"]

LOGITS_TO_KEEP = "logits_to_keep"


def share_tied_embedding(model: onnx.ModelProto) -> bool:
    """Compute the logits from the embedding table itself when the LM head is its transpose; True if rewired."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    head_node = next((n for n in graph.node if "logits" in n.output and n.op_type == "MatMul"), None)
    if head_node is None or head_node.input[1] not in inits or users[head_node.input[1]] != 1:
        return False
    head = inits[head_node.input[1]]
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        table = inits[node.input[0]]
        if list(table.dims) != [head.dims[1], head.dims[0]]:
            continue
        if not np.array_equal(array(table), array(head).T):
            continue
        fused = helper.make_node("FusedMatMul", [head_node.input[0], table.name], list(head_node.output),
                                 name="lm_head_tied", domain="com.microsoft", transB=1, alpha=1.0)
        position = list(graph.node).index(head_node)
        graph.node.remove(head_node)
        graph.node.insert(position, fused)
        graph.initializer.remove(head)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return True
    return False


def restore_position_ids(model: onnx.ModelProto, declared: list[str]) -> bool:
    """Put ``position_ids`` back when it was declared but the tracer dropped it because no node reads it.

    Fused attention takes rotary positions from the cache slots, so nothing reads ``position_ids``
    any more, and torch's exporter removes an unread input. Callers that feed optimum's inputs by
    name (optimum itself, our runtime, user code) would then fail with "invalid input name", so the
    input comes back in its declared place, typed like ``input_ids``, and is simply not read.
    """
    inputs = model.graph.input
    names = [i.name for i in inputs]
    if "position_ids" not in declared or "position_ids" in names or "input_ids" not in names:
        return False
    value = onnx.ValueInfoProto()
    value.CopyFrom(inputs[names.index("input_ids")])
    value.name = "position_ids"
    inputs.insert(min(declared.index("position_ids"), len(inputs)), value)
    return True


def add_logits_to_keep(model: onnx.ModelProto) -> bool:
    """Let callers ask for the logits of the last k positions only, as transformers' ``logits_to_keep`` does.

    A prompt's prefill needs the next-token logits of its last position, but the LM head is the widest
    matrix of a small model (SmolLM2: 49,152 x 576); computing it for every prompt position cost about a
    tenth of a 512- or 2048-token float32 prefill (measured once on SmolLM2). The new input
    ``logits_to_keep`` (int64, shape [1]) slices the final hidden state before whatever reads it (the
    head): k > 0 keeps the last k positions, 0 keeps them all. It is an initializer as well as an input,
    so its default (0, every position) applies when a caller does not feed it: optimum, perplexity and
    user code that feed optimum's inputs see the old graph. The ``last_hidden_state`` output stays whole
    (contrastive search reads every position). Returns False, changing nothing, when the graph lacks the
    ``logits``/``last_hidden_state`` outputs, no node reads the hidden state, or the input exists already.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    hidden = "last_hidden_state"
    if hidden not in outputs or "logits" not in outputs or any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return False
    readers = [n for n in graph.node if hidden in n.input]
    if not readers:
        return False
    sliced = f"{hidden}_kept"
    for node in readers:
        for i, name in enumerate(node.input):
            if name == hidden:
                node.input[i] = sliced
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, onnx.TensorProto.INT64, [1]))
    graph.initializer.extend([
        helper.make_tensor(LOGITS_TO_KEEP, onnx.TensorProto.INT64, [1], [0]),
        helper.make_tensor(f"{LOGITS_TO_KEEP}_end", onnx.TensorProto.INT64, [1], [np.iinfo(np.int64).max]),
        helper.make_tensor(f"{LOGITS_TO_KEEP}_axis", onnx.TensorProto.INT64, [1], [1]),
    ])
    position = min(list(graph.node).index(n) for n in readers)
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{LOGITS_TO_KEEP}_start"], name="logits_to_keep_start"),
        helper.make_node("Slice", [hidden, f"{LOGITS_TO_KEEP}_start", f"{LOGITS_TO_KEEP}_end", f"{LOGITS_TO_KEEP}_axis"],
                         [sliced], name="logits_to_keep_slice"),
    ]
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    return True


def optimize_offline(path: Path) -> dict[str, int]:
    """Rewrite ``path`` in place with onnxruntime's extended optimizations and the Skip-RMSNorm fusion.

    Returns the node count before and after. The rewrite stays portable across CPU and CUDA: the
    extended level only produces contrib operators both providers implement (layout-specific
    "all"-level transforms are left to the session at load time).
    """
    import tempfile

    import onnxruntime as ort

    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".opt-") as work:
        optimized = Path(work) / "model.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = load_graph(optimized)
        fused = fuse_skip_rms_norm(model)
        save(model, path)  # streams the weights from onnxruntime's output into the final data file
    return {"nodes_before": before, "nodes_after": len(model.graph.node), "skip_rms_norm_fused": fused}


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """Residual ``Add`` + ``SimplifiedLayerNormalization`` -> one ``SkipSimplifiedLayerNormalization``; returns how many.

    onnxruntime's own fusion (``onnxruntime.transformers``) gives up when its symbolic shape inference
    cannot type the contrib operators these graphs hold, so this is the same rewrite for the one
    pattern they have: both Add inputs are activations (the residual stream and a block's output,
    same shape), and the sum, which the next residual Add also reads, is the fused node's fourth
    output. Export validation checks the result against PyTorch.
    """
    graph = model.graph
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    replaced: dict[int, onnx.NodeProto | None] = {}
    for node in graph.node:
        if node.op_type != "SimplifiedLayerNormalization" or len(node.input) < 2:
            continue
        add = producer.get(node.input[0])
        if add is None or add.op_type != "Add" or id(add) in replaced or any(i in consts for i in add.input):
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if axis != -1:
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        outputs = [node.output[0], "", "", add.output[0]]
        replaced[id(add)] = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], node.input[1]],
                                             outputs, name=f"{node.name or 'rms'}_skip", domain="com.microsoft",
                                             epsilon=eps)
        replaced[id(node)] = None
    if not replaced:
        return 0
    nodes = [replaced.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(1 for v in replaced.values() if v is None)


def prune_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing reads any more, after an edit cut them off (a draft's source head,
    a benchmark variant's removed inputs), so the saved file does not carry them."""
    needed = {o.name for o in graph.output}
    alive = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            alive.append(node)
            needed.update(node.input)
    alive.reverse()
    del graph.node[:]
    graph.node.extend(alive)
    keep = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(keep)
