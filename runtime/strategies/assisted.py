"""Assisted decoding: a draft proposes tokens, the target checks them all in one forward pass.

Drafts come from a smaller model with the same tokenizer (``assistant_model``) or from n-gram
matches in the prompt (``prompt_lookup_num_tokens``), as in transformers 4.55. The target
runs once over [last accepted token + all drafts], keeps the longest prefix of drafts that
equals its own greedy choice plus one token of its own, and both caches are cropped to the
accepted length. With greedy decoding the output is therefore exactly plain greedy output,
whatever the draft proposes; a good draft only makes it faster.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.runtime.errors import GenerationConfigError, UnsupportedError
from edgelm.runtime.processors import LogitsProcessorList
from edgelm.runtime.state import DecodeState
from edgelm.runtime.stopping import StoppingCriteriaList


class PromptLookupCandidates:
    """Continue the longest recent n-gram that already occurred in the sequence (prompt lookup decoding)."""

    def __init__(self, num_output_tokens: int, max_matching_ngram_size: int | None, eos: list[int]):
        self.num_output_tokens = int(num_output_tokens)
        self.max_ngram = int(max_matching_ngram_size or 2)
        self.eos = eos

    def get(self, seq: np.ndarray, limit: int) -> np.ndarray:
        n = len(seq)
        for size in range(min(self.max_ngram, n - 1), 0, -1):
            tail = seq[n - size:]
            windows = np.lib.stride_tricks.sliding_window_view(seq, size)
            for idx in np.flatnonzero((windows == tail).all(axis=1)):
                start, end = idx + size, min(idx + size + self.num_output_tokens, n)
                if start < end:
                    chosen = seq[start:end]
                    hits = np.flatnonzero(np.isin(chosen, self.eos)) if self.eos else []
                    if len(hits):
                        chosen = chosen[: hits[0]]
                    return chosen[:limit]
        return seq[:0]

    def update(self, n_matches: int, n_candidates: int) -> None:
        pass


class DraftModelCandidates:
    """Greedy drafts from a smaller CausalLM; its cache is kept and cropped like the target's."""

    def __init__(self, assistant: Any, cfg: Any):
        self.lm = assistant
        self.num_tokens = float(cfg.num_assistant_tokens)
        self.schedule = cfg.num_assistant_tokens_schedule
        self.eos = cfg.eos_ids
        self.cache = assistant.decoder.new_cache(1)
        self.cached: np.ndarray = np.zeros(0, np.int64)  # the tokens whose keys/values are in self.cache

    def get(self, seq: np.ndarray, limit: int) -> np.ndarray:
        want = min(int(self.num_tokens), limit)
        if want <= 0:
            return seq[:0]
        common = 0
        m = min(len(self.cached), len(seq))
        if m:
            diff = np.flatnonzero(self.cached[:m] != seq[:m])
            common = int(diff[0]) if len(diff) else m
        common = min(common, len(seq) - 1)  # always feed at least one token
        self.cache.crop(common)
        tokens = list(seq)
        drafts: list[int] = []
        new = np.asarray(tokens[common:], np.int64)[None, :]
        for _ in range(want):
            total = len(tokens)
            mask = np.ones((1, total), np.int64)
            pos = np.arange(total - new.shape[1], total, dtype=np.int64)[None, :]
            logits, _ = self.lm.decoder.step(new, mask, pos, self.cache)
            tok = int(np.argmax(logits[0, -1]))
            drafts.append(tok)
            tokens.append(tok)
            new = np.asarray([[tok]], np.int64)
            if tok in self.eos:
                break
        self.cached = np.asarray(tokens[:-1], np.int64)  # the last draft was never fed
        return np.asarray(drafts, np.int64)

    def update(self, n_matches: int, n_candidates: int) -> None:
        if self.schedule in ("heuristic", "heuristic_transient"):
            self.num_tokens = self.num_tokens + 2.0 if n_matches == n_candidates else max(1.0, self.num_tokens - 1.0)


def check_assistant(target: Any, assistant: Any) -> None:
    if assistant.vocab_size != target.vocab_size or assistant.tokenizer.vocab_size != target.tokenizer.vocab_size:
        raise GenerationConfigError(
            f"the assistant model has another vocabulary ({assistant.vocab_size} tokens vs the target's "
            f"{target.vocab_size}); assisted decoding needs a draft model with the same tokenizer")
    probe = "Hello world! 123 édition"
    if assistant.tokenizer.encode(probe) != target.tokenizer.encode(probe):
        raise GenerationConfigError("the assistant model's tokenizer encodes text differently from the target's; "
                                    "assisted decoding needs the same tokenizer")


def run(state: DecodeState, cfg: Any, processors: LogitsProcessorList, stopping: StoppingCriteriaList,
        candidates: Any, streamer: Any = None) -> dict[str, int]:
    if state.batch != 1:
        raise GenerationConfigError("assisted decoding supports one sequence at a time (batch size 1), as in transformers")
    if cfg.do_sample:
        raise UnsupportedError("assisted decoding with do_sample=True (speculative sampling) is not implemented yet; "
                               "use greedy assisted decoding or plain sampling")
    stats = {"candidates": 0, "accepted": 0, "target_passes": 0}
    while True:
        cur = state.cur
        drafts = candidates.get(state.input_ids[0], cfg.max_length - cur - 1)
        n = len(drafts)
        if n:
            state.append(drafts[None, :])
        logits = state.forward(state.cur - state.cache.length)[:, -(n + 1):, :]
        stats["target_passes"] += 1
        picks = []
        scores_list = []
        for i in range(n + 1):
            scores = processors(state.input_ids[:, : cur + i], logits[:, i, :])
            scores_list.append(scores)
            picks.append(int(np.argmax(scores[0])))
            if i < n and picks[-1] != int(drafts[i]):
                break
        n_matches = len(picks) - 1
        state.cur = cur
        state.cache.crop(cur + n_matches)
        accepted = np.asarray(picks, np.int64)
        done = False
        for j, tok in enumerate(accepted):  # stopping is checked token by token, as if decoded one at a time
            state.append(np.asarray([tok]))
            state.record(scores_list[j], logits[:, j, :])
            if streamer is not None:
                streamer.put(np.asarray([tok]))
            if stopping(state.input_ids, scores_list[j]).all():
                done = True
                break
        if state.cache.length > state.cur - 1:
            state.cache.crop(state.cur - 1)
        stats["candidates"] += n
        stats["accepted"] += n_matches
        candidates.update(n_matches, n)
        if done:
            return stats
