"""One timed generation by one system, in a process of its own; prints one JSON line.

``edgelm bench --anchors`` starts this file once per (system, strategy, run), interleaved, so
every system gets a fresh process (its peak RSS is its own) and machine noise hits all alike.
It is run by path with whichever Python has the system installed (onnxruntime-genai needs
transformers 5.x, so it lives in a venv of its own), hence only the standard library at the
top and each system's imports inside its function.

    python bench_workers.py SYSTEM MODEL_PATH REQUEST_JSON

SYSTEM: edgelm | torch | optimum | genai | turns (edgelm and genai in one process, ``run_turns``).
REQUEST_JSON: {"prompt_ids", "new_tokens", "strategy", "threads"} (edgelm also "fresh_load_cache": load with an
empty load cache of its own, as a first load on a machine, and report "cache_write_s", what its background
writer took). Output: {"ttft_ms", "decode_tps", "total_s", "peak_rss_mb", "load_s", "tokens",
"threads_used", "thread_setting", ...}.

Every system gets the thread count through the setting it really reads, and the worker reports
what it ran with, read back from the system where its API allows:
- edgelm: ``CausalLM.load(threads=)`` -> onnxruntime SessionOptions.intra_op_num_threads (read back
  from the session);
- optimum: SessionOptions.intra_op_num_threads passed to ORTModelForCausalLM (read back from its session);
- torch: ``torch.set_num_threads`` (read back with ``torch.get_num_threads``);
- onnxruntime-genai: the decoder's ``session_options`` in its config, set with
  ``og.Config.overlay`` (genai ignores OMP_NUM_THREADS and builds its session from that config;
  it has no API to read the session back, so the worker reports the overlay it applied).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

STRATEGIES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=50),
    "beam4": dict(do_sample=False, num_beams=4, early_stopping=False, length_penalty=1.0),
}
EDGELM_ONLY = {
    "sample_full_vocab": dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0),
    "group4": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    "contrastive": dict(penalty_alpha=0.6, top_k=4),
    "lookup": dict(prompt_lookup_num_tokens=10),
    "assisted": dict(num_assistant_tokens=3),
}
WHOLE_CALL = ("beam4", "group4", "lookup", "assisted")
"""Strategies that emit several tokens per step (or only at the end): timed as whole calls."""
WARMUP_TOKENS = 8


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class TokenClock:
    """A transformers-style streamer that only records when tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timed(call: Callable[[Any], Any], streamed: bool, new_tokens: int) -> dict[str, float]:
    clock = TokenClock()
    start = time.perf_counter()
    call(clock if streamed else None)
    end = time.perf_counter()
    out = {"total_s": end - start, "end_to_end_tps": new_tokens / (end - start)}
    if streamed and len(clock.times) > 2:
        stamps = clock.times[1:]
        out["ttft_ms"] = 1000 * (stamps[0] - start)
        out["decode_tps"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        out["tokens"] = len(stamps)
    else:  # beam search emits nothing until the end: whole-call rate
        out["decode_tps"] = out["end_to_end_tps"]
        out["tokens"] = new_tokens
    return out


def _edgelm_ran_with(lm: Any) -> dict:
    """What a loaded CausalLM's session runs with, read back from the session: threads, edgelm's departures from
    onnxruntime's defaults (spinning stopped after each run, ...) and how the load cache served it."""
    from edgelm.runtime import load_cache
    from edgelm.runtime.session import read_back_entries

    opts = lm.decoder.session.get_session_options()
    return {"intra_op_num_threads": opts.intra_op_num_threads, "inter_op_num_threads": opts.inter_op_num_threads,
            **read_back_entries(lm.decoder.session), "load_cache": load_cache.status(lm.decoder.session)}


def _settled(lm: Any) -> Any:
    """``lm`` once the load cache writer its load started (a first load on this machine) is done: a timed run
    must not share the CPU with it. The load itself is timed before this."""
    from edgelm.runtime import cache_writer

    cache_writer.settle(lm.decoder.session)
    return lm


def run_edgelm(model: str, req: dict) -> dict:
    import numpy as np

    from edgelm.runtime import CausalLM, load_cache
    from edgelm.runtime.processors import LogitsProcessorList
    from edgelm.runtime.strategies import sampling

    fresh = None
    if req.get("fresh_load_cache"):  # a first load on this machine: no entry to read, as after an install
        fresh = tempfile.mkdtemp(prefix="edgelm-bench-first-load-")
        os.environ[load_cache.DIR_ENV] = fresh
    t0 = time.perf_counter()
    lm = CausalLM.load(model, threads=req["threads"], model_file=req.get("model_file"))
    load_s = time.perf_counter() - t0
    threads_used = _edgelm_ran_with(lm)
    _settled(lm)
    write_s = None
    if fresh:
        write_s = load_cache.written_in(lm.model_dir / lm.decoder.model_file)
        shutil.rmtree(fresh, ignore_errors=True)  # the session maps nothing of it: it loaded plainly
    ids = np.asarray([req["prompt_ids"]], np.int64)
    strategy = req["strategy"]
    kw = dict(STRATEGIES.get(strategy) or EDGELM_ONLY[strategy])
    if strategy == "assisted":
        kw["assistant_model"] = _settled(CausalLM.load(req["assistant"], threads=req["threads"]))
    if kw.get("do_sample"):
        kw["seed"] = 0
    lm.generate(ids, max_new_tokens=WARMUP_TOKENS)
    # Where the time goes: inside onnxruntime, in the logits processors + the draw, and the rest (Python).
    spent = {"ort": 0.0, "sampling": 0.0}
    runs: list[float] = []  # each onnxruntime run: the first is the prefill

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                spent[key] += dt
                if key == "ort":
                    runs.append(dt)
        return wrapper

    session = lm.decoder.session
    session.run_with_iobinding = timed(session.run_with_iobinding, "ort")
    LogitsProcessorList.__call__ = timed(LogitsProcessorList.__call__, "sampling")
    sampling.sample_token = timed(sampling.sample_token, "sampling")
    n = req["new_tokens"]
    res = _timed(lambda s: lm.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=s, **kw),
                 strategy not in WHOLE_CALL, n)
    res["ort_fraction"] = spent["ort"] / res["total_s"]
    res["sampling_fraction"] = spent["sampling"] / res["total_s"]
    if strategy not in WHOLE_CALL and len(runs) > 2:
        # One run per decode step after the prefill: what onnxruntime takes of each step, and what edgelm adds
        # (a step's time is 1 / decode_tps). The README's split of a step comes from these two.
        res["ort_step_ms"] = 1000 * statistics.median(runs[1:])
        res["python_step_ms"] = 1000 / res["decode_tps"] - res["ort_step_ms"]
    stats = getattr(lm, "last_assisted_stats", None)
    if stats:
        res["acceptance_rate"] = stats["accepted"] / max(stats["candidates"], 1)
    res["load_s"] = load_s
    if write_s is not None:
        res["cache_write_s"] = write_s
    res["threads_used"] = threads_used
    res["thread_setting"] = "onnxruntime SessionOptions (edgelm threads=)"
    return res


def _hf_generate(model: Any, req: dict) -> dict:
    import torch

    torch.manual_seed(0)
    ids = torch.tensor([req["prompt_ids"]], dtype=torch.long)
    mask = torch.ones_like(ids)
    kw = dict(STRATEGIES[req["strategy"]])
    n = req["new_tokens"]
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=WARMUP_TOKENS, do_sample=False)
        streamed = req["strategy"] not in WHOLE_CALL
        return _timed(lambda s: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                               streamer=s, **kw), streamed, n)


def run_torch(model: str, req: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(req["threads"])
    t0 = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    return {**_hf_generate(lm, req), "load_s": load_s,
            "threads_used": {"torch.get_num_threads": torch.get_num_threads()},
            "thread_setting": "torch.set_num_threads"}


def run_optimum(model: str, req: dict) -> dict:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = req["threads"]
    t0 = time.perf_counter()
    lm = ORTModelForCausalLM.from_pretrained(model, session_options=opts, use_cache=True, use_io_binding=False)
    load_s = time.perf_counter() - t0
    used = lm.model.get_session_options()
    return {**_hf_generate(lm, req), "load_s": load_s,
            "threads_used": {"intra_op_num_threads": used.intra_op_num_threads,
                             "inter_op_num_threads": used.inter_op_num_threads},
            "thread_setting": "onnxruntime SessionOptions passed to ORTModelForCausalLM"}


def genai_overlay(threads: int) -> dict:
    """The config overlay that sets onnxruntime-genai's decoder session threads (the only setting it reads)."""
    return {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}


def _genai_load(model: str, threads: int) -> tuple[Any, dict]:
    """onnxruntime-genai's model with ``threads`` set where it reads them; returns it and the overlay applied."""
    import onnxruntime_genai as og

    config = og.Config(model)
    config.clear_providers()
    overlay = genai_overlay(threads)
    config.overlay(json.dumps(overlay))
    return og.Model(config), overlay


def _genai_generate(lm: Any, prompt: list[int], n: int, kw: dict, clock: TokenClock | None) -> None:
    """One generation of exactly ``n`` tokens (min_length = max_length) by onnxruntime-genai's own loop."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(lm)
    opts = {"max_length": len(prompt) + n, "min_length": len(prompt) + n, "do_sample": kw["do_sample"]}
    for key in ("temperature", "top_p", "top_k", "num_beams", "length_penalty", "early_stopping"):
        if key in kw:
            opts[key] = kw[key]
    params.set_search_options(**opts)
    gen = og.Generator(lm, params)
    if clock:
        clock.put(None)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
        if clock:
            clock.put(None)


def run_genai(model: str, req: dict) -> dict:
    import onnxruntime_genai as og

    # Timed from the folder's path, as CausalLM.load is (it reads edgelm.json and the configs inside the clock):
    # reading genai_config.json and applying the thread overlay is part of genai's load (~16 ms for SmolLM2).
    t0 = time.perf_counter()
    lm, overlay = _genai_load(model, req["threads"])
    og.Tokenizer(lm)  # ready to generate from text, as edgelm's CausalLM.load (which loads its tokenizer) is
    load_s = time.perf_counter() - t0
    prompt = req["prompt_ids"]
    kw = dict(STRATEGIES[req["strategy"]])
    _genai_generate(lm, prompt, WARMUP_TOKENS, kw, None)
    n = req["new_tokens"]
    res = _timed(lambda s: _genai_generate(lm, prompt, n, kw, s), req["strategy"] not in WHOLE_CALL, n)
    return {**res, "load_s": load_s, "threads_used": overlay["model"]["decoder"]["session_options"],
            "thread_setting": "genai_config decoder session_options via og.Config.overlay"}


def run_turns(model: str, req: dict) -> dict:
    """Two generators in this one process taking turns, greedy, whole generations of ``new_tokens`` each: the
    end-to-end comparison without the drift between fresh processes (``cli/bench_turns.py``).

    ``req["players"]`` names the two: ["edgelm", "genai"], or one system twice (the control). edgelm loads
    MODEL_PATH, genai ``req["genai_model"]``; the one named first is loaded first and, in even rounds, runs
    first. Each side is its own system's real loop (edgelm's ``generate`` in Python, genai's in C++) with its
    own session options (edgelm's threads stop spinning after each run, genai's keep onnxruntime's default),
    so each round's ratio of decode rates (first token after the prefill to the last) is what a user of one or
    the other would see on that machine at that moment. Needs a Python with both installed (the genai venv
    with ``pip install --no-deps -e .``)."""
    import onnxruntime

    from edgelm.runtime import CausalLM

    n, prompt, threads = req["new_tokens"], req["prompt_ids"], req["threads"]
    kw = dict(STRATEGIES["greedy"])
    players, used = [], []
    for system in req["players"]:
        if system == "edgelm":
            lm = _settled(CausalLM.load(model, threads=threads))
            ids = [prompt]
            players.append(lambda clock, lm=lm, ids=ids: lm.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                                                       streamer=clock, **kw))
            used.append(_edgelm_ran_with(lm))
        elif system == "genai":
            glm, overlay = _genai_load(req["genai_model"], threads)
            players.append(lambda clock, glm=glm: _genai_generate(glm, prompt, n, kw, clock))
            used.append(overlay["model"]["decoder"]["session_options"])
        else:
            raise ValueError(f"turns: unknown player {system!r}")
    for play in players:  # warm-up: first-run allocations and caches
        play(None)
    rates: list[list[float]] = []
    for r in range(req["rounds"]):
        pair = [0.0, 0.0]
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            pair[i] = _timed(players[i], True, n)["decode_tps"]
        rates.append(pair)
    versions = {"onnxruntime": onnxruntime.__version__}
    if "genai" in req["players"]:
        import onnxruntime_genai as og

        versions["onnxruntime_genai"] = og.__version__
    return {"rates": rates, "ratios": [a / b for a, b in rates], "threads_used": used, "versions": versions}


RUNNERS = {"edgelm": run_edgelm, "torch": run_torch, "optimum": run_optimum, "genai": run_genai,
           "turns": run_turns}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in RUNNERS:
        print(__doc__, file=sys.stderr)
        return 2
    system, model, request = argv
    req = json.loads(request)
    res = RUNNERS[system](model, req)
    res["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
