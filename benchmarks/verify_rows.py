"""Why a speculative verify pass can leave plain greedy on a quantized target: which operator's rows depend
on how many tokens a pass feeds.

    python benchmarks/verify_rows.py MODEL [--tokens 4] [--prompt-tokens 32] [--threads 2] [--stable-rows]

Assisted decoding gives plain greedy's tokens only if the target computes a token's row the same whether it
reads that token alone (a greedy step) or among others (a verify pass). This feeds a random prompt, then
``--tokens`` tokens in one pass and the same tokens one pass each, and prints:

1. every node whose output row differs between the two when the inputs are identical (the first fed token,
   same cache), in graph order, with how far; the nodes before the first one are bit-identical;
2. the logits of each fed token, one pass against one pass each, and whether greedy's pick agrees;
3. onnxruntime's float32 product (MLAS sgemm) with a non-constant right side, by rows: one row against two
   and four. MLAS has a kernel of its own for a single row, which sums in another order; GroupQueryAttention
   multiplies its attention probabilities by V that way, so a greedy step's attention output differs from
   a verify pass's in the last bit. In a float32 graph that stays in the last bits of the logits; in a graph
   that quantizes its activations to int8 (MatMulNBits ``accuracy_level`` 4) a last-bit change can move an
   activation to the next int8 step, and the change grows through the layers (see the README's
   speculative decoding section).

``--stable-rows`` feeds each one-token pass as that token twice and keeps the first row, as the runtime
does when a model is loaded with ``stable_rows``: then no node and no logit should differ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from edgelm.export.onnx_files import session_on_edit

# Output type of an operator when it is not its first input's (the rule for every other operator here).
_INT64_OPS = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}
_BOOL_OPS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "Xor", "IsNaN"}


def _value_types(model: onnx.ModelProto) -> tuple[dict[str, int], set[str]]:
    """Element type of every node output, and the values computed from initializers alone.

    onnx's shape inference stops at the com.microsoft operators these graphs are made of, so the type is
    propagated by a rule that holds for them: an output has its first input's type, except for casts,
    comparisons, shape queries and the block-quantized lookup (its scales' type)."""
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    const = {t.name for t in model.graph.initializer} - set(types)
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = [i for i in node.input if i]
        if node.op_type == "Cast":
            kind = attrs["to"]
        elif node.op_type in _INT64_OPS:
            kind = TensorProto.INT64
        elif node.op_type in _BOOL_OPS:
            kind = TensorProto.BOOL
        elif node.op_type == "ConstantOfShape":
            kind = attrs["value"].data_type if "value" in attrs else TensorProto.FLOAT
        elif node.op_type == "Constant":
            kind = attrs["value"].data_type if "value" in attrs else TensorProto.FLOAT
        elif node.op_type == "Where":
            kind = types.get(node.input[1], TensorProto.UNDEFINED)
        elif node.op_type == "GatherBlockQuantized":
            kind = types.get(node.input[2], TensorProto.FLOAT)
        else:
            kind = types.get(ins[0], TensorProto.UNDEFINED) if ins else TensorProto.UNDEFINED
        for out in node.output:
            if out:
                types[out] = kind
        if all(i in const for i in ins):
            const.update(o for o in node.output if o)
    return types, const


def probed_session(folder: Path, threads: int) -> tuple[ort.InferenceSession, list[str], dict[str, str]]:
    """A session on the export's graph with every float node output that depends on the inputs made a graph
    output too, so the two ways of feeding can be compared node by node. Returns the session, the probed
    values in graph order, and each one's producing operator."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    types, const = _value_types(model)
    declared = {o.name for o in model.graph.output}
    probes, op_of = [], {}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in declared and out not in const and types.get(out) == TensorProto.FLOAT:
                probes.append(out)
                op_of[out] = node.op_type
    model.graph.output.extend(helper.make_tensor_value_info(p, TensorProto.FLOAT, None) for p in probes)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return session_on_edit(model, folder, opts), probes, op_of


class Feeder:
    """Runs the graph on a token list after a cache, the way the runtime feeds a causal export.

    Its own few lines rather than the runtime's ``Decoder``: the Decoder binds only the logits, the hidden
    state and the cache, and this needs every probed node's output back."""

    def __init__(self, sess: ort.InferenceSession, stable_rows: bool = False):
        self.sess = sess
        self.stable_rows = stable_rows
        self.past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in sess.get_outputs()]
        known = {"input_ids", "attention_mask", "position_ids", "logits_to_keep"} | {p.name for p in self.past}
        unknown = [i.name for i in sess.get_inputs() if i.name not in known]
        if unknown or not self.past:
            raise SystemExit(f"verify_rows: {unknown or 'no past_key_values inputs'}: this reads causal LM exports "
                             "with a KV cache (edgelm export of a decoder model)")

    def empty(self) -> list[np.ndarray]:
        dtype = np.float16 if "float16" in self.past[0].type else np.float32
        return [np.zeros((1, p.shape[1], 0, p.shape[3]), dtype) for p in self.past]

    def __call__(self, tokens: list[int], cache: list[np.ndarray]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        start = cache[0].shape[2]
        if self.stable_rows and len(tokens) == 1:  # the token twice, the same position: row 0 cannot see row 1
            values, present = self._run([tokens[0], tokens[0]], cache, [start, start])
            rows = {k: (v[..., :1, :] if v.ndim >= 2 and v.shape[-2] == 2 else v) for k, v in values.items()}
            return rows, [p[:, :, :start + 1] for p in present]
        return self._run(tokens, cache)

    def _run(self, tokens: list[int], cache: list[np.ndarray], positions: list[int] | None = None):
        start = cache[0].shape[2]
        feed = {"input_ids": np.array([tokens], np.int64),
                "attention_mask": np.ones((1, start + len(tokens)), np.int64),
                "position_ids": np.asarray([positions or range(start, start + len(tokens))], np.int64)}
        feed.update({p.name: c for p, c in zip(self.past, cache)})
        values = dict(zip(self.outputs, self.sess.run(None, feed)))
        return values, [values[p.name.replace("past_key_values", "present")] for p in self.past]


def node_diffs(folder: Path, tokens: int = 4, prompt_tokens: int = 32, threads: int = 2,
               seed: int = 0, stable_rows: bool = False) -> dict:
    """The comparisons 1 and 2 of the module's docstring, as data."""
    sess, probes, op_of = probed_session(folder, threads)
    run = Feeder(sess, stable_rows)
    vocab = int(sess.get_outputs()[0].shape[-1]) if isinstance(sess.get_outputs()[0].shape[-1], int) else 1000
    ids = np.random.default_rng(seed).integers(min(100, vocab // 2), vocab, prompt_tokens + tokens).tolist()
    _, cache = run(ids[:prompt_tokens], run.empty())
    together, _ = run(ids[prompt_tokens:], cache)
    alone, step_cache = run(ids[prompt_tokens:prompt_tokens + 1], cache)

    nodes = []  # (value, operator, max |diff| of the first fed token's row), comparable probes only
    for name in probes:
        a, b = together[name], alone[name]
        if a.ndim < 2 or a.shape[-2] != tokens or b.shape[-2] != 1 or a.shape[:-2] != b.shape[:-2] \
                or a.shape[-1] != b.shape[-1]:
            continue  # not a per-token row (masks, cache-length tensors)
        nodes.append((name, op_of[name], float(np.abs(a[..., :1, :] - b).max())))

    logits_alone = [alone["logits"][0, -1]]
    for t in range(1, tokens):
        values, step_cache = run([ids[prompt_tokens + t]], step_cache)
        logits_alone.append(values["logits"][0, -1])
    rows = []
    for t, single in enumerate(logits_alone):
        multi = together["logits"][0, t]
        top2 = np.sort(single)[-2:]
        rows.append({"token": t, "max_diff": float(np.abs(multi - single).max()),
                     "same_pick": int(multi.argmax()) == int(single.argmax()),
                     "top2_margin": float(top2[1] - top2[0])})
    first = next((n for n in nodes if n[2] != 0.0), None)
    return {"nodes": nodes, "first": first, "logits": rows,
            "identical_before_first": nodes.index(first) if first else len(nodes)}


def gemm_rows(t: int = 600, h: int = 128, threads: int = 1) -> dict[str, float]:
    """Comparison 3: ``probs @ V`` as onnxruntime's MatMul computes it with V not a constant (so not
    prepacked, as inside GroupQueryAttention), one row against the same row fed among 2 and among 4."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["P", "V"], ["Y"])], "pv",
        [helper.make_tensor_value_info("P", TensorProto.FLOAT, ["M", t]),
         helper.make_tensor_value_info("V", TensorProto.FLOAT, [t, h])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", h])])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                .SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    probs = rng.random((4, t)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    v = rng.standard_normal((t, h)).astype(np.float32)
    by = {m: sess.run(None, {"P": probs[:m], "V": v})[0][0] for m in (1, 2, 4)}
    return {"1 vs 4 rows": float(np.abs(by[1] - by[4]).max()), "2 vs 4 rows": float(np.abs(by[2] - by[4]).max())}


def report(folder: Path, result: dict, gemm: dict[str, float], tokens: int, stable_rows: bool = False) -> str:
    each = "one pass each (fed twice, as with stable_rows)" if stable_rows else "one pass each"
    lines = [f"{folder}: {tokens} tokens in one pass against {each}, after the same cache", "",
             f"Nodes whose output for the first fed token differs (same inputs), in graph order; the "
             f"{result['identical_before_first']} compared outputs before the first are bit-identical:", "",
             "| node | operator | max abs diff |", "|---|---|---|"]
    differing = [n for n in result["nodes"] if n[2] != 0.0]
    for name, op, diff in differing[:12]:
        lines.append(f"| {name} | {op} | {diff:.3g} |")
    if len(differing) > 12:
        lines.append(f"| ... {len(differing) - 12} more | | |")
    if not differing:
        lines.append("| none | | |")
    lines += ["", "Logits, one pass against one pass each:", "",
              "| fed token | max abs diff | greedy's pick agrees | top-2 margin (one pass each) |", "|---|---|---|---|"]
    lines += [f"| {r['token']} | {r['max_diff']:.3g} | {'yes' if r['same_pick'] else 'NO'} | {r['top2_margin']:.3g} |"
              for r in result["logits"]]
    lines += ["", "onnxruntime MatMul, probabilities x V (V not constant), the first row's max abs diff: "
              + ", ".join(f"{k} {v:.3g}" for k, v in gemm.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("model", type=Path, help="an edgelm export of a causal LM (a folder with model.onnx)")
    parser.add_argument("--tokens", type=int, default=4, help="tokens fed in the one pass, as a verify pass would "
                        "(default 4: a draft of 3 plus the target's own)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="random tokens cached first (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--stable-rows", action="store_true", help="feed each one-token pass as the token twice, as "
                        "a model loaded with stable_rows does (nothing should differ then)")
    args = parser.parse_args(argv)
    if not (args.model / "model.onnx").is_file():
        parser.error(f"{args.model} has no model.onnx: pass the folder edgelm export wrote")
    if args.tokens < 2 or args.prompt_tokens < 1:
        parser.error("--tokens must be at least 2 and --prompt-tokens at least 1")
    result = node_diffs(args.model, args.tokens, args.prompt_tokens, args.threads, stable_rows=args.stable_rows)
    print(report(args.model, result, gemm_rows(threads=args.threads), args.tokens, args.stable_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
