"""How much of the vocabulary the greedy head leaves to compute exactly, and how tight its bound is, on a
real model's hidden states.

    python benchmarks/greedy_head.py EXPORT [--positions 256] [--threads 2]

EXPORT is a float32 causal export with the greedy head (``edgelm export`` adds it unless
``--no-greedy-head``; ``export/greedy_head.py`` says how it works). The script reads the package's
built-in text (``export/data/quality.txt``) through the graph twice in one prefill of ``--positions``
tokens, once through the full float32 head and once through the greedy head with its two inner values
(``approx``, the 8-bit head's logits, and ``bound``, each token's promised bound on |exact - approx|)
made outputs of a copy of the graph, and prints:

1. candidates per position (tokens whose exact logits the head computes): median, 90th and 99th
   percentile, maximum, and their share of the vocabulary. A step's cost beyond the 8-bit head grows
   with them;
2. |full head's logit - approx| / bound over every token and position: the bound holds where this stays
   below 1, and how far below says how much it gives away;
3. the greedy head's pick (the lowest id among its candidates' highest exact logit) against the full
   head's argmax at every position, with the top-2 margin wherever they differ (the candidates' logits
   come from another kernel than the prepacked full head's, so a tie closer than float32 rounding may
   go either way).

Exits 1 when the bound fails anywhere or a pick differs at a margin wider than float32 rounding could
explain (1e-4 of the logits' spread).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from edgelm.export.greedy_head import IDS, INPUT, LOGITS
from edgelm.export.onnx_files import session_on_edit
from edgelm.export.quant.calibrate import builtin_text
from edgelm.runtime.decoder import greedy_picks

PROBES = ("greedy_head/approx", "greedy_head/bound")


def _session(folder: Path, threads: int) -> ort.InferenceSession:
    """The export's graph with the head's approx and bound as outputs too."""
    path = folder / "model.onnx"
    if not path.is_file():
        raise SystemExit(f"greedy_head: {path} does not exist; give an edgelm export folder")
    model = onnx.load(str(path), load_external_data=False)
    if not any(t.name == INPUT for t in model.graph.initializer):
        raise SystemExit(f"greedy_head: {folder} has no greedy head; export the float32 model without "
                         "--no-greedy-head (quantized, mobile and static exports have none)")
    model.graph.output.extend(helper.make_tensor_value_info(p, TensorProto.FLOAT, None) for p in PROBES)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return session_on_edit(model, folder, opts)


def measure(folder: Path, positions: int = 256, threads: int = 2) -> dict:
    """The figures the module docstring lists, for one prefill of the built-in text."""
    from tokenizers import Tokenizer

    sess = _session(folder, threads)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(builtin_text("quality.txt")).ids[:positions]
    n = len(ids)
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64)}
    names = {i.name for i in sess.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    full = sess.run(["logits"], feeds)[0][0]
    logits, cand_ids, cand, approx, bound = sess.run(["logits", IDS, LOGITS, *PROBES],
                                                     {**feeds, INPUT: np.array([1], np.int64)})
    if logits.shape[1] != 0:
        raise SystemExit("greedy_head: the graph still computed the full head with greedy_head=1")
    approx, bound, cand = approx[0], bound[0], cand[0]
    err = np.abs(full - approx)
    # A zero bound (a row of zeros, as some vocabularies keep for unused tokens) promises an exact approx.
    ratio = np.divide(err, bound, out=np.where(err > 0, np.inf, 0.0).astype(np.float32), where=bound > 0)
    # The graph's own rule, to split its concatenated candidates by position.
    counts = (approx + bound >= (approx - bound).max(-1, keepdims=True)).sum(-1)
    if int(counts.sum()) != cand_ids.size:
        raise SystemExit(f"greedy_head: the graph returned {cand_ids.size} candidates, its rule gives {int(counts.sum())}")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = greedy_picks(cand_ids, cand)  # as the runtime picks: every position's row holds all candidates' logits
    best = full.argmax(-1)
    top2 = np.sort(full, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    spread = float((full.max(-1) - full.min(-1)).max())
    differ = np.nonzero(picks != best)[0]
    return {
        "positions": n, "vocab": int(full.shape[-1]),
        "candidates": {"median": float(np.median(counts)), "p90": float(np.percentile(counts, 90)),
                       "p99": float(np.percentile(counts, 99)), "max": int(counts.max()),
                       "mean_share": float(counts.mean() / full.shape[-1])},
        "err_over_bound": {"max": float(ratio.max()), "median": float(np.median(ratio))},
        "bound_median": float(np.median(bound)), "logits_spread": spread,
        "argmax_among_candidates": int(sum(bool(np.isin(best[p], cand_ids[s:s + c]))
                                           for p, (s, c) in enumerate(zip(starts, counts)))),
        "same_pick": int(n - differ.size),
        "differing": [{"position": int(p), "greedy_head": int(picks[p]), "full_head": int(best[p]),
                       "margin": float(margins[p])} for p in differ],
    }


def report(res: dict) -> str:
    c, r = res["candidates"], res["err_over_bound"]
    lines = [
        f"Greedy head on {res['positions']} positions of the built-in text, vocabulary {res['vocab']}:",
        f"- candidates per position: median {c['median']:.0f}, p90 {c['p90']:.0f}, p99 {c['p99']:.0f}, "
        f"max {c['max']} ({c['mean_share']:.3%} of the vocabulary on average)",
        f"- |full head - approx| / bound: max {r['max']:.3f}, median {r['median']:.3f} (the bound holds below 1; "
        f"median bound {res['bound_median']:.3g} against a logits spread of {res['logits_spread']:.1f})",
        f"- full head's argmax among the candidates at {res['argmax_among_candidates']} of {res['positions']} positions; "
        f"same pick as the full head at {res['same_pick']}",
    ]
    for d in res["differing"]:
        lines.append(f"  - position {d['position']}: greedy head {d['greedy_head']}, full head {d['full_head']}, "
                     f"top-2 margin {d['margin']:.3g}")
    return "\n".join(lines)


def failures(res: dict) -> list[str]:
    """What makes the run exit 1: a broken bound, a missing argmax, a pick no rounding explains."""
    out = []
    if res["err_over_bound"]["max"] >= 1:
        out.append(f"the bound failed (error {res['err_over_bound']['max']:.3f} times the bound)")
    if res["argmax_among_candidates"] < res["positions"]:
        out.append("the full head's argmax was not among the candidates somewhere")
    wide = [d for d in res["differing"] if d["margin"] > 1e-4 * res["logits_spread"]]
    if wide:
        out.append(f"{len(wide)} picks differ at margins wider than float32 rounding")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("export", type=Path, help="a float32 causal export folder with the greedy head")
    parser.add_argument("--positions", type=int, default=256,
                        help="tokens of the built-in text read in one prefill (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    args = parser.parse_args(argv)
    if args.positions < 2:
        parser.error("--positions must be at least 2")
    res = measure(args.export, args.positions, args.threads)
    print(report(res))
    bad = failures(res)
    for line in bad:
        print(f"greedy_head: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
