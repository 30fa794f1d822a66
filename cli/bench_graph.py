"""Decode-step time of bare graphs: edgelm's export against onnxruntime-genai's build, without either's loop.

``edgelm bench`` times whole generations, where each system's own loop (Python for edgelm, C++ for
genai) is part of the figure. This times the graphs alone, with the same driver for both: raw
onnxruntime, one token per step on a KV cache that grows from ``--prompt`` slots, past and present
bound to one buffer (as both runtimes run their GroupQueryAttention graphs). So the difference
between this table and ``edgelm bench``'s says how much each runtime adds around its graph.

Each round runs every graph in a fresh process, one after the other (no idle thread pool of one
graph spinning beside another's); the figure is the median over rounds of each round's median step.

    python -m edgelm.cli.bench_graph GRAPH [GRAPH ...] [--runs 5] [--threads 2] [--prompt 64] [--steps 128]

A GRAPH is an export folder (``model.onnx`` inside, an edgelm export or a genai build), an ``.onnx``
file, or ``genai:PRECISION`` (fp32, int8, int4) for the build ``edgelm bench --anchors`` made of
``--checkpoint``.
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

WARMUP_STEPS = 16


def resolve(spec: str, checkpoint: str | None) -> Path:
    """The .onnx file a GRAPH argument names; a clear SystemExit when there is none."""
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


def step_times(path: Path, threads: int, prompt: int, steps: int, profile: bool = False) -> dict:
    """Per-step seconds of one graph, in this process; with ``profile``, onnxruntime's per-operator kernel
    times instead (the profiler's own cost makes its step times no figure to compare).

    A GroupQueryAttention graph runs with past and present in one buffer (both runtimes do so); any
    other graph concatenates, with each step's presents fed back as the next past.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    shared = any(n.op_type == "GroupQueryAttention" for n in onnx.load(str(path), load_external_data=False).graph.node)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if profile:
        import tempfile

        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="bench_graph_")) / "profile")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    pasts = [n for n in inputs if n.startswith("past_key_values.")]
    if not pasts or "input_ids" not in inputs or "attention_mask" not in inputs:
        raise SystemExit(f"bench_graph: {path} is not a causal LM graph with a KV cache in optimum's naming")
    capacity = prompt + WARMUP_STEPS + steps + 1
    values = {}
    heads, size = _cache_dims(path, inputs[pasts[0]].shape)
    for name in pasts:
        dtype = np.float16 if inputs[name].type == "tensor(float16)" else np.float32
        slots = capacity if shared else prompt
        values[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, slots, size), dtype))
    binding = session.io_binding()
    outputs = [o.name for o in session.get_outputs()]
    token = np.array([[100]], np.int64)

    def run(past: int) -> float:
        feeds = {"input_ids": token, "attention_mask": np.ones((1, past + 1), np.int64)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.array([[past]], np.int64)
        for key, value in feeds.items():
            binding.bind_cpu_input(key, value)
        if not shared or past == prompt:  # a shared buffer is bound once, on the first step
            for name, value in values.items():
                binding.bind_ortvalue_input(name, value)
            for out in outputs:
                present = out.replace("present.", "past_key_values.")
                if shared and present in values:
                    binding.bind_ortvalue_output(out, values[present])
                else:
                    binding.bind_output(out)
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        elapsed = time.perf_counter() - start
        if not shared:
            got = dict(zip(outputs, binding.get_outputs()))
            for name in values:
                values[name] = got[name.replace("past_key_values.", "present.")]
        return elapsed

    for i in range(WARMUP_STEPS):
        run(prompt + i)
    times = [run(prompt + WARMUP_STEPS + i) for i in range(steps)]
    last = prompt + WARMUP_STEPS + steps
    first = next(iter(values.values())).numpy()
    # Each step's keys reached the cache (in place for a shared buffer, and nothing past the last step).
    written = bool(np.abs(first[:, :, last - 1]).sum() > 0) and (not shared or not first[:, :, last:].any())
    if profile:
        return {"operators": _operator_times(Path(session.end_profiling())), "cache_written": written}
    return {"median_s": statistics.median(times), "threads": session.get_session_options().intra_op_num_threads,
            "cache": "shared buffer" if shared else "concat", "cache_written": written}


def _operator_times(trace: Path) -> dict[str, dict[str, float]]:
    """Kernel time per step and node count per operator type, from an onnxruntime profile (then deleted)."""
    events = json.loads(trace.read_text())
    shutil.rmtree(trace.parent, ignore_errors=True)
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


def _nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


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
    if args.pairs and len(named) % 2:
        p.error(f"--pairs needs an even number of graphs (graph, anchor, graph, anchor, ...), got {len(named)}")
    paths = list(dict.fromkeys(named))  # a graph named twice runs once
    res = measure(paths, args.runs, args.threads, args.prompt, args.steps)
    if args.pairs:
        res["pairs"] = [[str(named[i]), str(named[i + 1])] for i in range(0, len(named), 2)]
    if args.profile:
        res["operators"] = operator_profiles(paths, args.threads, args.prompt, args.steps)
    print(markdown(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
