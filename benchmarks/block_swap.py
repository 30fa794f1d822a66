"""Which matrices' block size costs quality: an export with chosen matrices taken from another export of the
same model (another ``--block-size``), and the perplexity ratio of each such mix.

    python benchmarks/block_swap.py BASE DONOR --reference FLOAT32_EXPORT [--take LAYERS:ROLES ...] [--sweep]

BASE and DONOR are ``edgelm export --quantize int4|int8`` folders of one checkpoint that differ in their
blocks (``--block-size 64`` and the default, say). A mix is BASE with the MatMulNBits of the named layers
and roles (``qkv``, ``o``, ``gate_up``, ``down``, ``head``) replaced by DONOR's: the operator's block size
and the codes, scales and zero points it reads. Both exports quantize every matrix from the same float
graph's calibration activations, so a mix is what an export with those blocks per matrix would write.
Each mix is scored like ``edgelm bench --reference`` scores an export: perplexity over the float32
export's, on the built-in quality text and on the held-out text (``cli/bench_quality.py``).

``--sweep`` scores every (layer, role) taken alone. Why the README warns against choosing a mix from
it: the swaps' gains on the built-in text do not add up (on SmolLM2 they summed to 4.5 times what
taking all of them gains), and a mix of the twelve largest came close to blocks of 32 on that text
(1.0975 against 1.0900, from 1.1524) while the held-out text saw no gain (1.0706 against 1.0728): the
choice fits the text's noise.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import onnx

from edgelm.cli.bench_quality import graph_perplexity, heldout_ids, text_ids
from edgelm.export import onnx_files

ROLES = ("qkv", "o", "gate_up", "down", "head")
_LAYER = re.compile(r"/(?:layers|h|layer)\.(\d+)/")


def role_of(node: onnx.NodeProto) -> tuple[int | None, str]:
    """(layer, role) of a MatMulNBits, read from the name of the activation it multiplies (the exporter
    keeps PyTorch's module path in it); the LM head reads the final hidden state and has no layer."""
    source = node.input[0]
    match = _LAYER.search(source)
    if match is None:
        return None, "head"
    layer = int(match.group(1))
    if "GroupQueryAttention" in source or ("attn" in source and "layernorm" not in source):
        return layer, "o"
    if "input_layernorm" in source or "ln_1" in source:
        return layer, "qkv"
    if "post_attention_layernorm" in source or "ln_2" in source:
        return layer, "gate_up"
    return layer, "down"


def _weights_read(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], inits: set[str]) -> list[str]:
    """The initializers a MatMulNBits reads (codes, scales, zero points), through a load-time Cast where the
    file stores float16 scales."""
    names = []
    for name in node.input[1:]:
        if name in inits:
            names.append(name)
        elif name in producer and producer[name].op_type == "Cast" and producer[name].input[0] in inits:
            names.append(producer[name].input[0])
    return names


def swap(base: Path, donor: Path, out: Path, take: Callable[[int | None, str], bool]) -> int:
    """Write OUT: BASE's export with every MatMulNBits that ``take(layer, role)`` selects taken from DONOR.
    Returns how many were taken."""
    model = onnx_files.load_graph(base / "model.onnx")
    other = onnx_files.load_graph(donor / "model.onnx")
    theirs = {n.name: n for n in other.graph.node if n.op_type == "MatMulNBits"}
    their_inits = {t.name: t for t in other.graph.initializer}
    ours = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    taken = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not take(*role_of(node)):
            continue
        if node.name not in theirs:
            raise SystemExit(f"{donor} has no MatMulNBits named {node.name}: BASE and DONOR must be exports of "
                             "the same model by the same edgelm, differing only in --block-size")
        node.ClearField("attribute")
        node.attribute.extend(theirs[node.name].attribute)
        for name in _weights_read(node, producer, set(ours)):
            if name not in their_inits:
                raise SystemExit(f"{donor} lacks the initializer {name} of {node.name}: not the same export layout")
            ours[name].CopyFrom(their_inits[name])
        taken += 1
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("model.onnx*"))
    onnx_files.save(model, out / "model.onnx")
    return taken


def parse_take(spec: str) -> Callable[[int | None, str], bool]:
    """``LAYERS:ROLES``, each a comma list or ``all``, layers may be ranges (``0-3,29:down,qkv``); several
    joined by ``+`` take the union (``29:down+13:qkv``)."""
    if "+" in spec:
        parts = [parse_take(part) for part in spec.split("+")]
        return lambda layer, role: any(part(layer, role) for part in parts)
    if spec.count(":") != 1:
        raise SystemExit(f"--take {spec!r}: write LAYERS:ROLES, e.g. 0-3,29:down or all:qkv,gate_up")
    layers_s, roles_s = spec.split(":")
    roles = set(ROLES) if roles_s == "all" else set(roles_s.split(","))
    unknown = roles - set(ROLES)
    if unknown:
        raise SystemExit(f"--take {spec!r}: unknown role {', '.join(sorted(unknown))}; choose from {', '.join(ROLES)}")
    layers: set[int] | None = None
    if layers_s != "all":
        layers = set()
        for part in layers_s.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise SystemExit(f"--take {spec!r}: layers are numbers, ranges (0-3) or all")
            layers.update(range(int(lo), int(hi or lo) + 1))
    return lambda layer, role: role in roles and (role == "head" or layers is None or layer in layers)


def single_swaps(model: onnx.ModelProto) -> list[tuple[str, Callable[[int | None, str], bool]]]:
    """``--sweep``'s mixes: each (layer, role) of the graph alone, labelled with the ``--take`` spec that
    selects it (the head has no layer: ``all:head``), layer by layer."""
    seen = sorted({role_of(n) for n in model.graph.node if n.op_type == "MatMulNBits"},
                  key=lambda lr: (lr[0] is None, lr[0] or 0, ROLES.index(lr[1])))
    return [(f"{'all' if layer is None else layer}:{role}", lambda l, r, lr=(layer, role): (l, r) == lr)
            for layer, role in seen]


class Scorer:
    """Perplexity ratios against the float32 export, on the built-in and the held-out text, as ``edgelm bench
    --reference`` computes them (``bench_quality``), with the reference's perplexities computed once for a
    whole sweep instead of once per mix."""

    def __init__(self, reference: Path):
        self.texts = (text_ids(reference), heldout_ids(reference))
        self.reference = [graph_perplexity(reference, ids) for ids in self.texts]

    def __call__(self, folder: Path) -> tuple[float, float]:
        built_in, held = (graph_perplexity(folder, ids) / ref for ids, ref in zip(self.texts, self.reference))
        return built_in, held


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Example: python benchmarks/block_swap.py bench-results/models/smollm2-int4-b64 "
                                        "bench-results/models/smollm2-int4 --reference bench-results/models/smollm2-fp32 "
                                        "--take all:down 0-3:all")
    ap.add_argument("base", type=Path, help="the export to change (e.g. --block-size 64)")
    ap.add_argument("donor", type=Path, help="the export whose matrices are taken (same model, other blocks)")
    ap.add_argument("--reference", type=Path, required=True, help="the float32 export of the same model")
    ap.add_argument("--take", nargs="*", default=[], metavar="LAYERS:ROLES",
                    help=f"mixes to score, each LAYERS:ROLES (roles: {', '.join(ROLES)}; 'all' for either part; "
                         "several joined by + are one mix)")
    ap.add_argument("--sweep", action="store_true", help="also score every (layer, role) taken alone")
    args = ap.parse_args(argv)
    for folder in (args.base, args.donor, args.reference):
        if not (folder / "model.onnx").is_file():
            ap.error(f"{folder} holds no model.onnx: pass edgelm export folders")
    mixes = [(spec, parse_take(spec)) for spec in args.take]
    if args.sweep:
        mixes += single_swaps(onnx.load(str(args.base / "model.onnx"), load_external_data=False))
    score = Scorer(args.reference)
    print("| mix (BASE with these from DONOR) | matrices taken | perplexity / float32 | held out |\n|---|---|---|---|")
    for spec, take in [("none (BASE)", lambda layer, role: False), ("all (DONOR)", lambda layer, role: True)] + mixes:
        print(f"progress: {spec}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="block_swap_") as tmp:
            taken = swap(args.base, args.donor, Path(tmp) / "mix", take)
            ratio, held = score(Path(tmp) / "mix")
        print(f"| {spec} | {taken} | {ratio:.4f} | {held:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
