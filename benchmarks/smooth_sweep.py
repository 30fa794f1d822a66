"""What ``int8``'s SmoothQuant alpha buys: one ``int8`` export per alpha, each scored against the float32 export.

    python benchmarks/smooth_sweep.py CHECKPOINT --reference FLOAT32_EXPORT [--alphas 0,0.3,0.5,0.7,0.85,1]
                                      [--out DIR] [--threads N]

Alpha 0 is ``int8`` without smoothing. Each export is scored as ``edgelm bench --reference`` scores one
(``cli/bench_quality.py``): perplexity ratio and mean KL divergence from the float32 graph, on the built-in
text and on the held-out one. One more row takes the alpha-0 export with ``MatMulNBits`` computing in float32
(``accuracy_level`` 0, activations not quantized): how much of the loss is the weights' and how much the int8
activations'. The README's and ``export/quant/int8.py``'s figures for the choice come from this.
About two minutes an export for SmolLM2 on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import onnx

from edgelm.cli.bench_quality import graph_scores, heldout_ids, text_ids


def export_int8(checkpoint: Path, out: Path, alpha: float) -> None:
    """``edgelm export CHECKPOINT OUT --quantize int8`` with the scheme's alpha set to ``alpha`` (0: off)."""
    from edgelm.export import export_model
    from edgelm.export.quant.int8 import Int8Scheme

    saved = Int8Scheme.smooth_alpha
    Int8Scheme.smooth_alpha = alpha or None
    try:
        export_model(checkpoint, out, quantize="int8", overwrite=True, log=lambda line: None)
    finally:
        Int8Scheme.smooth_alpha = saved


def float_compute_copy(folder: Path, out: Path) -> None:
    """OUT: FOLDER's export with every MatMulNBits at accuracy_level 0 (float32 compute on the same weights)."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("model.onnx"))
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 0
    onnx.save(model, str(out / "model.onnx"))


def score(folders: dict[str, Path], reference: Path, texts: dict[str, list[int]],
          threads: int | None) -> dict[str, dict[str, float]]:
    """label -> perplexity ratios and divergences on each text, every export in one pass per text."""
    out: dict[str, dict[str, float]] = {label: {} for label in folders}
    for name, ids in texts.items():
        scores = graph_scores(reference, folders, ids, threads)
        for label in folders:
            out[label][f"{name}_ratio"] = scores[label]["perplexity"] / scores["perplexity"]
            out[label][f"{name}_kl"] = scores[label]["kl_divergence"]
    return out


def markdown(rows: list[tuple[str, dict[str, float]]]) -> str:
    lines = ["| int8 export | perplexity / float32 | held out | KL divergence from float32 | held out |",
             "|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['builtin_ratio']:.4f} | {r['heldout_ratio']:.4f} | {r['builtin_kl']:.5f} | "
                     f"{r['heldout_kl']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the float checkpoint folder the exports come from")
    parser.add_argument("--reference", type=Path, required=True, help="its float32 `edgelm export` folder")
    parser.add_argument("--alphas", default="0,0.3,0.5,0.7,0.85,1", help="comma list; 0 is int8 without smoothing")
    parser.add_argument("--out", type=Path, help="keep the exports here (default: a temporary folder, removed)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        parser.error(f"--alphas {args.alphas!r}: write numbers separated by commas, e.g. 0,0.5,0.7")
    if any(a < 0 or a > 1 for a in alphas):
        parser.error("--alphas: each alpha is between 0 and 1")
    if not (args.reference / "edgelm.json").exists():
        parser.error(f"--reference {args.reference}: not an edgelm export folder (no edgelm.json)")
    work = args.out or Path(tempfile.mkdtemp(prefix="smooth-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    texts = {"builtin": text_ids(args.reference), "heldout": heldout_ids(args.reference)}
    folders: dict[str, Path] = {}
    try:
        for alpha in alphas:
            folder = work / f"int8-alpha{alpha:g}"
            print(f"exporting int8 at alpha {alpha:g} ...", file=sys.stderr, flush=True)
            export_int8(args.checkpoint, folder, alpha)
            folders[f"alpha {alpha:g}" + (" (no smoothing)" if alpha == 0 else "")] = folder
            if alpha == 0:
                exact = work / "int8-alpha0-float-compute"
                float_compute_copy(folder, exact)
                folders["alpha 0, float32 compute (activations not quantized)"] = exact
        print("scoring every export against the float32 one ...", file=sys.stderr, flush=True)
        rows = list(score(folders, args.reference, texts, args.threads).items())
        print(markdown(rows))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
