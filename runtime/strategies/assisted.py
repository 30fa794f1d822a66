"""Assisted decoding: a draft proposes tokens, the target checks them all in one forward pass.

Drafts come from a smaller model with the same tokenizer (``assistant_model``) or from n-gram
matches in the prompt (``prompt_lookup_num_tokens``), as in transformers 4.55. The target
runs once over [last accepted token + all drafts], keeps the longest prefix of drafts that
equals its own greedy choice plus one token of its own, and both caches are cropped to the
accepted length. With greedy decoding the output is therefore exactly plain greedy output,
whatever the draft proposes; a good draft only makes it faster. With sampling, draft tokens
are accepted by speculative sampling, which keeps the target's distribution exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.runtime.errors import GenerationConfigError
from edgelm.runtime.modes import DRAFT_SCHEDULES
from edgelm.runtime.processors import LogitsProcessorList, softmax
from edgelm.runtime.state import DecodeState
from edgelm.runtime.stopping import StoppingCriteriaList
from edgelm.runtime.strategies.sampling import sample_token

ADAPTIVE_SCHEDULES = tuple(s for s in DRAFT_SCHEDULES if s != "constant")
"""The schedules under which a draft's length adapts (``heuristic_transient`` equals ``heuristic`` within one call,
which is all a candidates object lives)."""


class PromptLookupCandidates:
    """Continue the longest recent n-gram that already occurred in the sequence (prompt lookup decoding).

    As in transformers, the sequence's last ``max_matching_ngram_size`` tokens (then fewer) are searched
    for among its earlier tokens, and the tokens that followed the match are the draft. transformers
    drafts from the first match; edgelm, among the matches of that n-gram, from the one whose preceding
    tokens agree longest with the tokens before the sequence's tail (the first of equals, so with no
    agreement beyond the n-gram it is transformers' pick). When an answer copies its input, a short
    n-gram recurs all over the input, and the longest agreement finds the place being copied rather than
    the first place the n-gram happens to occur. The output is the same either way (the target checks
    every drafted token); only how many are accepted changes.

    With ``num_assistant_tokens_schedule="heuristic"`` the draft length adapts. transformers keeps prompt
    lookup's length fixed whatever the schedule; edgelm honours it because on a CPU every drafted token
    lengthens the verify pass nearly as much as a decode step costs (a 1.5B 4-bit target: each drafted
    token about 0.36 of a step), so a drafted token pays only if it is likely to be accepted. Two signals:
    - how long the match has already held (the n-gram plus the agreeing tokens before it): a copy that
      has held for h tokens is drafted for at most h more, and a match that has held for fewer than
      ``MIN_HELD`` tokens (a bigram with nothing before it agreeing, which on code is mostly chance) is
      not drafted at all, so that round is a plain decode step;
    - the outcome of the last draft, as transformers adapts a draft model's length (+2 after a draft
      accepted whole, -1 otherwise, at least 1, from ``prompt_lookup_num_tokens``); rounds without a
      draft leave it as it is, since they say nothing about how far a match would have held.
    The schedule only decides how much is drafted, never what is output.
    """

    AGREEMENT = 64
    """How far back the agreement is counted: enough to tell apart the places one text repeats."""
    MIN_HELD = 3
    """Under the heuristic schedule, the fewest tokens a match must have held to be drafted from. Chosen by
    replaying greedy runs of the Qwen2.5-Coder-1.5B target on benchmarks/speculative.sh's prompts against its
    measured verify costs (a one-off script, not kept): 2 drafts chance bigram matches on code, 4-5 miss
    copies; the benchmark then measured the pick (README, Speculative decoding)."""

    def __init__(self, num_output_tokens: int, max_matching_ngram_size: int | None, eos: list[int],
                 schedule: str = "constant"):
        self.num_output_tokens = int(num_output_tokens)
        self.schedule = schedule
        self.max_ngram = int(max_matching_ngram_size or 2)
        self.eos = eos

    def get(self, seq: np.ndarray, limit: int, processors: Any = None, rng: Any = None) -> tuple[np.ndarray, None]:
        """Draft tokens (no draft probabilities: under sampling the target samples on its own)."""
        n = len(seq)
        for size in range(min(self.max_ngram, n - 1), 0, -1):
            tail = seq[n - size:]
            windows = np.lib.stride_tricks.sliding_window_view(seq, size)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            hits = hits[hits + size < n]  # something follows the match (the tail itself is left out)
            if not hits.size:
                continue
            agreement = self._agreement(seq, hits, n - size)
            best = int(np.argmax(agreement))
            start = int(hits[best]) + size
            length = self.num_output_tokens
            if self.schedule in ADAPTIVE_SCHEDULES:
                held = int(agreement[best]) + size
                if held < self.MIN_HELD:
                    return seq[:0], None
                length = min(length, held)
            chosen = seq[start:min(start + length, n)]
            stops = np.flatnonzero(np.isin(chosen, self.eos)) if self.eos else []
            if len(stops):
                chosen = chosen[: stops[0]]
            return chosen[:limit], None
        return seq[:0], None

    def _agreement(self, seq: np.ndarray, hits: np.ndarray, tail_start: int) -> np.ndarray:
        """For each match starting at ``hits``, how many tokens just before it equal those just before the tail
        (one vectorized comparison of up to AGREEMENT tokens back per match: this runs once per decode step)."""
        back = np.arange(1, min(self.AGREEMENT, tail_start) + 1)
        before = hits[:, None] - back[None, :]
        same = (before >= 0) & (seq[np.maximum(before, 0)] == seq[tail_start - back][None, :])
        return np.cumprod(same, axis=1).sum(axis=1)

    def update(self, n_matches: int, n_candidates: int) -> None:
        if n_candidates:
            self.num_output_tokens = _scheduled(self.schedule, self.num_output_tokens, n_matches, n_candidates)


class DraftModelCandidates:
    """Drafts from a smaller CausalLM; its cache is kept and cropped like the target's.

    A draft folder (``edgelm draft``) scores only part of the vocabulary: under greedy decoding its pick
    among those is mapped back to a token id, and its confidence is measured among them too; under
    sampling, the tokens it lacks get probability 0, which speculative sampling allows (the target's
    residual distribution supplies them).

    As in transformers (its ``ConfidenceCriteria``), drafting stops early after a token the draft
    itself gives less than ``assistant_confidence_threshold`` probability: a token it doubts is
    likely rejected, and every draft token after it is wasted work. (transformers also retunes
    that threshold during generation when scikit-learn is installed; edgelm keeps it fixed.) None
    of this changes the output, only how much drafting is spent on it.
    """

    def __init__(self, assistant: Any, cfg: Any):
        self.lm = assistant
        self.num_tokens = float(cfg.num_assistant_tokens)
        self.schedule = cfg.num_assistant_tokens_schedule
        self.confidence = float(cfg.assistant_confidence_threshold or 0.0)
        self.eos = cfg.eos_ids
        self.cache = assistant.decoder.new_cache(1)
        self.token_ids = assistant.decoder.token_ids
        """A draft folder's (``edgelm draft``) logits columns: its picks are mapped back to token ids."""
        self.vocab_size = assistant.vocab_size
        self.cached: np.ndarray = np.zeros(0, np.int64)  # the tokens whose keys/values are in self.cache

    def get(self, seq: np.ndarray, limit: int, processors: Any = None,
            rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Draft tokens; when sampling (``rng`` given), also the draft's processed logits for each of them."""
        want = min(int(self.num_tokens), limit)
        if want <= 0:
            return seq[:0], None
        common = 0
        m = min(len(self.cached), len(seq))
        if m:
            diff = np.flatnonzero(self.cached[:m] != seq[:m])
            common = int(diff[0]) if len(diff) else m
        common = min(common, len(seq) - 1)  # always feed at least one token
        self.cache.crop(common)
        tokens = list(seq)
        drafts: list[int] = []
        draft_scores: list[np.ndarray] = []
        new = np.asarray(tokens[common:], np.int64)[None, :]
        for _ in range(want):
            total = len(tokens)
            mask = np.ones((1, total), np.int64)
            pos = np.arange(total - new.shape[1], total, dtype=np.int64)[None, :]
            logits, _ = self.lm.decoder.step(new, mask, pos, self.cache, keep=1)
            scores = logits[:, -1].astype(np.float32)
            if rng is not None:
                if self.token_ids is not None:  # a cut head: tokens it lacks get probability 0
                    full = np.full((1, self.vocab_size), -np.inf, np.float32)
                    full[:, self.token_ids] = scores
                    scores = full
                scores = processors(np.asarray([tokens], np.int64), scores)
                probs = softmax(scores)
                tok = int(sample_token(probs, rng)[0])
                draft_scores.append(scores[0])
                doubt = self.confidence > 0 and float(probs[0, tok]) < self.confidence  # the draw's own softmax
            else:
                pick = int(np.argmax(scores[0]))
                doubt = self.confidence > 0 and _probability(scores[0], pick) < self.confidence
                tok = pick if self.token_ids is None else int(self.token_ids[pick])
            drafts.append(tok)
            tokens.append(tok)
            new = np.asarray([[tok]], np.int64)
            if tok in self.eos or doubt:
                break
        self.cached = np.asarray(tokens[:-1], np.int64)  # the last draft was never fed
        return np.asarray(drafts, np.int64), (np.stack(draft_scores) if rng is not None else None)

    def update(self, n_matches: int, n_candidates: int) -> None:
        self.num_tokens = _scheduled(self.schedule, self.num_tokens, n_matches, n_candidates)


def _scheduled(schedule: str, length, n_matches: int, n_candidates: int):
    """The next draft length under transformers' schedules (adaptive ones: +2 after a whole draft accepted, else -1,
    at least 1)."""
    if schedule not in ADAPTIVE_SCHEDULES:
        return length
    return length + 2 if n_matches == n_candidates else max(type(length)(1), length - 1)


def _probability(scores: np.ndarray, tok: int) -> float:
    """softmax(scores)[tok] without materialising the distribution (-inf scores count as 0)."""
    if not np.isfinite(scores[tok]):
        return 0.0
    with np.errstate(over="ignore"):  # a far likelier token overflows the sum: probability ~0, the right answer
        total = np.exp(scores - scores[tok]).sum(dtype=np.float64)
    return float(1.0 / total) if np.isfinite(total) else 0.0


def check_assistant(target: Any, assistant: Any) -> None:
    if assistant.vocab_size != target.vocab_size or assistant.tokenizer.vocab_size != target.tokenizer.vocab_size:
        raise GenerationConfigError(
            f"the assistant model has another vocabulary ({assistant.vocab_size} tokens vs the target's "
            f"{target.vocab_size}); assisted decoding needs a draft model with the same tokenizer")
    probe = "Hello world! 123 édition"
    if assistant.tokenizer.encode(probe) != target.tokenizer.encode(probe):
        raise GenerationConfigError("the assistant model's tokenizer encodes text differently from the target's; "
                                    "assisted decoding needs the same tokenizer")


def speculative_accept(drafts: np.ndarray, q_scores: np.ndarray, p_scores: np.ndarray, is_done: bool,
                       rng: np.random.Generator) -> np.ndarray:
    """Speculative sampling (Leviathan et al.; transformers' ``_speculative_sampling``): the returned tokens are
    distributed exactly as if the target had sampled them one by one."""
    n = len(drafts)
    q = softmax(q_scores)
    p = softmax(p_scores)
    ratio = p[np.arange(n), drafts] / q[np.arange(n), drafts]
    accepted = rng.random(n) <= ratio
    n_matches = int((np.cumsum(~accepted) < 1).sum()) if n else 0
    if is_done and n_matches == n:
        return drafts[:n]
    if n_matches < n:
        residual = np.clip(p[n_matches] - q[n_matches], 0, None)
        residual = residual / residual.sum()
    else:
        residual = p[n_matches]
    t = int(sample_token(residual[None, :], rng)[0])
    return np.concatenate([drafts[:n_matches], [t]]).astype(np.int64)


def run(state: DecodeState, cfg: Any, processors: LogitsProcessorList, stopping: StoppingCriteriaList,
        candidates: Any, streamer: Any = None, rng: np.random.Generator | None = None) -> dict[str, int]:
    if state.batch != 1:
        raise GenerationConfigError("assisted decoding supports one sequence at a time (batch size 1), as in transformers")
    sampling = bool(cfg.do_sample)
    stats = {"candidates": 0, "accepted": 0, "target_passes": 0}
    while True:
        cur = state.cur
        drafts, q_scores = candidates.get(state.input_ids[0], cfg.max_length - cur - 1, processors,
                                          rng if sampling else None)
        n = len(drafts)
        if n:
            state.append(drafts[None, :])
        is_done = bool(n) and bool(stopping(state.input_ids, None).all())
        logits = state.forward(state.cur - state.cache.length, keep=n + 1)
        stats["target_passes"] += 1
        scores = np.concatenate([processors(state.input_ids[:, : cur + i], logits[:, i, :]) for i in range(n + 1)])
        if sampling and q_scores is not None:
            accepted = speculative_accept(drafts, q_scores, scores, is_done, rng)
        else:
            picks = sample_token(softmax(scores), rng) if sampling else np.argmax(scores, axis=-1)
            n_matches = int((np.cumsum(drafts != picks[:n]) < 1).sum())
            accepted = picks[: n_matches + 1]
        n_matches = len(accepted) - 1
        state.truncate(cur, cache_length=cur + n_matches)
        done = False
        for j, tok in enumerate(accepted):  # stopping is checked token by token, as if decoded one at a time
            state.append(np.asarray([tok]))
            state.record(scores[j:j + 1], logits[:, j, :])
            if streamer is not None:
                streamer.put(np.asarray([tok]))
            if stopping(state.input_ids, scores[j:j + 1]).all():
                done = True
                break
        if state.cache.length > state.cur - 1:
            state.cache.crop(state.cur - 1)
        stats["candidates"] += n
        stats["accepted"] += min(n_matches, n)
        candidates.update(n_matches, n)
        if done:
            return stats
