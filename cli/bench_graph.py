"""Decode-step time of bare graphs: edgelm's export against onnxruntime-genai's build, without either's loop.

``edgelm bench`` times whole generations, where each system's own loop (Python for edgelm, C++ for
genai) is part of the figure. This times the graphs alone, with the same driver for both: raw
onnxruntime, one token per step on a KV cache that grows from ``--prompt`` slots, past and present
bound to one buffer (as both runtimes run their GroupQueryAttention graphs). So the difference
between this table and ``edgelm bench``'s says how much each runtime adds around its graph.

Each round runs every graph in a fresh process, one after the other (no idle thread pool of one
graph spinning beside another's); the figure is the median over rounds of each round's median step.
``--interleaved`` adds a finer comparison of each pair: both graphs in one process, taking turns;
``--control`` adds each anchor against itself, the noise floor of that comparison.

    python -m edgelm.cli.bench_graph GRAPH [GRAPH ...] [--runs 5] [--threads 2] [--prompt 64] [--steps 128]
        [--pairs [--interleaved [--control]]] [--profile] [--out FILE]

A GRAPH is an export folder (``model.onnx`` inside, an edgelm export or a genai build), an ``.onnx``
file, or ``genai:PRECISION`` (fp32, int8, int4) for the build ``edgelm bench --anchors`` made of
``--checkpoint``. A graph with the greedy head (float32 edgelm exports, ``export.greedy_head``) runs
it, as the runtime's greedy search does; ``GRAPH@full-head`` runs the same graph through its float32
LM head instead (``bench_graph G G@full-head --pairs --interleaved`` measures what the head saves).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgelm.runtime.decoder import GREEDY_HEAD, GREEDY_IDS, GREEDY_LOGITS

WARMUP_STEPS = 16
FULL_HEAD = "@full-head"


def _file(path: Path) -> tuple[Path, bool]:
    """The .onnx file of a resolved GRAPH, and whether it runs its greedy head (``@full-head``: no)."""
    text = str(path)
    if text.endswith(FULL_HEAD):
        return Path(text[: -len(FULL_HEAD)]), False
    return path, True


def resolve(spec: str, checkpoint: str | None) -> Path:
    """The .onnx file a GRAPH argument names (``@full-head`` kept on its end); a clear SystemExit when there is none."""
    if spec.endswith(FULL_HEAD):
        return Path(str(resolve(spec[: -len(FULL_HEAD)], checkpoint)) + FULL_HEAD)
    if spec.startswith("genai:"):
        from edgelm.cli.bench import genai_build_dir

        if not checkpoint:
            raise SystemExit(f"bench_graph: {spec} needs --checkpoint (the checkpoint genai's build was made from)")
        folder = genai_build_dir(Path(checkpoint), spec.split(":", 1)[1])
        if not (folder / "model.onnx").is_file():
            raise SystemExit(f"bench_graph: no genai build at {folder}; `edgelm bench --anchors` (or "
                             "benchmarks/run.sh) builds it")
        return folder / "model.onnx"
    path = Path(spec)
    if path.is_dir():
        path = path / "model.onnx"
    if path.suffix != ".onnx" or not path.is_file():
        raise SystemExit(f"bench_graph: {spec} is neither an export folder with model.onnx nor an .onnx file")
    return path


class _Graph:
    """One graph's session and KV cache, driven one token per step: the same driver for every graph.

    A GroupQueryAttention graph runs with past and present in one buffer (both runtimes do so); any
    other graph concatenates, with each step's presents fed back as the next past.
    """

    def __init__(self, path: Path, threads: int, prompt: int, capacity: int, profile: bool = False,
                 spin_stop: bool = False):
        import numpy as np
        import onnx
        import onnxruntime as ort

        path, greedy = _file(path)
        self.np = np
        self.shared = any(n.op_type == "GroupQueryAttention"
                          for n in onnx.load(str(path), load_external_data=False).graph.node)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if spin_stop:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.profile_dir = None
        if profile:
            import tempfile

            self.profile_dir = Path(tempfile.mkdtemp(prefix="bench_graph_"))
            opts.enable_profiling = True
            opts.profile_file_prefix = str(self.profile_dir / "profile")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        pasts = [n for n in self.inputs if n.startswith("past_key_values.")]
        if not pasts or "input_ids" not in self.inputs or "attention_mask" not in self.inputs:
            raise SystemExit(f"bench_graph: {path} is not a causal LM graph with a KV cache in optimum's naming")
        heads, size = _cache_dims(path, self.inputs[pasts[0]].shape)
        self.values = {}
        for name in pasts:
            dtype = np.float16 if self.inputs[name].type == "tensor(float16)" else np.float32
            slots = capacity if self.shared else prompt
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, slots, size), dtype))
        self.binding = self.session.io_binding()
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.token = np.array([[100]], np.int64)
        self.prompt = self.past = prompt
        self.head = None
        if any(i.name == GREEDY_HEAD for i in self.session.get_overridable_initializers()):
            self.head = ort.OrtValue.ortvalue_from_numpy(np.array([int(greedy)], np.int64))

    def step(self) -> float:
        """One decode step on the cache as it stands; its seconds inside onnxruntime's run."""
        np, past = self.np, self.past
        feeds = {"input_ids": self.token, "attention_mask": np.ones((1, past + 1), np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.array([[past]], np.int64)
        for key, value in feeds.items():
            self.binding.bind_cpu_input(key, value)
        first = not self.shared or past == self.prompt  # a shared buffer is bound once, on the first step
        if first:
            for name, value in self.values.items():
                self.binding.bind_ortvalue_input(name, value)
        if self.head is not None:
            self.binding.bind_ortvalue_input(GREEDY_HEAD, self.head)
        # Outputs are bound in the graph's order (get_outputs() answers in binding order); the greedy head's
        # change size every step, so they are bound anew each step, as the runtime does.
        for out in self.outputs:
            present = out.replace("present.", "past_key_values.")
            if self.shared and present in self.values:
                if first:
                    self.binding.bind_ortvalue_output(out, self.values[present])
            elif first or out in (GREEDY_IDS, GREEDY_LOGITS):
                self.binding.bind_output(out)
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        elapsed = time.perf_counter() - start
        if not self.shared:
            got = dict(zip(self.outputs, self.binding.get_outputs()))
            for name in self.values:
                self.values[name] = got[name.replace("past_key_values.", "present.")]
        self.past += 1
        return elapsed

    def cache_written(self) -> bool:
        """Each step's keys reached the cache (in place for a shared buffer, and nothing past the last step)."""
        first = next(iter(self.values.values())).numpy()
        last = self.past
        return bool(self.np.abs(first[:, :, last - 1]).sum() > 0) and (not self.shared or not first[:, :, last:].any())


def step_times(path: Path, threads: int, prompt: int, steps: int, profile: bool = False) -> dict:
    """Per-step seconds of one graph, in this process; with ``profile``, onnxruntime's per-operator kernel
    times instead (the profiler's own cost makes its step times no figure to compare)."""
    graph = _Graph(path, threads, prompt, prompt + WARMUP_STEPS + steps + 1, profile)
    try:
        for _ in range(WARMUP_STEPS):
            graph.step()
        times = [graph.step() for _ in range(steps)]
        written = graph.cache_written()
        if profile:
            return {"operators": _operator_times(Path(graph.session.end_profiling())), "cache_written": written}
    finally:  # the profile's folder goes whether the steps finished or raised
        if graph.profile_dir is not None:
            shutil.rmtree(graph.profile_dir, ignore_errors=True)
    return {"median_s": statistics.median(times), "threads": graph.session.get_session_options().intra_op_num_threads,
            "cache": "shared buffer" if graph.shared else "concat", "cache_written": written}


INTERLEAVED_ROUNDS = 24
INTERLEAVED_BLOCK = 8


def interleaved_ratios(ours: Path, theirs: Path, threads: int, prompt: int) -> dict:
    """Both graphs in this one process, taking turns in blocks of steps; each round's ratio of block medians.

    Fresh processes of the same graph on this 2-core virtual machine differ by up to 1.8x in step time,
    which buries a few percent between two graphs measured in different processes. Taking turns in one
    process gives both the same process, memory and moment, so each round's ratio cancels the drift.
    Both sessions stop spinning after each run, or the idle one's workers would busy-wait through the
    other's steps. The order flips every round, and both caches grow alike.
    """
    capacity = prompt + WARMUP_STEPS + INTERLEAVED_ROUNDS * INTERLEAVED_BLOCK + 1
    graphs = [_Graph(p, threads, prompt, capacity, spin_stop=True) for p in (ours, theirs)]
    for g in graphs:
        for _ in range(WARMUP_STEPS):
            g.step()
    ratios = []
    for r in range(INTERLEAVED_ROUNDS):
        medians = [0.0, 0.0]
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            medians[i] = statistics.median(graphs[i].step() for _ in range(INTERLEAVED_BLOCK))
        ratios.append(medians[1] / medians[0])  # > 1: ours takes less time per step
    if not all(g.cache_written() for g in graphs):
        raise SystemExit(f"bench_graph: {ours} or {theirs}: the steps did not write the KV cache where expected")
    return {"ratios": ratios}


def _operator_times(trace: Path) -> dict[str, dict[str, float]]:
    """Kernel time per step and node count per operator type, from an onnxruntime profile."""
    events = json.loads(trace.read_text())
    runs = sum(1 for e in events if e.get("name") == "model_run")
    total: dict[str, float] = {}
    calls: dict[str, int] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            total[op] = total.get(op, 0.0) + e["dur"]
            calls[op] = calls.get(op, 0) + 1
    return {op: {"us_per_step": total[op] / runs, "nodes": calls[op] // runs} for op in total}


def operator_profiles(paths: list[Path], threads: int, prompt: int, steps: int) -> dict[str, dict]:
    """Per-operator kernel times of each graph, each in a fresh process (after the timed rounds)."""
    out = {}
    for p in paths:
        out[str(p)] = _one(p, threads, prompt, steps, profile=True)["operators"]
    return out


def _cache_dims(path: Path, shape: list) -> tuple[int, int]:
    """KV heads and head size: the graph's fixed dimensions, else the config beside it (genai's builds name the
    head size symbolically)."""
    heads, size = shape[1], shape[3]
    if isinstance(heads, int) and isinstance(size, int):
        return heads, size
    folder = path.parent
    if (folder / "genai_config.json").is_file():
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    if (folder / "edgelm.json").is_file():
        from edgelm.runtime.manifest import read_manifest

        manifest = read_manifest(folder)
        return int(manifest.num_key_value_heads), int(manifest.head_dim)
    raise SystemExit(f"bench_graph: {path}: the KV cache shape {shape} names no head count and size, and no "
                     "genai_config.json or edgelm.json beside it does")


def measure(paths: list[Path], runs: int, threads: int, prompt: int, steps: int) -> dict:
    per = {str(p): [] for p in paths}
    used = {}
    for _ in range(runs):
        for p in paths:
            res = _one(p, threads, prompt, steps)
            per[str(p)].append(res["median_s"])
            used[str(p)] = res
    return {"runs": runs, "threads": threads, "prompt": prompt, "steps": steps,
            "graphs": [{"graph": str(p), "intra_op_num_threads": used[str(p)]["threads"], "cache": used[str(p)]["cache"],
                        "nodes": _nodes(p),
                        "step_ms": {"median": 1000 * statistics.median(per[str(p)]), "min": 1000 * min(per[str(p)]),
                                    "max": 1000 * max(per[str(p)])}} for p in paths]}


def _one(path: Path, threads: int, prompt: int, steps: int, profile: bool = False) -> dict:
    """``step_times`` in a fresh process."""
    cmd = [sys.executable, __file__, "--one", str(path), str(threads), str(prompt), str(steps)]
    proc = subprocess.run(cmd + (["profile"] if profile else []), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_graph: {path} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if not res["cache_written"]:
        raise SystemExit(f"bench_graph: {path}'s steps did not write its KV cache where expected")
    return res


def _pair_process(first: Path, second: Path, threads: int, prompt: int) -> list[float]:
    """``interleaved_ratios`` in a fresh process: second's step time over first's, per round."""
    cmd = [sys.executable, __file__, "--pair-one", str(first), str(second), str(threads), str(prompt)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_graph: {first} against {second} failed: "
                         f"{(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["ratios"]


def interleaved(pairs: list[tuple[Path, Path]], runs: int, threads: int, prompt: int) -> list[dict]:
    """``interleaved_ratios`` for each (graph, anchor) pair, in ``runs`` fresh processes each; all rounds pooled.

    The two graphs swap places from one process to the next (odd processes load the anchor first, and
    their ratios are inverted), so that neither place favours one graph: the version before this one
    always loaded ours first and read the same two int4 graphs 4% apart one way, then 4% apart the
    other way when the pair was given in the other order. A pair (G, G), ``--control``, reads what the
    method sees where there is no difference to find: its spread is the noise floor of the other rows.
    """
    out = []
    for ours, theirs in pairs:
        ratios: list[float] = []
        for run in range(runs):
            if run % 2 == 0:
                ratios += _pair_process(ours, theirs, threads, prompt)
            else:
                ratios += [1.0 / r for r in _pair_process(theirs, ours, threads, prompt)]
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        out.append({"graph": str(ours), "against": str(theirs), "rounds": len(ratios),
                    "ratio": {"median": statistics.median(ratios), "q1": q1, "q3": q3}})
    return out


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(_file(path)[0]), load_external_data=False).graph.node)


def markdown(res: dict) -> str:
    lines = [f"Bare decode step, raw onnxruntime, cache growing from {res['prompt'] + WARMUP_STEPS} tokens over "
             f"{res['steps']} timed steps, {res['threads']} threads requested, median of {res['runs']} rounds of "
             "fresh processes", "",
             "| graph | threads read back | KV cache | nodes | step ms | tokens/s |", "|---|---|---|---|---|---|"]
    by_path = {g["graph"]: g for g in res["graphs"]}
    for g in res["graphs"]:
        s = g["step_ms"]
        lines.append(f"| {g['graph']} | {g['intra_op_num_threads']} | {g['cache']} | {g['nodes']} | {s['median']:.2f} "
                     f"({s['min']:.2f}-{s['max']:.2f}) | {1000 / s['median']:.1f} |")
    if res.get("pairs"):
        lines += ["", "| graph | against | tokens/s, graph / against |", "|---|---|---|"]
        for ours, theirs in res["pairs"]:
            ratio = by_path[theirs]["step_ms"]["median"] / by_path[ours]["step_ms"]["median"]
            lines.append(f"| {ours} | {theirs} | {ratio:.2f}x |")
    if res.get("interleaved"):
        rows = res["interleaved"]
        lines += ["", f"The same pairs in one process, taking turns in blocks of {INTERLEAVED_BLOCK} steps "
                  f"({rows[0]['rounds']} rounds over {res['runs']} processes, both sessions stopping their threads' "
                  "spinning after each run, the two graphs swapping load order from one process to the next): each "
                  "round's tokens/s ratio, median (interquartile range); a graph against itself is the control, "
                  "what the method reads where there is no difference", "",
                  "| graph | against | tokens/s, graph / against, in one process |", "|---|---|---|"]
        for row in rows:
            r = row["ratio"]
            against = row["against"] + (" (control)" if row["against"] == row["graph"] else "")
            lines.append(f"| {row['graph']} | {against} | {r['median']:.3f}x ({r['q1']:.3f}-{r['q3']:.3f}) |")
    if res.get("operators"):
        graphs = list(res["operators"])
        ops = sorted({op for g in graphs for op in res["operators"][g]},
                     key=lambda op: -max(res["operators"][g].get(op, {}).get("us_per_step", 0.0) for g in graphs))
        lines += ["", "Kernel time per decode step by operator (onnxruntime's profiler, one more fresh process per "
                  "graph; us per step, nodes run per step in brackets, share of the graph's kernel time)", "",
                  "| operator | " + " | ".join(graphs) + " |", "|---|" + "---|" * len(graphs)]
        sums = {g: sum(v["us_per_step"] for v in res["operators"][g].values()) or 1.0 for g in graphs}
        for op in ops:
            cells = []
            for g in graphs:
                v = res["operators"][g].get(op)
                cells.append("-" if v is None else
                             f"{v['us_per_step']:.0f} ({v['nodes']}) {100 * v['us_per_step'] / sums[g]:.0f}%")
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        lines.append("| all kernels | " + " | ".join(f"{sums[g]:.0f}" for g in graphs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--one":
        path, threads, prompt, steps = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(step_times(Path(path), threads, prompt, steps, profile=argv[5:] == ["profile"])))
        return 0
    if argv and argv[0] == "--pair-one":
        print(json.dumps(interleaved_ratios(Path(argv[1]), Path(argv[2]), int(argv[3]), int(argv[4]))))
        return 0
    p = argparse.ArgumentParser(prog="python -m edgelm.cli.bench_graph", description=__doc__.split("\n\n")[0],
                                epilog="Example: python -m edgelm.cli.bench_graph bench-results/models/smollm2-int4 "
                                       "genai:int4 --checkpoint ~/.cache/edgelm/models/smollm2-135m-instruct")
    p.add_argument("graphs", nargs="+", metavar="GRAPH", help="export folder, .onnx file, or genai:PRECISION")
    p.add_argument("--checkpoint", help="the checkpoint genai:PRECISION builds were made from")
    p.add_argument("--runs", type=int, default=5, help="rounds of fresh processes (default 5)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for every graph (default 2)")
    p.add_argument("--prompt", type=int, default=64, help="cache slots filled before the first step (default 64)")
    p.add_argument("--steps", type=int, default=128, help="timed steps per process (default 128)")
    p.add_argument("--pairs", action="store_true",
                   help="read the graphs as (graph, anchor) pairs and add each graph's tokens/s against its anchor "
                        "(a graph may appear in several pairs; it is measured once)")
    p.add_argument("--interleaved", action="store_true",
                   help="with --pairs: also run each pair in one process, taking turns, and print each round's "
                        "ratio (a few percent between two graphs is lost in the drift between fresh processes)")
    p.add_argument("--control", action="store_true",
                   help="with --interleaved: also run each anchor against itself, the noise floor of the ratios "
                        "(a row whose ratio is within the control's spread of 1 shows no difference)")
    p.add_argument("--profile", action="store_true",
                   help="also run each graph once more under onnxruntime's profiler and print its kernel time per "
                        "operator type (where a step's time goes)")
    p.add_argument("--out", help="also write the JSON result here")
    args = p.parse_args(argv)
    for name in ("runs", "threads", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.prompt < 0:
        p.error("--prompt must be 0 or more")
    named = [resolve(g, args.checkpoint) for g in args.graphs]
    if args.interleaved and not args.pairs:
        p.error("--interleaved compares pairs: give --pairs and the graphs as (graph, anchor) pairs")
    if args.control and not args.interleaved:
        p.error("--control is a pair of one graph with itself in one process: give it with --pairs --interleaved")
    if args.pairs and len(named) % 2:
        p.error(f"--pairs needs an even number of graphs (graph, anchor, graph, anchor, ...), got {len(named)}")
    paths = list(dict.fromkeys(named))  # a graph named twice runs once
    res = measure(paths, args.runs, args.threads, args.prompt, args.steps)
    if args.pairs:
        res["pairs"] = [[str(named[i]), str(named[i + 1])] for i in range(0, len(named), 2)]
        if args.interleaved:
            pairs = [(named[i], named[i + 1]) for i in range(0, len(named), 2)]
            if args.control:
                pairs += [(a, a) for a in dict.fromkeys(theirs for _, theirs in pairs)]
            res["interleaved"] = interleaved(pairs, args.runs, args.threads, args.prompt)
    if args.profile:
        res["operators"] = operator_profiles(paths, args.threads, args.prompt, args.steps)
    print(markdown(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
