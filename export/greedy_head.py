"""The greedy head: greedy search's next token without reading the float32 LM head, the same token.

Why: a float32 decode step reads every weight once, and the LM head is the widest matrix of a
small model (SmolLM2: 49,152 x 576 float32, 113 MB of its 540 MB, 14% of a step's kernel time in
the README's profile). Greedy search needs only the head's argmax, not every logit. This module
adds a second, optional route to it in the same graph:

1. ``approx``: the head again as 8-bit MatMulNBits blocks of 32 (28 MB plus scales), computed with
   int8 activations (``accuracy_level`` 4, the fast kernel);
2. ``bound``: for every token, a guaranteed bound on |exact logit - approx| for this hidden state,
   from the blocks' weight scales, the blocks' activation sizes and float32 rounding (below);
3. the candidates: every token whose ``approx + bound`` reaches the best ``approx - bound``. The
   exact argmax is always among them (its exact logit is at least every other token's, so its upper
   bound is too), and so is every token that ties it;
4. their exact logits: the candidates' float32 rows gathered from the head's own table and
   multiplied as the head does (SmolLM2: 29 tokens at the median, 116 at the 90th percentile, on the
   built-in text; ``benchmarks/greedy_head.py``).

So the token is the argmax of exact float32 logits, as with the full head. The candidates' logits
are computed by onnxruntime's kernel for a small non-constant matrix, which sums in another order
than the prepacked full head: they can differ from the full head's logits in the last bits, so a
near-tie closer than float32 rounding could go the other way, as it could between onnxruntime and
PyTorch (the runtime uses the full head wherever logits are seen: sampling, processors other than
bans, beams, returned scores; see ``runtime.generate``).

The bound. With per-block weight scales s_b (codes in -127..127, round to nearest) and activation
blocks quantized by the kernel to t_b = max|h_b| / 127, the product's error is at most
max_b s_b/2 * |h|_1 + sum_b max|h_b| * |W^_b|_1 / 254; float32 rounding of both products adds at
most (K + blocks + 2) * 2^-24 * max|W| * |h|_1 each, taken four times over. The graph computes it
per token as one small MatMul: [max|h_b| ..., |h|_1] x G, G (blocks + 1, vocab, 3.6 MB for SmolLM2)
scaled up by 1% for the rounding of the bound's own sums. (Bounding the weight term per block too
halves the candidates but doubles G; 4-bit codes make nearly every token a candidate.)
``benchmarks/greedy_head.py`` prints the bound's slack and the candidate counts on real hidden
states; the tests check that the bound holds.

The graph gets an input ``greedy_head`` (int64 [1], default 0, so optimum and perplexity code see the
old graph) and two outputs: with 1, ``logits`` has no positions and ``greedy_ids`` (n,) /
``greedy_logits`` (batch, kept positions, n) hold the candidates of every row and position (each
row's own in ascending order, one row's after another: a token can appear twice, and each row's
argmax is the lowest id of its highest logit); with 0 those are empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgelm.export.onnx_files import array
from edgelm.runtime.decoder import GREEDY_HEAD as INPUT
from edgelm.runtime.decoder import GREEDY_IDS as IDS
from edgelm.runtime.decoder import GREEDY_LOGITS as LOGITS

__all__ = ["INPUT", "IDS", "LOGITS", "BLOCK", "add_greedy_head", "remove_greedy_head", "bound_matrix",
           "quantize_rows"]

BLOCK = 32
"""Block of the 8-bit copy; the activation quantization of ``accuracy_level`` 4 follows the same blocks."""
_MARGIN = 1.01
_U = 2.0 ** -24


def quantize_rows(table: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit codes of ``table`` (vocab, K) in blocks along K: (codes + 128 as uint8 (vocab, K/block,
    block), scales (vocab, K/block) float32)."""
    vocab, k = table.shape
    blocks = np.asarray(table, np.float32).reshape(vocab, k // block, block)
    scales = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    codes = np.clip(np.rint(blocks / safe[..., None]), -127, 127)
    return (codes + 128).astype(np.uint8), scales


def bound_matrix(table: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """G (blocks + 1, vocab): the features [max|h_b| ..., |h|_1] times G bound each token's |exact - approx|
    (module docstring)."""
    vocab, k = table.shape
    nb = scales.shape[1]
    dequant_l1 = (np.abs(codes.astype(np.int32) - 128).sum(axis=-1) * scales.astype(np.float64))  # (vocab, nb)
    rounding = 4 * (k + nb + 2) * _U * np.abs(np.asarray(table, np.float32)).max(axis=1).astype(np.float64)
    per_l1 = scales.max(axis=1).astype(np.float64) / 2 + rounding
    g = np.concatenate([dequant_l1.T / 254, per_l1[None, :]], axis=0)
    return (g * _MARGIN).astype(np.float32)


def _head(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.TensorProto, bool] | None:
    """The node computing ``logits`` from a float32 initializer: (node, weight, rows_are_tokens)."""
    inits = {t.name: t for t in model.graph.initializer}
    node = next((n for n in model.graph.node if "logits" in n.output), None)
    if node is None or len(node.input) < 2 or node.input[1] not in inits:
        return None
    weight = inits[node.input[1]]
    if weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "FusedMatMul" and attrs.get("transB") == 1 and not attrs.get("transA") \
            and attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transBatchA") and not attrs.get("transBatchB"):
        return node, weight, True
    if node.op_type == "MatMul":
        return node, weight, False
    return None


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def add_greedy_head(model: onnx.ModelProto) -> dict[str, Any] | None:
    """Add the greedy head to a float32 causal graph (module docstring); returns what was added, or None when
    the graph has no float32 head of a known form, its input size is not a multiple of 32, or it has one."""
    graph = model.graph
    found = _head(model)
    if found is None or any(i.name == INPUT for i in graph.input):
        return None
    node, weight, rows_are_tokens = found
    table = array(weight) if rows_are_tokens else array(weight).T  # (vocab, K)
    vocab, k = table.shape
    if k % BLOCK:
        return None
    codes, scales = quantize_rows(table)
    g = bound_matrix(table, codes, scales)
    nb = k // BLOCK
    p = "greedy_head/"
    hidden = node.input[0]
    opset = _opset(model)

    def const(name: str, values: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(values, p + name))
        return p + name

    def reduce(op: str, x: str, axes: list[int], keep: int, out: str) -> onnx.NodeProto:
        if op == "ReduceSum" or opset >= 18:
            return helper.make_node(op, [x, const(out + "_axes", np.array(axes, np.int64))], [p + out], keepdims=keep)
        return helper.make_node(op, [x], [p + out], axes=axes, keepdims=keep)

    graph.input.append(helper.make_tensor_value_info(INPUT, onnx.TensorProto.INT64, [1]))
    graph.initializer.append(helper.make_tensor(INPUT, onnx.TensorProto.INT64, [1], [0]))
    zero, big, one_axis = const("zero", np.array([0], np.int64)), const("all", np.array([np.iinfo(np.int64).max], np.int64)), \
        const("axis", np.array([1], np.int64))
    rows_tensor = p + "rows"
    nodes = [
        helper.make_node("Greater", [INPUT, zero], [p + "on"]),
        helper.make_node("Where", [p + "on", zero, big], [p + "full_end"]),
        helper.make_node("Where", [p + "on", big, zero], [p + "head_end"]),
        helper.make_node("Slice", [hidden, zero, p + "full_end", one_axis], [p + "full_hidden"]),
        helper.make_node("Slice", [hidden, zero, p + "head_end", one_axis], [p + "h"]),
        helper.make_node("MatMulNBits", [p + "h", const("codes", codes), const("scales", scales.reshape(-1))],
                         [p + "approx"], domain="com.microsoft", K=k, N=vocab, bits=8, block_size=BLOCK,
                         accuracy_level=4),
        helper.make_node("Abs", [p + "h"], [p + "abs"]),
        helper.make_node("Reshape", [p + "abs", const("blocks_shape", np.array([0, 0, nb, BLOCK], np.int64))],
                         [p + "blocks"]),
        reduce("ReduceMax", p + "blocks", [-1], 0, "max_blocks"),
        reduce("ReduceSum", p + "abs", [-1], 1, "l1"),
        helper.make_node("Concat", [p + "max_blocks", p + "l1"], [p + "features"], axis=-1),
        helper.make_node("MatMul", [p + "features", const("bound_matrix", g)], [p + "bound"]),
        helper.make_node("Add", [p + "approx", p + "bound"], [p + "upper"]),
        helper.make_node("Sub", [p + "approx", p + "bound"], [p + "lower"]),
        reduce("ReduceMax", p + "lower", [-1], 1, "best_lower"),
        helper.make_node("GreaterOrEqual", [p + "upper", p + "best_lower"], [p + "mask"]),
        helper.make_node("NonZero", [p + "mask"], [p + "nonzero"]),
        helper.make_node("Gather", [p + "nonzero", const("token_axis", np.array(2, np.int64))], [IDS], axis=0),
    ]
    if rows_are_tokens:
        nodes += [helper.make_node("Gather", [weight.name, IDS], [rows_tensor], axis=0),
                  helper.make_node("FusedMatMul", [p + "h", rows_tensor], [LOGITS], domain="com.microsoft",
                                   transB=1, alpha=1.0)]
    else:
        nodes += [helper.make_node("Gather", [weight.name, IDS], [rows_tensor], axis=1),
                  helper.make_node("MatMul", [p + "h", rows_tensor], [LOGITS])]
    for i, name in enumerate(node.input):
        if name == hidden and i == 0:
            node.input[0] = p + "full_hidden"
    position = list(graph.node).index(node)
    for offset, new in enumerate(nodes):
        new.name = new.name or p + new.output[0].rsplit("/", 1)[-1]
        graph.node.insert(position + offset, new)
    graph.output.extend([helper.make_tensor_value_info(IDS, onnx.TensorProto.INT64, ["greedy_candidates"]),
                         helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT,
                                                       ["batch_size", "greedy_positions", "greedy_candidates"])])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    size = codes.nbytes + scales.nbytes + g.nbytes
    return {"bits": 8, "block_size": BLOCK, "bytes": int(size), "vocab": int(vocab)}


def remove_greedy_head(model: onnx.ModelProto) -> bool:
    """Take the greedy head out of ``model`` in place (its switch kept as the constant 0, its nodes pruned);
    False when it has none. ``edgelm draft`` does so: its candidates index the whole vocabulary, which a cut
    head no longer covers, and a draft is only ever read through its logits."""
    from edgelm.export.graph import prune_unused

    graph = model.graph
    if not any(t.name == INPUT for t in graph.initializer):
        return False
    for field in (graph.input, graph.output):
        kept = [v for v in field if v.name not in (INPUT, IDS, LOGITS)]
        del field[:]
        field.extend(kept)
    prune_unused(graph)
    return True
