"""``edgelm bench``: tokens/s, time to first token and peak memory, beside the anchors, on one model.

Every measurement is one generation in a fresh process (``bench_workers.py``): its peak RSS is
its own, nothing is shared between systems, and the runs are interleaved (run 1 of every
system and strategy, then run 2, ...) so that machine noise hits all systems alike. Figures
are medians with min and max.

Anchors, when installed: transformers PyTorch and optimum's ORTModelForCausalLM on the
source checkpoint (float32 exports only), and onnxruntime-genai on a model its own builder
makes from the same checkpoint at the same precision (genai needs transformers 5.x: give its
venv's Python with ``--genai-python`` or ``$EDGELM_GENAI_PYTHON``; ``benchmarks/run.sh`` sets
one up). Anchor models are built once into ``$EDGELM_CACHE/bench``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgelm.cli import bench_workers

Log = Callable[[str], None]
ANCHOR_STRATEGIES = ("greedy", "sample", "beam4")
PROMPT_SWEEP_NEW_TOKENS = 16
"""Tokens generated per run of the prompt-length sweep, which times the first token (prefill)."""
FIRST_LOAD = "first-load"
"""The key of edgelm's job that loads with an empty load cache each run (a 2-token generation after it)."""


@dataclass
class Target:
    system: str
    python: str
    model: str


def _precision(manifest: Any) -> str:
    return (manifest.validation.get("quantization") or {}).get("scheme", "fp32")


GENAI_PRECISION = {"fp32": "fp32", "int8": "int8", "int8-dynamic": "int8", "int4": "int4", "gguf": "int4"}
"""The onnxruntime-genai build each edgelm scheme is compared with (genai has no GGUF carry-over: its int4)."""


def _checkpoint(manifest: Any, given: str | None, log: Log) -> Path | None:
    path = Path(given or manifest.source or "")
    if given is None and not (path / "config.json").is_file():
        log(f"bench: the export's source ({manifest.source or '?'}) is not a checkpoint folder; "
            "pass --checkpoint DIR to run the PyTorch, optimum and genai anchors")
        return None
    if not (path / "config.json").is_file():
        raise SystemExit(f"edgelm bench: --checkpoint {path} is not a transformers checkpoint folder (no config.json)")
    return path


def _bench_cache(kind: str, checkpoint: Path) -> Path:
    from edgelm.models.cache import cache_dir

    digest = hashlib.sha1(str(checkpoint.resolve()).encode()).hexdigest()[:10]
    return cache_dir() / "bench" / f"{kind}-{checkpoint.name}-{digest}"


def _run(cmd: list[str], what: str, log: Log) -> None:
    log(f"bench: building {what}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"edgelm bench: building {what} failed: {' | '.join(tail)}")


def _optimum_model(checkpoint: Path, log: Log) -> Path:
    from edgelm.models.cache import atomic_dir

    out = _bench_cache("optimum", checkpoint)
    if not (out / "model.onnx").is_file():
        with atomic_dir(out, overwrite=True) as tmp:
            _run([sys.executable, "-c", "import sys; from optimum.exporters.onnx import main_export; "
                  "main_export(sys.argv[1], sys.argv[2], task='text-generation-with-past')", str(checkpoint), str(tmp)],
                 "the optimum ONNX export (optimum.exporters.onnx.main_export)", log)
    return out


def _genai_python(given: str | None) -> str | None:
    candidates = [given, os.environ.get("EDGELM_GENAI_PYTHON"), ".venv-genai/bin/python"]
    for python in candidates:
        if python and Path(python).is_file():
            ok = subprocess.run([python, "-c", "import onnxruntime_genai"], capture_output=True).returncode == 0
            if ok:
                return python
            if python == given:
                raise SystemExit(f"edgelm bench: {given} cannot import onnxruntime_genai; see benchmarks/run.sh")
    return None


def genai_build_dir(checkpoint: Path, precision: str) -> Path:
    """Where ``--anchors`` keeps onnxruntime-genai's build of ``checkpoint`` (built once, reused by later runs)."""
    return _bench_cache(f"genai-{precision}", checkpoint)


def _genai_model(python: str, checkpoint: Path, precision: str, log: Log) -> Path:
    from edgelm.models.cache import atomic_dir

    out = genai_build_dir(checkpoint, precision)
    if not (out / "genai_config.json").is_file():
        with atomic_dir(out, overwrite=True) as tmp:
            _run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(tmp),
                  "-p", precision, "-e", "cpu", "-c", str(tmp / ".cache")],
                 f"the onnxruntime-genai {precision} model (onnxruntime_genai.models.builder)", log)
            shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return out


def plan(model_dir: str, manifest: Any, anchors: bool, checkpoint: str | None, genai_python: str | None,
         log: Log) -> list[Target]:
    targets = [Target("edgelm", sys.executable, str(model_dir))]
    if not anchors:
        return targets
    ckpt = _checkpoint(manifest, checkpoint, log)
    if ckpt is None:
        return targets
    precision = _precision(manifest)
    if precision == "fp32":
        if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
            targets.append(Target("torch", sys.executable, str(ckpt)))
        else:
            log("bench: transformers/torch are not installed (pip install 'edgelm[export]'): no PyTorch anchor")
        if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.onnxruntime"):
            targets.append(Target("optimum", sys.executable, str(_optimum_model(ckpt, log))))
        else:
            log("bench: optimum is not installed (pip install 'edgelm[export]'): no optimum anchor")
    python = _genai_python(genai_python)
    if python:
        targets.append(Target("genai", python, str(_genai_model(python, ckpt, GENAI_PRECISION[precision], log))))
    else:
        log("bench: no onnxruntime-genai (give --genai-python, or run benchmarks/run.sh once): no genai anchor")
    return targets


def _measure(target: Target, request: dict[str, Any]) -> dict[str, Any]:
    cmd = [target.python, bench_workers.__file__, target.system, target.model, json.dumps(request)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(xs: list[float]) -> dict[str, float] | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}


def _prompt_ids(model_dir: str, prompt_tokens: int, prompt: str | None) -> list[int]:
    from edgelm.runtime.manifest import read_manifest
    from edgelm.runtime.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(model_dir))
    if prompt:
        return [int(i) for i in tok.encode(prompt)]
    # A fixed pseudo-random prompt of ordinary (non-special) ids: its length is what matters for timing.
    vocab = read_manifest(Path(model_dir)).vocab_size
    special = set(tok.all_special_ids)
    pool = np.array([i for i in range(min(vocab, 20000)) if i not in special])
    return np.random.default_rng(0).choice(pool, size=prompt_tokens).tolist()


def run_bench(model_dir: str, prompt_tokens: int = 64, new_tokens: int = 128, runs: int = 5, threads: int = 2,
              strategies: tuple[str, ...] = ("greedy",), anchors: bool = False, checkpoint: str | None = None,
              genai_python: str | None = None, lengths: tuple[int, ...] = (), assistant_dir: str | None = None,
              prompt: str | None = None, beam_new_tokens: int = 64, prompt_lengths: tuple[int, ...] = (),
              log: Log = print) -> dict[str, Any]:
    from edgelm.runtime.manifest import read_manifest

    manifest = read_manifest(Path(model_dir))
    targets = plan(model_dir, manifest, anchors, checkpoint, genai_python, log)
    ids = _prompt_ids(model_dir, prompt_tokens, prompt)
    base = {"prompt_ids": ids, "threads": threads}
    if assistant_dir:
        base["assistant"] = assistant_dir
    if "assisted" in strategies and not assistant_dir:
        raise SystemExit("edgelm bench: --strategy assisted needs --assistant-model DIR")
    cells: dict[tuple[str, str], list[dict]] = {}
    jobs = []
    for strategy in strategies:
        n = beam_new_tokens if strategy.startswith(("beam", "group")) else new_tokens
        for t in targets:
            if t.system == "edgelm" or strategy in ANCHOR_STRATEGIES:
                jobs.append((t, strategy, n, f"{strategy}"))
    for length in lengths:
        for t in targets:
            if t.system in ("edgelm", "genai"):
                jobs.append((t, "greedy", length, f"greedy@{length}"))
    for t in targets:  # edgelm's load with no load cache entry, as the first on a machine: genai has no cache,
        if t.system == "edgelm":  # so each of its loads is a first one already
            jobs.append((t, "greedy", 2, FIRST_LOAD))
    prompts = {length: _prompt_ids(model_dir, length, None) for length in prompt_lengths}
    for length in prompt_lengths:
        for t in targets:
            if t.system in ("edgelm", "genai"):
                jobs.append((t, "greedy", PROMPT_SWEEP_NEW_TOKENS, f"prompt@{length}"))
    # One untimed process per system first: every system's files are then in the page cache alike, and
    # edgelm's load cache (runtime.load_cache) is written if it was not there (by default from a background
    # process, which the worker waits for before it generates); that first load is reported apart.
    from edgelm.runtime import load_cache

    first_load = {}
    for t in targets:
        res = _measure(t, {**base, "strategy": "greedy", "new_tokens": 2})
        first_load[t.system] = {"load_s": res.get("load_s"), "error": res.get("error"),
                                "load_cache": (res.get("threads_used") or {}).get("load_cache")}
        if first_load[t.system]["load_cache"] in ("written", "writing"):
            first_load[t.system]["write_s"] = load_cache.written_in(Path(model_dir) / manifest.model_file)
        log(f"[first load] {t.system:8s} {res.get('load_s', float('nan')):.2f} s" + _cache_note(first_load[t.system]))
    total = runs * len(jobs)
    done = 0
    for run in range(runs):
        for t, strategy, n, key in jobs:
            request = {**base, "strategy": strategy, "new_tokens": n}
            if key.startswith("prompt@"):
                request["prompt_ids"] = prompts[int(key.split("@")[1])]
            if key == FIRST_LOAD:
                request["fresh_load_cache"] = True
            res = _measure(t, request)
            done += 1
            cells.setdefault((t.system, key), []).append(res)
            if "error" in res:
                shown = f"failed: {res['error']}"
            elif key == FIRST_LOAD:
                shown = f"load {res['load_s']:.2f} s, no load cache entry"
            else:
                shown = f"{res['decode_tps']:.1f} tok/s"
            log(f"[{done}/{total}] run {run + 1} {t.system:8s} {key:16s} {shown}")
    results: dict[str, Any] = {
        "model": str(model_dir), "precision": _precision(manifest), "attention": manifest.attention,
        "prompt_tokens": len(ids), "new_tokens": new_tokens, "beam_new_tokens": beam_new_tokens, "runs": runs,
        "threads": threads, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                        "processor": platform.processor() or platform.machine()},
        "systems": {t.system: t.model for t in targets}, "results": {}, "first_load": first_load,
    }
    results["ran_with"] = {}
    for (system, key), rs in cells.items():
        ok = [r for r in rs if "error" not in r]
        for r in ok:
            seen = results["ran_with"].setdefault(system, {"setting": r.get("thread_setting"), "read_back": []})
            if r.get("threads_used") not in seen["read_back"]:
                seen["read_back"].append(r.get("threads_used"))
        entry: dict[str, Any] = {"errors": [r["error"] for r in rs if "error" in r]}
        for field in ("decode_tps", "ttft_ms", "peak_rss_mb", "end_to_end_tps", "ort_fraction", "sampling_fraction",
                      "acceptance_rate", "load_s", "ort_step_ms", "python_step_ms", "cache_write_s"):
            entry[field] = _summary([r.get(field) for r in ok])
        results["results"].setdefault(system, {})[key] = entry
    return results


def _cache_note(first: dict) -> str:
    """How edgelm's first load used its load cache, and what writing the entry took where it was written."""
    how = first.get("load_cache")
    if not how:
        return ""
    where = {"written": "during the load", "writing": "by a background process"}.get(how)
    if where and first.get("write_s") is not None:
        return f" (load cache: {how}; the entry written {where} in {first['write_s']:.2f} s)"
    return f" (load cache: {how})"


def _cell(entry: dict | None, field: str, fmt: str = "{:.1f}") -> str:
    s = (entry or {}).get(field)
    if not s:
        return "-"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def _median(results: dict, system: str, key: str, field: str = "decode_tps") -> float | None:
    s = ((results["results"].get(system) or {}).get(key) or {}).get(field)
    return s["median"] if s else None


def targets_report(results: dict) -> list[tuple[str, str, bool | None]]:
    """The performance issue's targets, each (what, figure, met?) from this run's medians."""
    out = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def add(what: str, value: float | None, goal: float, fmt: str, higher: bool = True) -> None:
        if value is None:
            out.append((what, "not measured", None))
        else:
            out.append((what, fmt.format(value), value >= goal if higher else value <= goal))

    genai = "genai"
    add("greedy decode tokens/s vs onnxruntime-genai (>= 1.05x)",
        ratio(_median(results, "edgelm", "greedy"), _median(results, genai, "greedy")), 1.05, "{:.2f}x")
    if "beam4" in results["results"].get("edgelm", {}):
        add("beam4 decode tokens/s vs onnxruntime-genai (>= 1.0x)",
            ratio(_median(results, "edgelm", "beam4"), _median(results, genai, "beam4")), 1.0, "{:.2f}x")
    if results["precision"] == "fp32":
        add("greedy vs transformers PyTorch (>= 2.5x)",
            ratio(_median(results, "edgelm", "greedy"), _median(results, "torch", "greedy")), 2.5, "{:.2f}x")
        ours, theirs = (_median(results, s, "greedy", "peak_rss_mb") for s in ("edgelm", genai))
        add("peak RSS, edgelm / genai (<= 1.0)", ratio(ours, theirs), 1.0, "{:.2f}", higher=False)
    if f"prompt@{results['prompt_tokens']}" not in results["results"].get("edgelm", {}):
        ours, theirs = (_median(results, s, "greedy", "ttft_ms") for s in ("edgelm", genai))
        add(f"time to first token, {results['prompt_tokens']}-token prompt, edgelm / genai (<= 1.0)",
            ratio(ours, theirs), 1.0, "{:.2f}", higher=False)
    for key in sorted((k for k in results["results"].get("edgelm", {}) if k.startswith("prompt@")),
                      key=lambda k: int(k.split("@")[1])):
        ours, theirs = (_median(results, s, key, "ttft_ms") for s in ("edgelm", genai))
        add(f"time to first token, {key.split('@')[1]}-token prompt, edgelm / genai (<= 1.0)", ratio(ours, theirs),
            1.0, "{:.2f}", higher=False)
    ours, theirs = (_median(results, s, "greedy", "load_s") for s in ("edgelm", genai))
    add("model load time, edgelm / genai (<= 1.0)", ratio(ours, theirs), 1.0, "{:.2f}", higher=False)
    if FIRST_LOAD in results["results"].get("edgelm", {}):  # the load a device pays once: no entry to read yet
        add("first load on a machine (no load cache entry), edgelm / genai (<= 1.0)",
            ratio(_median(results, "edgelm", FIRST_LOAD, "load_s"), theirs), 1.0, "{:.2f}", higher=False)
    lengths = sorted(int(k.split("@")[1]) for k in results["results"].get("edgelm", {}) if k.startswith("greedy@"))
    if len(lengths) >= 2:
        add(f"tokens/s at {lengths[-1]} new tokens / at {lengths[0]} (>= 0.9)",
            ratio(_median(results, "edgelm", f"greedy@{lengths[-1]}"), _median(results, "edgelm", f"greedy@{lengths[0]}")),
            0.9, "{:.2f}")
    ort = _median(results, "edgelm", "greedy", "ort_fraction")
    add("Python overhead per greedy step, batch 1 (< 10%)", None if ort is None else 100 * (1 - ort), 9.999, "{:.1f}%",
        higher=False)
    for key in ("sample", "sample_full_vocab"):
        frac = _median(results, "edgelm", key, "sampling_fraction")
        if frac is not None:
            add(f"processors + draw in {key} (top-p 0.9), share of the step (< 5%)", 100 * frac, 4.999, "{:.1f}%",
                higher=False)
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"**{Path(results['model']).name}** ({results['precision']}, attention: {results['attention']}), "
        f"{results['prompt_tokens']}-token prompt, {results['new_tokens']} new tokens "
        f"({results['beam_new_tokens']} for beams), {results['threads']} threads, {results['runs']} interleaved runs "
        f"each, median (min-max); {m['cpus']} CPUs, {m['platform']}", "",
        "| system | strategy | decode tokens/s | vs genai | time to first token ms | peak RSS MB | load s "
        "| ORT ms / step | Python ms / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, per in results["results"].items():
        for key, entry in per.items():
            if key == FIRST_LOAD:  # a 2-token generation: only its load is a figure (below)
                continue
            ours, theirs = _median(results, system, key), _median(results, "genai", key)
            vs = f"{ours / theirs:.2f}x" if ours and theirs else "-"
            extra = ""
            if entry.get("acceptance_rate"):
                extra = f" (acceptance {entry['acceptance_rate']['median']:.0%})"
            if entry.get("errors"):
                extra += f" ({len(entry['errors'])} failed: {entry['errors'][0][:80]})"
            lines.append(f"| {system} | {key}{extra} | {_cell(entry, 'decode_tps')} | {vs} | "
                         f"{_cell(entry, 'ttft_ms', '{:.0f}')} | {_cell(entry, 'peak_rss_mb', '{:.0f}')} | "
                         f"{_cell(entry, 'load_s', '{:.2f}')} | {_cell(entry, 'ort_step_ms', '{:.2f}')} | "
                         f"{_cell(entry, 'python_step_ms', '{:.2f}')} |")
    fresh = results["results"].get("edgelm", {}).get(FIRST_LOAD)
    if fresh and fresh.get("load_s"):
        write = (f"; the background write {_cell(fresh, 'cache_write_s', '{:.2f}')} s"
                 if fresh.get("cache_write_s") else "")  # none where the load cache is off or written in the load
        how = ", the entry then written by a background process" if write else ""
        lines += ["", f"edgelm's first load on a machine (an empty load cache each run{how}): "
                  f"{_cell(fresh, 'load_s', '{:.2f}')} s{write}; loads that read the entry: "
                  f"{_cell(results['results']['edgelm'].get('greedy'), 'load_s', '{:.2f}')} s"]
    first = {k: v for k, v in (results.get("first_load") or {}).items() if v.get("load_s") is not None}
    if first:
        lines += ["", "First load of each system in this run, untimed rounds aside (edgelm's load cache entry is "
                  "written then when there is none): " + ", ".join(
                      f"{system} {v['load_s']:.2f} s" + _cache_note(v) for system, v in first.items())]
    ran = results.get("ran_with") or {}
    if ran:
        lines += ["", f"Threads: {results['threads']} requested for every system; what each ran with:", "",
                  "| system | set through | read back |", "|---|---|---|"]
        for system, seen in ran.items():
            back = "; ".join(", ".join(f"{k}={v}" for k, v in (r or {}).items()) or "-" for r in seen["read_back"])
            lines.append(f"| {system} | {seen['setting'] or '-'} | {back} |")
    checks = targets_report(results)
    if checks:
        lines += ["", "| target | this run | met |", "|---|---|---|"]
        for what, figure, met in checks:
            lines.append(f"| {what} | {figure} | {'-' if met is None else 'yes' if met else 'NO'} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    """Tokens/s by system and strategy, and tokens/s against length; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = [k for k in ("greedy", "sample", "beam4", "group4", "contrastive", "lookup", "assisted")
            if any(k in per for per in results["results"].values())]
    systems = list(results["results"])
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        vals = [_median(results, system, k) or 0 for k in keys]
        ax1.bar(np.arange(len(keys)) + i * width, vals, width, label=system)
    ax1.set_xticks(np.arange(len(keys)) + width * (len(systems) - 1) / 2, keys)
    ax1.set_ylabel("decode tokens/s (median)")
    ax1.set_title(f"{Path(results['model']).name} ({results['precision']})")
    ax1.legend()
    for system, per in results["results"].items():
        pts = sorted((int(k.split("@")[1]), v["decode_tps"]["median"]) for k, v in per.items()
                     if k.startswith("greedy@") and v.get("decode_tps"))
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=system)
    ax2.set_xlabel("new tokens")
    ax2.set_ylabel("greedy decode tokens/s")
    ax2.set_title("tokens/s against length" if ax2.lines else "tokens/s against length (not measured: --lengths)")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main_bench(args: Any) -> int:
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else ()
    prompt_lengths = tuple(int(x) for x in args.prompt_lengths.split(",")) if args.prompt_lengths else ()
    res = run_bench(args.model_dir, args.prompt_tokens, args.new_tokens, args.runs, args.threads,
                    tuple(args.strategy), args.anchors, args.checkpoint, args.genai_python, lengths,
                    args.assistant_model, args.prompt, args.beam_new_tokens, prompt_lengths, log)
    if args.reference:
        from edgelm.cli.bench_quality import quality

        log(f"bench: quality against {args.reference}")
        anchors = {f"genai ({GENAI_PRECISION[res['precision']]})": res["systems"]["genai"]} \
            if "genai" in res["systems"] and res["precision"] != "fp32" else {}
        res["quality"] = quality(args.model_dir, args.reference, threads=args.threads, anchors=anchors)
    text = markdown(res)
    if "quality" in res:
        from edgelm.cli.bench_quality import quality_markdown

        text += "\n\n" + quality_markdown(res["quality"], res["precision"])
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{Path(args.model_dir).name}"
        (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
        (out / f"{stem}.md").write_text(text + "\n")
        png = plot(res, out / f"{stem}.png")
        log(f"bench: wrote {out / (stem + '.json')}, {out / (stem + '.md')}" + (f", {png}" if png else
            " (no plot: pip install 'edgelm[bench]' for matplotlib)"))
    return 0
