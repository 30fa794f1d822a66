"""``edgelm bench``: decode tokens/s, time to first token and peak memory of the runtime on one model.

Timing uses a streamer hook: the first token's arrival gives the time to first token (prefill
included), the rest give the decode rate. Runs are repeated and reported as median (min-max).
The anchor comparison against transformers, optimum and onnxruntime-genai belongs to the
performance work and is not part of this command yet.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np


class _Clock:
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_bench(model_dir: str, prompt_tokens: int = 64, new_tokens: int = 128, runs: int = 5, threads: int | None = None,
              provider: str = "cpu", strategies: tuple[str, ...] = ("greedy",), log=print,
              assistant_dir: str | None = None, prompt: str | None = None) -> dict[str, Any]:
    from edgelm.runtime import CausalLM

    lm = CausalLM.load(model_dir, provider=provider, threads=threads)
    rng = np.random.default_rng(0)
    # a fixed pseudo-random prompt of real (non-special) ids: the length is what matters for timing
    special = set(lm.tokenizer.all_special_ids)
    pool = np.array([i for i in range(min(lm.vocab_size, 20000)) if i not in special])
    ids = rng.choice(pool, size=(1, prompt_tokens))
    if prompt:
        ids = np.asarray([lm.tokenizer.encode(prompt)], np.int64)
        prompt_tokens = ids.shape[1]
    settings = {
        "greedy": dict(),
        "sample": dict(do_sample=True, top_p=0.9, temperature=0.8, seed=0),
        "beam4": dict(num_beams=4),
        "group4": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
        "contrastive": dict(penalty_alpha=0.6, top_k=4),
        "lookup": dict(prompt_lookup_num_tokens=10),
    }
    if "assisted" in strategies:
        if not assistant_dir:
            raise SystemExit("edgelm bench: --strategy assisted needs --assistant-model DIR")
        settings["assisted"] = dict(assistant_model=CausalLM.load(assistant_dir, provider=provider, threads=threads),
                                    num_assistant_tokens=3)
    results: dict[str, Any] = {"model": str(model_dir), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                               "runs": runs, "threads": threads, "provider": provider, "strategies": {}}
    for name in strategies:
        kw = dict(settings[name], max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        tps, ttft, totals = [], [], []
        lm.generate(ids, max_new_tokens=4)  # warm-up: session arenas, first-run allocations
        for i in range(runs):
            start = time.perf_counter()
            if name in ("beam4", "group4", "assisted", "lookup"):  # several tokens per step: time the whole call
                lm.generate(ids, **kw)
                total = time.perf_counter() - start
                tps.append(new_tokens / total)
                totals.append(total)
                continue
            clock = _Clock()
            lm.generate(ids, streamer=clock, **kw)
            stamps = clock.times[1:]  # the first put() is the prompt
            ttft.append(stamps[0] - start)
            tps.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            totals.append(stamps[-1] - start)
            log(f"  {name} run {i + 1}/{runs}: {tps[-1]:.1f} tok/s, first token {1000 * ttft[-1]:.0f} ms")
        entry = {"decode_tokens_per_s": _summary(tps), "total_s": _summary(totals),
                 "end_to_end_tokens_per_s": _summary([new_tokens / t for t in totals])}
        if ttft:
            entry["time_to_first_token_ms"] = _summary([1000 * t for t in ttft])
        stats = getattr(lm, "last_assisted_stats", None)
        if name in ("assisted", "lookup") and stats:
            entry["acceptance_rate"] = round(stats["accepted"] / max(stats["candidates"], 1), 3)
            entry["tokens_per_target_pass"] = round(new_tokens / stats["target_passes"], 2)
        results["strategies"][name] = entry
    results["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return results


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2)}


def markdown(results: dict[str, Any]) -> str:
    lines = [f"edgelm on {results['model']} ({results['prompt_tokens']}-token prompt, {results['new_tokens']} new tokens, "
             f"{results['runs']} runs, threads={results['threads']}, provider={results['provider']})", "",
             "| strategy | decode tokens/s median (min-max) | end-to-end tokens/s | time to first token ms | peak RSS MB |",
             "|---|---|---|---|---|"]
    for name, e in results["strategies"].items():
        t = e["decode_tokens_per_s"]
        f = e.get("time_to_first_token_ms")
        ft = f"{f['median']:.0f} ({f['min']:.0f}-{f['max']:.0f})" if f else "-"
        extra = f" (acceptance {e['acceptance_rate']:.0%})" if "acceptance_rate" in e else ""
        lines.append(f"| {name}{extra} | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | {e['end_to_end_tokens_per_s']['median']:.1f} | {ft} | {results['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main_bench(args: Any) -> int:
    res = run_bench(args.model_dir, args.prompt_tokens, args.new_tokens, args.runs, args.threads, args.provider,
                    tuple(args.strategy), log=lambda s: print(s, file=sys.stderr, flush=True),
                    assistant_dir=args.assistant_model, prompt=args.prompt)
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
