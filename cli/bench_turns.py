"""End-to-end greedy decode against onnxruntime-genai, both in one process taking turns.

``edgelm bench --anchors`` times each system in fresh processes, which is what a user starting a
program sees, but on a small shared virtual machine fresh processes of the same build read up to
±20% apart, so a few percent between edgelm and genai is lost in the drift. ``bench_graph
--interleaved`` removes the drift for the bare graphs, and so leaves out each runtime's own loop
(edgelm's generate in Python, genai's in C++). This puts both loops in one process: each round
runs one whole greedy generation of each (``bench_workers.run_turns``), in alternating order, and
takes the ratio of their decode rates, so both meet the same moment of the machine. ``--control``
adds genai against itself, the noise floor of the method.

    python -m edgelm.cli.bench_turns EXPORT [EXPORT ...] --checkpoint CKPT [--genai-python PY]
        [--runs 5] [--rounds 12] [--threads 2] [--new-tokens 128] [--prompt 64] [--control] [--out FILE]

Each EXPORT is compared with genai's build of CKPT at its precision (``edgelm bench --anchors``
makes it; a ``gguf`` export meets genai's int4). The genai venv runs the processes, so edgelm must be
installed there too (``benchmarks/run.sh`` does: ``.venv-genai/bin/pip install --no-deps -e .``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgelm.cli import bench_workers


def _genai_python(given: str | None) -> str:
    """A Python that imports both onnxruntime_genai and edgelm: ``given``, else ``edgelm bench``'s default."""
    from edgelm.cli.bench import _genai_python as find

    def imports(python: str, module: str) -> bool:
        return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0

    if given is not None and not imports(given, "onnxruntime_genai"):
        raise SystemExit(f"bench_turns: {given} cannot import onnxruntime_genai; benchmarks/run.sh makes .venv-genai "
                         "with it")
    python = given or find(None)
    if python is None:
        raise SystemExit("bench_turns: no Python with onnxruntime_genai (give --genai-python, or run "
                         "benchmarks/run.sh once to make .venv-genai)")
    if not imports(python, "edgelm.runtime"):
        raise SystemExit(f"bench_turns: {python} has onnxruntime_genai but cannot import edgelm; install it there: "
                         f"{python} -m pip install --no-deps -e {Path(__file__).resolve().parents[1]}")
    return python


def _anchor(export: Path, checkpoint: Path) -> Path:
    """genai's build at ``export``'s precision; a SystemExit naming the command that makes it when it is missing."""
    from edgelm.cli.bench import GENAI_PRECISION, _precision, genai_build_dir
    from edgelm.runtime.manifest import read_manifest

    if not (export / "edgelm.json").is_file():
        raise SystemExit(f"bench_turns: {export} is not an edgelm export folder (no edgelm.json)")
    folder = genai_build_dir(checkpoint, GENAI_PRECISION[_precision(read_manifest(export))])
    if not (folder / "genai_config.json").is_file():
        raise SystemExit(f"bench_turns: no genai build at {folder}; `edgelm bench {export} --anchors --checkpoint "
                         f"{checkpoint}` (or benchmarks/run.sh) builds it")
    return folder


def _process(python: str, export: Path, anchor: Path, players: list[str], req: dict[str, Any]) -> dict[str, Any]:
    request = {**req, "players": players, "genai_model": str(anchor)}
    proc = subprocess.run([python, bench_workers.__file__, "turns", str(export), json.dumps(request)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SystemExit(f"bench_turns: the process for {export} ({' vs '.join(players)}) failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def measure(exports: list[Path], checkpoint: Path, python: str, runs: int, req: dict[str, Any], control: bool,
            log=print) -> list[dict[str, Any]]:
    """One row per comparison: every round's ratio over ``runs`` fresh processes, each loading the two in the
    other order from the last (so neither always loads, or runs, first)."""
    from edgelm.cli.bench import _prompt_ids

    rows = []
    cases = [(e, _anchor(e, checkpoint), ["edgelm", "genai"]) for e in exports]
    if control:
        for anchor in dict.fromkeys(a for _, a, _ in cases):
            export = next(e for e, a, _ in cases if a == anchor)
            cases.append((export, anchor, ["genai", "genai"]))
    for export, anchor, players in cases:
        ids = _prompt_ids(str(export), req["prompt"], None)
        ratios, rates, used, versions = [], [], None, None
        for run in range(runs):
            log(f"progress: {export.name} {' vs '.join(players)}, process {run + 1}/{runs}")
            flip = run % 2 == 1  # by the process, not by the names: a control's two players share one name
            order = players[::-1] if flip else players
            out = _process(python, export, anchor, order, {**req, "prompt_ids": ids})
            for a, b in out["rates"]:
                first, second = (b, a) if flip else (a, b)
                rates.append((first, second))
                ratios.append(first / second)
            used = out["threads_used"][::-1] if flip else out["threads_used"]
            versions = out["versions"]
        rows.append({"export": str(export), "anchor": str(anchor), "players": players, "ratios": ratios,
                     "rates": rates, "threads_used": used, "versions": versions})
    return rows


def markdown(rows: list[dict[str, Any]], req: dict[str, Any], runs: int) -> str:
    lines = [f"Greedy decode end to end, edgelm's generate and onnxruntime-genai's generator in one process taking "
             f"turns ({req['prompt']}-token prompt, {req['new_tokens']} new tokens a generation, {req['rounds']} "
             f"rounds in each of {runs} fresh processes, {req['threads']} threads each; decode tokens/s from the "
             "first token after the prefill): each round's ratio, median (interquartile range)", "",
             "| edgelm export | against | tokens/s, first / second, in one process | first tokens/s | "
             "second tokens/s |", "|---|---|---|---|---|"]
    for row in rows:
        lo, mid, hi = _quartiles(row["ratios"])
        first = statistics.median(a for a, _ in row["rates"])
        second = statistics.median(b for _, b in row["rates"])
        who = ("edgelm " + Path(row["export"]).name if row["players"][0] == "edgelm"
               else f"genai {Path(row['anchor']).name} (control)")
        lines.append(f"| {who} | genai {Path(row['anchor']).name} | {mid:.3f}x ({lo:.3f}-{hi:.3f}) | {first:.1f} | "
                     f"{second:.1f} |")
    if rows:
        used = "; ".join(f"{p}: {u}" for p, u in zip(rows[0]["players"], rows[0]["threads_used"]))
        lines += ["", f"Threads each ran with: {used}. Versions: {rows[0]['versions']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgelm.cli.bench_turns", description=__doc__.split("\n\n")[0],
                                epilog="Example: python -m edgelm.cli.bench_turns bench-results/models/smollm2-int4 "
                                       "--checkpoint ~/.cache/edgelm/models/smollm2-135m-instruct --control")
    p.add_argument("exports", nargs="+", type=Path, metavar="EXPORT", help="edgelm export folders")
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint genai's builds were made from")
    p.add_argument("--genai-python", help="a Python with onnxruntime_genai and edgelm (default: .venv-genai)")
    p.add_argument("--runs", type=int, default=5, help="fresh processes per comparison (default 5)")
    p.add_argument("--rounds", type=int, default=12, help="turns of each system per process (default 12)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both (default 2)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per generation (default 128)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--control", action="store_true", help="also each genai build against itself (the noise floor)")
    p.add_argument("--out", help="also write the JSON result here")
    args = p.parse_args(argv)
    for name in ("runs", "rounds", "threads", "new_tokens", "prompt"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    python = _genai_python(args.genai_python)
    req = {"rounds": args.rounds, "threads": args.threads, "new_tokens": args.new_tokens, "prompt": args.prompt}
    rows = measure(args.exports, args.checkpoint, python, args.runs, req, args.control,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(rows, req, args.runs))
    if args.out:
        Path(args.out).write_text(json.dumps({"request": req, "runs": args.runs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
