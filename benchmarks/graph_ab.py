"""What each difference between edgelm's int4 graph and onnxruntime-genai's costs in a decode step.

    python benchmarks/graph_ab.py EXPORT [GENAI_MODEL_ONNX] [--repeats 3]

TIMING ONLY: each variant is EXPORT's graph with one difference from genai's graph taken out by surgery
(``nozp``: MatMulNBits/GatherBlockQuantized without their zero points; ``nobias``: GroupQueryAttention
without the attention-mask bias; ``unfuse``: the fused gate+up product and its Split as two products),
so its outputs are wrong and it is never shipped. Each variant then takes turns with EXPORT in one
process (``bench_graph.interleaved_ratios``, the same driver for both) and the script prints the
median ratio of step times, variant / EXPORT: below 1, removing that difference makes a step cheaper.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgelm.cli.bench_graph import interleaved_ratios

VARIANTS = ("nozp", "nobias", "unfuse", "nozp,nobias,unfuse")


def make_variant(src: Path, dst: Path, what: set[str]) -> Path:
    """Write DST: SRC's graph with the named differences from genai's graph removed (timing only)."""
    m = onnx.load(str(src / "model.onnx"))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    def arr(n): return numpy_helper.to_array(inits[n])
    def add_init(a, name):
        t = numpy_helper.from_array(a, name); g.initializer.append(t); inits[name] = t
    if "nozp" in what:
        for n in g.node:
            if n.op_type == "MatMulNBits" and len(n.input) > 3: del n.input[3:]
            if n.op_type == "GatherBlockQuantized" and len(n.input) > 3: del n.input[3:]
    if "nobias" in what:
        for n in g.node:
            if n.op_type == "GroupQueryAttention" and len(n.input) > 10: del n.input[10:]
    if "unfuse" in what:
        prod = {o: n for n in g.node for o in n.output}
        new = []
        for n in list(g.node):
            if n.op_type != "Split": continue
            mm = prod[n.input[0]]
            if mm.op_type != "MatMulNBits": continue
            N = [a.i for a in mm.attribute if a.name == "N"][0]; half = N // 2
            cast = prod[mm.input[2]]
            B, S = arr(mm.input[1]), arr(cast.input[0]); Z = arr(mm.input[3]) if len(mm.input) > 3 else None
            for j, out in enumerate(n.output):
                sl = slice(j * half, (j + 1) * half); base = f"{mm.name}_part{j}"
                add_init(np.ascontiguousarray(B[sl]), base + "_B"); add_init(np.ascontiguousarray(S[sl]), base + "_S16")
                Z is not None and add_init(np.ascontiguousarray(Z[sl]), base + "_Z")
                new.append(helper.make_node("Cast", [base + "_S16"], [base + "_S"], to=1, name=base + "_cast"))
                attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}; attrs["N"] = half
                new.append(helper.make_node("MatMulNBits", [mm.input[0], base + "_B", base + "_S"] + ([base + "_Z"] if Z is not None else []), [out],
                                            domain="com.microsoft", name=base, **attrs))
            g.node.remove(n); g.node.remove(mm); g.node.remove(cast)
        g.node.extend(new)
        # topological order
        ready = {i.name for i in g.input} | set(inits) | {""}
        order, pending = [], list(g.node)
        while pending:
            rest = []
            for n in pending:
                (order.append(n), ready.update(n.output)) if all(i in ready for i in n.input) else rest.append(n)
            assert len(rest) < len(pending); pending = rest
        del g.node[:]; g.node.extend(order)
    # prune dead nodes and initializers
    need = {o.name for o in g.output}; keep = []
    for n in reversed(list(g.node)):
        if any(o in need for o in n.output): keep.append(n); need.update(n.input)
    del g.node[:]; g.node.extend(reversed(keep))
    live = [i for i in g.initializer if i.name in need]; del g.initializer[:]; g.initializer.extend(live)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.startswith("model.onnx"): shutil.copy(f, dst / f.name)
    onnx.save(m, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Example: python benchmarks/graph_ab.py bench-results/models/smollm2-int4 "
                                        "~/.cache/edgelm/bench/genai-int4-*/model.onnx")
    ap.add_argument("export", type=Path, help="an edgelm int4 export folder")
    ap.add_argument("anchor", nargs="?", type=Path, help="also time this graph (genai's model.onnx) against EXPORT")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements per variant (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not (args.export / "model.onnx").is_file():
        ap.error(f"{args.export} holds no model.onnx: pass an edgelm export folder")
    base = args.export / "model.onnx"
    with tempfile.TemporaryDirectory(prefix="graph_ab_") as tmp:
        graphs = [(v, make_variant(args.export, Path(tmp) / v.replace(",", "-"), set(v.split(",")))) for v in VARIANTS]
        if args.anchor:
            graphs.append(("anchor", args.anchor))
        print("| variant | step time / edgelm's, medians of interleaved rounds |\n|---|---|")
        for name, path in graphs:
            print(f"progress: {name}", file=sys.stderr, flush=True)
            rs = [statistics.median(interleaved_ratios(base, path, args.threads, 64)["ratios"])
                  for _ in range(args.repeats)]
            print(f"| {name} | {', '.join(f'{r:.3f}' for r in rs)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
