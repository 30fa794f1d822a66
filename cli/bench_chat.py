"""Time to first token of each turn of a conversation: a kept cache (``Conversation``) against stateless calls.

A stateless chat re-reads the whole history every turn, so its first token comes later and later;
a ``Conversation`` prefills only what the turn added. Both run greedy replies of a fixed length on
the same questions (~60-token user turns), in one process, alternating turn by turn so that
machine noise hits both alike.

    python -m edgelm.cli.bench_chat MODEL_DIR [--turns 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

TOPICS = ("rivers", "volcanoes", "bridges", "the printing press", "honey bees", "glaciers", "lighthouses",
          "radio", "coral reefs", "trains", "deserts", "telescopes")
REPLY_TOKENS = 32


def question(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (f"I am writing a short school report about {topic}. Could you tell me, in two or three sentences, how "
            f"{topic} came to matter to people, what a surprising fact about {topic} is, and which one question I "
            f"should ask my teacher about {topic} to learn more? Please keep it simple and friendly.")


def run(model_dir: str, turns: int = 10, threads: int = 2) -> dict:
    import numpy as np

    from edgelm.runtime import CausalLM

    lm = CausalLM.load(model_dir, threads=threads, load_cache="sync")  # a timed run beside no cache writer
    conv = lm.conversation(system="You are a helpful assistant.")
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    rows = []
    for i in range(turns):
        stamps = {}

        class Clock:
            def __init__(self, key):
                self.key, self.seen = key, 0

            def put(self, value):
                self.seen += 1
                if self.seen == 2:
                    stamps[self.key] = time.perf_counter()

            def end(self):
                pass

        kw = dict(max_new_tokens=REPLY_TOKENS, min_new_tokens=REPLY_TOKENS)
        start = time.perf_counter()
        conv.send(question(i), streamer=Clock("kept"), **kw)
        kept_ttft = stamps["kept"] - start
        history.append({"role": "user", "content": question(i)})
        ids = np.asarray([lm.tokenizer.apply_chat_template(history, add_generation_prompt=True)], np.int64)
        start = time.perf_counter()
        lm.generate(ids, streamer=Clock("stateless"), **kw)
        stateless_ttft = stamps["stateless"] - start
        history.append(conv.messages[-1])
        rows.append({"turn": i + 1, "history_tokens": int(ids.shape[1]), "reused": conv.last_stats["reused_tokens"],
                     "kept_ttft_ms": 1000 * kept_ttft, "stateless_ttft_ms": 1000 * stateless_ttft})
    return {"model": model_dir, "threads": threads, "reply_tokens": REPLY_TOKENS, "turns": rows}


def markdown(res: dict) -> str:
    rows = res["turns"]
    lines = [f"Conversation, {res['model']}: time to first token per turn, greedy {res['reply_tokens']}-token replies, "
             f"{res['threads']} threads", "",
             "| turn | history tokens | reused from the cache | TTFT kept cache ms | TTFT stateless ms |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['turn']} | {r['history_tokens']} | {r['reused']} | {r['kept_ttft_ms']:.0f} | "
                     f"{r['stateless_ttft_ms']:.0f} |")
    last, first = rows[-1], rows[0]
    lines += ["", f"Turn {last['turn']} / turn 1: kept cache {last['kept_ttft_ms'] / first['kept_ttft_ms']:.2f}x "
                  f"(target <= 1.3x), stateless {last['stateless_ttft_ms'] / first['stateless_ttft_ms']:.2f}x."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args()
    res = run(args.model_dir, args.turns, args.threads)
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
