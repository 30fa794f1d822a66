"""What edgelm's generation loop adds around onnxruntime, per decode step, in one process.

    python benchmarks/loop_overhead.py MODEL_DIR [--new-tokens 128] [--repeats 5] [--threads 2]

Why: where our graph runs level with genai's (the bare-graph table) but the whole generation does not
(``bench_turns``), the difference is each runtime's loop, and genai's is C++. This times greedy decoding
three ways on the same loaded model and splits each step into the time inside onnxruntime's run and the
time outside it (Python, numpy, binding):

- ``generate``: ``CausalLM.generate`` greedy with no end of sequence (``eos_token_id=None``), so that it
  makes the same tokens as the bare loop (the stopping criteria, the state's buffers);
- ``generate, EOS banned``: as the benchmarks call it (``bench_turns``, ``edgelm bench``): the model's end of
  sequence with ``min_new_tokens`` = ``max_new_tokens``, so that the ban-only processor is asked about each
  pick too (its tokens can differ from the bare loop's where that pick would have been the end);
- ``decoder loop``: ``Decoder.step`` and an argmax per token, nothing else: the floor of a loop written in
  Python over this decoder;
- ``per call``: what one ``generate`` call costs outside onnxruntime before its first token (settings,
  processors, the cache's buffers), from calls of one new token.

The two loops feed the same tokens (checked: the script exits 1 if they part), so their onnxruntime work
is the same and the difference in the "outside" column is the loop's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "The theory of relativity explains how space and time are linked for objects that move at a constant speed. "


class _Timed:
    """Wraps a session's run_with_iobinding to add up the time spent inside it."""

    def __init__(self, session) -> None:
        self.inner, self.seconds, self.calls = session.run_with_iobinding, 0.0, 0
        session.run_with_iobinding = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def decoder_loop(lm, ids: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy decoding with Decoder.step and np.argmax only (batch 1, no bans, no stopping but the length)."""
    decoder, length = lm.decoder, ids.shape[1]
    cache = decoder.new_cache(1, length + new_tokens + 1)
    mask = np.ones((1, length + new_tokens), np.int64)
    logits, _ = decoder.step(ids, mask[:, :length], np.arange(length)[None], cache, keep=1)
    tokens = [int(np.argmax(logits[0, -1]))]
    for step in range(1, new_tokens):
        cur = length + step
        logits, _ = decoder.step(np.array([[tokens[-1]]]), mask[:, :cur], np.array([[cur - 1]]), cache, keep=1)
        tokens.append(int(np.argmax(logits[0, -1])))
    return tokens


def measure(model_dir: Path, new_tokens: int, repeats: int, threads: int | None) -> dict[str, dict[str, float]]:
    from edgelm.runtime import CausalLM

    lm = CausalLM.load(model_dir, threads=threads)
    timer = _Timed(lm.decoder.session)
    ids = np.asarray([lm.tokenizer.encode(PROMPT)[:64]], np.int64)

    def generate(n: int, **eos) -> list[int]:
        out = lm.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **(eos or {"eos_token_id": None}))
        return [int(t) for t in out[0, ids.shape[1]:]]

    runs = {"generate": lambda: generate(new_tokens),
            "generate, EOS banned": lambda: generate(new_tokens, eos_token_id=lm.generation_config.eos_ids or None),
            "decoder loop": lambda: decoder_loop(lm, ids, new_tokens), "per call": lambda: generate(1)}
    if runs["generate"]() != runs["decoder loop"]():
        raise SystemExit("loop_overhead: the decoder loop's tokens differ from generate's; the comparison is void")
    out = {}
    for name, run in runs.items():
        count = repeats * (10 if name == "per call" else 1)
        run()  # warm
        timer.reset()
        start = time.perf_counter()
        for _ in range(count):
            run()
        total = time.perf_counter() - start
        per = count if name == "per call" else timer.calls
        out[name] = {"runs": timer.calls / count, "total_ms": 1e3 * total / per,
                     "onnxruntime_ms": 1e3 * timer.seconds / per, "outside_ms": 1e3 * (total - timer.seconds) / per}
    return out


def markdown(model_dir: Path, rows: dict[str, dict[str, float]], new_tokens: int, threads: int | None) -> str:
    lines = [f"Greedy decoding of {model_dir}, 64-token prompt, {new_tokens} new tokens, {threads or 'default'} "
             "threads: ms per decode step (per call for the last row), inside onnxruntime's run and outside it, "
             "and onnxruntime runs per generation (each loop's work: the two loops must match)",
             "", "| loop | onnxruntime ms | outside ms | total ms | runs per generation |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['onnxruntime_ms']:.3f} | {r['outside_ms']:.3f} | {r['total_ms']:.3f} | "
                     f"{r['runs']:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("model_dir", type=Path, help="a causal `edgelm export` folder")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per generation")
    parser.add_argument("--repeats", type=int, default=5, help="generations timed per loop")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    if not (args.model_dir / "edgelm.json").is_file():
        parser.error(f"{args.model_dir}: not an edgelm export folder (no edgelm.json)")
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be at least 2 and --repeats at least 1")
    rows = measure(args.model_dir, args.new_tokens, args.repeats, args.threads)
    print(markdown(args.model_dir, rows, args.new_tokens, args.threads))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
