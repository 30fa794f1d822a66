"""What each difference between edgelm's int4 graph and onnxruntime-genai's costs in a decode step.

    python benchmarks/graph_ab.py EXPORT [GENAI_MODEL_ONNX | genai:int4 --checkpoint CKPT] [--repeats 4]
        [--variants nooffsets]

TIMING ONLY: each variant is EXPORT's graph with one difference from genai's graph taken out by surgery
(``nozp``: MatMulNBits/GatherBlockQuantized without their zero points; ``nobias``: GroupQueryAttention
without the attention-mask bias; ``unfuse``: the fused gate+up product and its Split as two products;
``nooffsets``, for a ``gguf`` export of Q4_1 / Q4_K weights: the per-block offsets' operators), never
shipped: without zero points or offsets the logits are wrong (the others gave the same logits as EXPORT
for one unpadded row, checked when this script was written). Each variant then takes turns with EXPORT in one
process (``bench_graph.interleaved``, the same driver for both, the two swapping load order from one
fresh process to the next), and the script prints the median ratio of step times, variant / EXPORT:
below 1, removing that difference makes a step cheaper. The ``control`` row is EXPORT against itself.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgelm.cli.bench_graph import interleaved, resolve
from edgelm.export import onnx_files
from edgelm.export.graph import prune_unused
from edgelm.export.quant.rewrite import MS, node_attr

VARIANTS = ("nozp", "nobias", "unfuse", "nozp,nobias,unfuse")


def _drop_zero_points(g: onnx.GraphProto) -> None:
    """genai's int4 is symmetric: its products read no zero points."""
    for n in g.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            del n.input[3:]


def _drop_attention_bias(g: onnx.GraphProto) -> None:
    """genai's attention takes no mask bias (padding is ours to support, one unpadded row does not need it)."""
    for n in g.node:
        if n.op_type == "GroupQueryAttention":
            del n.input[10:]


def _unfuse_gate_up(g: onnx.GraphProto) -> None:
    """Each MatMulNBits + Split pair becomes two MatMulNBits over the halves of its rows, put where the pair
    was (its inputs are defined before it, the Split's readers come after), so the order stays valid."""
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    fused = {n.name: producer[n.input[0]] for n in g.node
             if n.op_type == "Split" and getattr(producer.get(n.input[0]), "op_type", "") == "MatMulNBits"}
    skip = {mm.name for mm in fused.values()}
    nodes = []
    for n in g.node:
        if n.name not in fused:
            if n.name not in skip:
                nodes.append(n)
            continue
        mm = fused[n.name]
        half = node_attr(mm, "N", 0) // 2
        parts = []
        for name in mm.input[1:]:  # codes, scales (float32 or cast from float16), zero points
            cast = producer.get(name)
            parts.append((onnx_files.array(inits[cast.input[0] if cast else name]), cast is not None))
        attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute} | {"N": half}
        for j, out in enumerate(n.output):
            base, ins = f"{mm.name}_part{j}", [mm.input[0]]
            for k, (values, cast) in enumerate(parts):
                name = f"{base}_in{k}"
                g.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(values[j * half:(j + 1) * half]), name + ("_f16" if cast else "")))
                if cast:
                    nodes.append(helper.make_node("Cast", [name + "_f16"], [name], to=onnx.TensorProto.FLOAT))
                ins.append(name)
            nodes.append(helper.make_node("MatMulNBits", ins, [out], domain=MS, name=base, **attrs))
    del g.node[:]
    g.node.extend(nodes)


def _drop_offsets(g: onnx.GraphProto) -> None:
    """A ``gguf`` export of an affine format (Q4_1, Q4_K) adds to each product (per-block activation sums) x
    (offsets), three operators per matrix (``export/quant/rewrite.py``); without them the graph is what the
    same codes and scales cost alone: the most that any faster exact form of the offsets could win."""
    producer = {o: n for n in g.node for o in n.output}

    def kinds(n: onnx.NodeProto) -> list[str | None]:
        return [getattr(producer.get(i), "op_type", None) for i in n.input]

    outputs = {o.name for o in g.output}
    take = {n.output[0]: n.input[0] for n in g.node
            if n.op_type == "Add" and kinds(n) == ["MatMulNBits", "MatMul"] and n.output[0] not in outputs}
    kept = [n for n in g.node if n.output[0] not in take]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in take:
                n.input[i] = take[name]
    del g.node[:]
    g.node.extend(kept)


SURGERIES = {"nozp": _drop_zero_points, "nobias": _drop_attention_bias, "unfuse": _unfuse_gate_up,
             "nooffsets": _drop_offsets}


def make_variant(src: Path, dst: Path, what: list[str]) -> Path:
    """Write DST: SRC's export with the named differences from genai's graph removed (timing only)."""
    model = onnx_files.load_graph(src / "model.onnx")
    for name in what:
        SURGERIES[name](model.graph)
    prune_unused(model.graph)  # what only the removed inputs read (the mask chain, old weights)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx*"))
    onnx_files.save(model, dst / "model.onnx")
    return dst / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Example: python benchmarks/graph_ab.py bench-results/models/smollm2-int4 "
                                        "~/.cache/edgelm/bench/genai-int4-*/model.onnx")
    ap.add_argument("export", type=Path, help="an edgelm export folder (int4; gguf for nooffsets)")
    ap.add_argument("anchor", nargs="?", help="also time this graph against EXPORT: genai's model.onnx, or "
                                              "genai:PRECISION with --checkpoint (as bench_graph takes it)")
    ap.add_argument("--checkpoint", help="the checkpoint a genai:PRECISION anchor was built from")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="V",
                    help=f"surgeries to time, each a comma-joined list of {', '.join(SURGERIES)} (default: "
                         f"{' '.join(VARIANTS)}, the differences from genai's int4; nooffsets is for a gguf export)")
    ap.add_argument("--repeats", type=int, default=4, help="fresh processes per variant, each taking turns with "
                                                           "EXPORT (default 4: each load order twice)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads, the same for every graph (default 2)")
    args = ap.parse_args(argv)
    if not (args.export / "model.onnx").is_file():
        ap.error(f"{args.export} holds no model.onnx: pass an edgelm export folder")
    unknown = sorted({s for v in args.variants for s in v.split(",")} - set(SURGERIES))
    if unknown:
        ap.error(f"unknown variant {', '.join(unknown)}: choose from {', '.join(SURGERIES)}")
    base = args.export / "model.onnx"
    anchor = resolve(args.anchor, args.checkpoint) if args.anchor else None
    with tempfile.TemporaryDirectory(prefix="graph_ab_") as tmp:
        graphs = [("control", base)]
        graphs += [(v, make_variant(args.export, Path(tmp) / v.replace(",", "-"), v.split(","))) for v in args.variants]
        if anchor:
            graphs.append(("anchor", anchor))
        print(f"| variant ({args.threads} intra-op threads each) | step time / edgelm's, median (interquartile range) "
              f"of {args.repeats} processes' rounds |\n|---|---|")
        for name, path in graphs:
            print(f"progress: {name}", file=sys.stderr, flush=True)
            (row,) = interleaved([(base, path)], args.repeats, args.threads, 64)
            r = row["ratio"]
            print(f"| {name} | {r['median']:.3f} ({r['q1']:.3f}-{r['q3']:.3f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
