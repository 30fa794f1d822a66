"""Logits processors and warpers: small callables ``(input_ids, scores) -> scores`` over numpy.

Each mirrors the transformers class of the same name (4.55 semantics, same order of
application), so a user's settings mean the same thing here as there. ``input_ids`` is
(rows, length) int64 holding the prompt and what was generated so far; ``scores`` is
(rows, vocab) float32. Processors never modify their input in place.

The per-token cost matters on a device: the vocabulary-wide work is vectorised, and
top-k / top-p use ``argpartition`` to find the candidates before sorting only those.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgelm.runtime.errors import GenerationConfigError

NEG_INF = -np.inf


class LogitsProcessor:
    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class LogitsProcessorList(list):
    """Applies its processors in order, like transformers' list of the same name."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for proc in self:
            scores = proc(input_ids, scores)
        return scores


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = x - m
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def _kth_largest(scores: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of each row, (rows, 1), in O(vocab) with argpartition."""
    k = min(k, scores.shape[-1])
    part = np.partition(scores, scores.shape[-1] - k, axis=-1)
    return part[:, scores.shape[-1] - k][:, None]


def _ban(scores: np.ndarray, token_ids: Sequence[int]) -> np.ndarray:
    out = scores.copy()
    out[:, list(token_ids)] = NEG_INF
    return out


class TemperatureLogitsWarper(LogitsProcessor):
    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            hint = " If you want greedy decoding, set do_sample=False." if temperature == 0 else ""
            raise GenerationConfigError(f"temperature must be a strictly positive float, got {temperature!r}.{hint}")
        self.temperature = float(temperature)

    def __call__(self, input_ids, scores):
        return scores / np.float32(self.temperature)


class TopKLogitsWarper(LogitsProcessor):
    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, (int, np.integer)) or top_k <= 0:
            raise GenerationConfigError(f"top_k must be a strictly positive integer, got {top_k!r}")
        self.top_k = max(int(top_k), min_tokens_to_keep)

    def __call__(self, input_ids, scores):
        threshold = _kth_largest(scores, self.top_k)
        return np.where(scores < threshold, NEG_INF, scores).astype(scores.dtype, copy=False)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus filtering. Sorting is limited to the smallest candidate set that can hold the nucleus.

    transformers sorts the whole vocabulary ascending and drops the prefix whose cumulative
    probability is <= 1 - top_p. Equivalently we keep, in descending order, the tokens until
    the mass *before* a token reaches top_p. A cheap pre-filter (tokens within 1e-4 of the most
    likely one) bounds the work; inside it the top 256 are taken by ``argpartition`` and the set
    grows only when it holds less than top_p of the mass.
    """

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if top_p < 0 or top_p > 1.0:
            raise GenerationConfigError(f"top_p must be a float in [0, 1], got {top_p}")
        self.top_p = top_p
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        rows, vocab = scores.shape
        probs = softmax(scores.astype(np.float32))
        out = np.full_like(scores, NEG_INF)
        for r in range(rows):
            p = probs[r]
            # Pre-filter with one vectorised compare (tokens within 1e-4 of the most likely one),
            # then partition and sort only inside it, growing the sorted set until it holds more
            # than top_p; the whole vocabulary is the fallback.
            pool = np.flatnonzero(p >= p.max() * 1e-4)
            if p[pool].sum(dtype=np.float32) <= self.top_p:
                pool = np.arange(vocab)
            cand = min(pool.size, 256)
            while True:
                sub = pool[np.argpartition(-p[pool], cand - 1)[:cand]] if cand < pool.size else pool
                order = sub[np.argsort(-p[sub], kind="stable")]
                total = p[order].sum(dtype=np.float32)
                if total > self.top_p or cand >= pool.size:
                    break
                cand = min(pool.size, cand * 4)
            # transformers: remove ascending-sorted tokens with cumsum <= 1 - top_p.
            # The cumulative sum from the top (descending) before token i is 1 - cumsum_asc(i).
            # Compute ascending cumsum the way transformers does, over the full vocabulary's tail mass.
            sorted_p = p[order]
            rest = np.float32(1.0) - total  # mass of tokens outside the candidate set
            asc_cum = rest + np.cumsum(sorted_p[::-1], dtype=np.float32)  # ascending order cumsum
            keep_desc = (asc_cum > np.float32(1 - self.top_p))[::-1]
            keep_desc[: self.min_tokens_to_keep] = True
            kept = order[keep_desc]
            out[r, kept] = scores[r, kept]
        return out


class MinPLogitsWarper(LogitsProcessor):
    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        if not 0 <= min_p <= 1.0:
            raise GenerationConfigError(f"min_p must be a float in [0, 1], got {min_p}")
        self.min_p = float(min_p)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        probs = softmax(scores)
        remove = probs < self.min_p * probs.max(axis=-1, keepdims=True)
        if self.min_tokens_to_keep > 0:
            top = np.argsort(-scores, axis=-1, kind="stable")[:, : self.min_tokens_to_keep]
            np.put_along_axis(remove, top, False, axis=-1)
        return np.where(remove, NEG_INF, scores).astype(scores.dtype, copy=False)


class TypicalLogitsWarper(LogitsProcessor):
    def __init__(self, mass: float = 0.9, min_tokens_to_keep: int = 1):
        mass = float(mass)
        if not 0 < mass < 1:
            raise GenerationConfigError(f"typical_p must be a float in (0, 1), got {mass}")
        self.mass = mass
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids, scores):
        normalized = log_softmax(scores)
        p = np.exp(normalized)
        ent = -np.nansum(normalized * p, axis=-1, keepdims=True)
        shifted = np.abs(-normalized - ent)
        order = np.argsort(shifted, axis=-1, kind="stable")
        sorted_scores = np.take_along_axis(shifted, order, axis=-1)
        sorted_logits = np.take_along_axis(scores, order, axis=-1)
        cum = np.cumsum(softmax(sorted_logits), axis=-1)
        last = np.minimum((cum < self.mass).sum(axis=1), sorted_scores.shape[-1] - 1)
        remove_sorted = sorted_scores > np.take_along_axis(sorted_scores, last[:, None], axis=1)
        remove_sorted[:, : self.min_tokens_to_keep] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        return np.where(remove, NEG_INF, scores).astype(scores.dtype, copy=False)


class EpsilonLogitsWarper(LogitsProcessor):
    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        if not 0 < epsilon < 1:
            raise GenerationConfigError(f"epsilon_cutoff must be in (0, 1), got {epsilon}")
        self.epsilon = float(epsilon)
        self.min_tokens_to_keep = int(min_tokens_to_keep)

    def __call__(self, input_ids, scores):
        remove = (softmax(scores) < self.epsilon) & (scores < _kth_largest(scores, self.min_tokens_to_keep))
        return np.where(remove, NEG_INF, scores).astype(scores.dtype, copy=False)


class EtaLogitsWarper(LogitsProcessor):
    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        if not 0 < epsilon < 1:
            raise GenerationConfigError(f"eta_cutoff must be in (0, 1), got {epsilon}")
        self.epsilon = np.float32(epsilon)
        self.min_tokens_to_keep = int(min_tokens_to_keep)

    def __call__(self, input_ids, scores):
        probs = softmax(scores)
        logp = log_softmax(scores)
        entropy = -np.sum(np.where(probs > 0, probs * logp, 0.0), axis=-1)
        eta = np.minimum(self.epsilon, np.sqrt(self.epsilon) * np.exp(-entropy))[:, None]
        remove = (probs < eta) & (scores < _kth_largest(scores, self.min_tokens_to_keep))
        return np.where(remove, NEG_INF, scores).astype(scores.dtype, copy=False)


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    def __init__(self, penalty: float):
        if not isinstance(penalty, (int, float)) or not penalty > 0:
            raise GenerationConfigError(f"repetition_penalty must be a strictly positive float, got {penalty!r}")
        self.penalty = np.float32(penalty)

    def __call__(self, input_ids, scores):
        score = np.take_along_axis(scores, input_ids, axis=1)
        score = np.where(score < 0, score * self.penalty, score / self.penalty)
        out = scores.copy()
        np.put_along_axis(out, input_ids, score, axis=1)
        return out


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    def __init__(self, ngram_size: int):
        if not isinstance(ngram_size, (int, np.integer)) or ngram_size <= 0:
            raise GenerationConfigError(f"no_repeat_ngram_size must be a strictly positive integer, got {ngram_size!r}")
        self.n = int(ngram_size)

    def __call__(self, input_ids, scores):
        cur_len = input_ids.shape[1]
        if cur_len + 1 < self.n:
            return scores
        out = scores.copy()
        for row, seq in enumerate(input_ids.tolist()):
            prefix = tuple(seq[cur_len + 1 - self.n: cur_len])
            banned = [seq[i + self.n - 1] for i in range(cur_len - self.n + 1) if tuple(seq[i: i + self.n - 1]) == prefix]
            if banned:
                out[row, banned] = NEG_INF
        return out


class NoBadWordsLogitsProcessor(LogitsProcessor):
    """Bans single tokens always, and the last token of a sequence whose prefix was just generated."""

    def __init__(self, bad_words_ids: list[list[int]], eos_token_id: Sequence[int] = (), vocab_size: int | None = None):
        if not isinstance(bad_words_ids, list) or not bad_words_ids or not all(
            isinstance(s, list) and s and all(isinstance(t, (int, np.integer)) and t >= 0 for t in s) for s in bad_words_ids
        ):
            raise GenerationConfigError(
                f"bad_words_ids must be a non-empty list of non-empty lists of non-negative token ids, got {bad_words_ids!r}"
            )
        eos = [int(e) for e in eos_token_id]
        seqs = [list(map(int, s)) for s in bad_words_ids if not (len(s) == 1 and int(s[0]) in eos)]
        if vocab_size is not None:
            bad = [t for s in seqs for t in s if t >= vocab_size]
            if bad:
                raise GenerationConfigError(f"bad_words_ids holds token ids outside the vocabulary (size {vocab_size}): {bad}")
        self.single = sorted({s[0] for s in seqs if len(s) == 1})
        self.multi = [s for s in seqs if len(s) > 1]

    def __call__(self, input_ids, scores):
        bias = np.zeros_like(scores)
        if self.single:
            bias[:, self.single] = NEG_INF
        for seq in self.multi:
            if len(seq) > input_ids.shape[1]:
                continue
            match = np.all(input_ids[:, -(len(seq) - 1):] == np.asarray(seq[:-1]), axis=1)
            bias[match, seq[-1]] += NEG_INF
        return scores + bias


class MinLengthLogitsProcessor(LogitsProcessor):
    def __init__(self, min_length: int, eos_token_id: Sequence[int]):
        if not isinstance(min_length, (int, np.integer)) or min_length < 0:
            raise GenerationConfigError(f"min_length must be a non-negative integer, got {min_length!r}")
        self.min_length = int(min_length)
        self.eos = list(eos_token_id)

    def __call__(self, input_ids, scores):
        return _ban(scores, self.eos) if input_ids.shape[-1] < self.min_length else scores


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id: Sequence[int]):
        if not isinstance(min_new_tokens, (int, np.integer)) or min_new_tokens < 0:
            raise GenerationConfigError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}")
        self.skip = int(prompt_length_to_skip)
        self.min_new_tokens = int(min_new_tokens)
        self.eos = list(eos_token_id)

    def __call__(self, input_ids, scores):
        return _ban(scores, self.eos) if input_ids.shape[-1] - self.skip < self.min_new_tokens else scores


class SuppressTokensLogitsProcessor(LogitsProcessor):
    def __init__(self, suppress_tokens: Sequence[int]):
        self.tokens = [int(t) for t in suppress_tokens]

    def __call__(self, input_ids, scores):
        return _ban(scores, self.tokens) if self.tokens else scores


class SuppressTokensAtBeginLogitsProcessor(LogitsProcessor):
    def __init__(self, begin_suppress_tokens: Sequence[int], begin_index: int):
        self.tokens = [int(t) for t in begin_suppress_tokens]
        self.begin_index = begin_index

    def __call__(self, input_ids, scores):
        return _ban(scores, self.tokens) if input_ids.shape[-1] == self.begin_index and self.tokens else scores


class ForcedBOSTokenLogitsProcessor(LogitsProcessor):
    def __init__(self, bos_token_id: int):
        self.bos = int(bos_token_id)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != 1:
            return scores
        out = np.full_like(scores, NEG_INF)
        out[:, self.bos] = 0
        return out


class ForcedEOSTokenLogitsProcessor(LogitsProcessor):
    def __init__(self, max_length: int, eos_token_id: Sequence[int]):
        self.max_length = max_length
        self.eos = list(eos_token_id)
        if any(e < 0 for e in self.eos):
            raise GenerationConfigError(f"forced_eos_token_id must be non-negative, got {self.eos}")

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != self.max_length - 1:
            return scores
        out = np.full_like(scores, NEG_INF)
        out[:, self.eos] = 0
        return out


class ExponentialDecayLengthPenalty(LogitsProcessor):
    def __init__(self, exponential_decay_length_penalty: tuple[int, float], eos_token_id: Sequence[int],
                 input_ids_seq_length: int):
        try:
            start, factor = exponential_decay_length_penalty
        except (TypeError, ValueError):
            raise GenerationConfigError(
                "exponential_decay_length_penalty must be a pair (start_index, decay_factor), "
                f"got {exponential_decay_length_penalty!r}") from None
        self.start = int(start) + input_ids_seq_length
        self.factor = float(factor)
        self.eos = list(eos_token_id)

    def __call__(self, input_ids, scores):
        cur_len = input_ids.shape[-1]
        if cur_len <= self.start:
            return scores
        out = scores.copy()
        eos_scores = scores[:, self.eos]
        penalty = np.abs(eos_scores) * np.float32(pow(self.factor, cur_len - self.start) - 1)
        # transformers turns an already-banned EOS (-inf) into NaN here (-inf + inf); a banned EOS stays banned.
        out[:, self.eos] = np.where(np.isneginf(eos_scores), eos_scores, eos_scores + penalty)
        return out


class LogitNormalization(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return log_softmax(scores).astype(scores.dtype, copy=False)


class HammingDiversityLogitsProcessor:
    """Group beam search: penalise tokens that earlier groups picked at this step (not a plain processor)."""

    def __init__(self, diversity_penalty: float, num_beams: int, num_beam_groups: int):
        self.penalty = np.float32(diversity_penalty)
        self.num_beams = num_beams
        self.sub_beams = num_beams // num_beam_groups

    def __call__(self, input_ids, scores, current_tokens: np.ndarray, group_idx: int):
        start = group_idx * self.sub_beams
        if start == 0:
            return scores
        vocab = scores.shape[-1]
        batch = current_tokens.shape[0] // self.num_beams
        out = scores.copy()
        group_size = min(start + self.sub_beams, self.num_beams) - start
        for b in range(batch):
            prev = current_tokens[b * self.num_beams: b * self.num_beams + start]
            freq = np.bincount(prev, minlength=vocab).astype(np.float32)
            out[b * group_size:(b + 1) * group_size] -= self.penalty * freq
        return out


def build_processors(cfg, prompt_length: int, vocab_size: int | None = None) -> LogitsProcessorList:
    """The processors (then warpers) a config asks for, in transformers' order."""
    eos = cfg.eos_ids
    procs = LogitsProcessorList()
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size is not None and cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids is not None:
        procs.append(NoBadWordsLogitsProcessor(cfg.bad_words_ids, eos, vocab_size))
    if cfg.min_length is not None and eos and cfg.min_length > 0:
        procs.append(MinLengthLogitsProcessor(cfg.min_length, eos))
    if cfg.min_new_tokens is not None and eos and cfg.min_new_tokens > 0:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_length, cfg.min_new_tokens, eos))
    if cfg.forced_bos_token_id is not None:
        procs.append(ForcedBOSTokenLogitsProcessor(cfg.forced_bos_token_id))
    if cfg.forced_eos_token_id is not None:
        forced = cfg.forced_eos_token_id
        procs.append(ForcedEOSTokenLogitsProcessor(cfg.max_length, forced if isinstance(forced, list) else [forced]))
    if cfg.exponential_decay_length_penalty is not None:
        procs.append(ExponentialDecayLengthPenalty(cfg.exponential_decay_length_penalty, eos, prompt_length))
    if cfg.suppress_tokens is not None:
        procs.append(SuppressTokensLogitsProcessor(cfg.suppress_tokens))
    if cfg.begin_suppress_tokens is not None:
        begin = prompt_length if (prompt_length > 1 or cfg.forced_bos_token_id is None) else prompt_length + 1
        procs.append(SuppressTokensAtBeginLogitsProcessor(cfg.begin_suppress_tokens, begin))
    if cfg.do_sample:
        keep = (len(eos) + 1 if eos else 2) if cfg.num_beams > 1 else 1
        if cfg.temperature is not None and cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k is not None and cfg.top_k != 0:
            procs.append(TopKLogitsWarper(cfg.top_k, keep))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p, keep))
        if cfg.min_p is not None:
            procs.append(MinPLogitsWarper(cfg.min_p, keep))
        if cfg.typical_p is not None and cfg.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(cfg.typical_p, keep))
        if cfg.epsilon_cutoff is not None and 0.0 < cfg.epsilon_cutoff < 1.0:
            procs.append(EpsilonLogitsWarper(cfg.epsilon_cutoff, keep))
        if cfg.eta_cutoff is not None and 0.0 < cfg.eta_cutoff < 1.0:
            procs.append(EtaLogitsWarper(cfg.eta_cutoff, keep))
    if cfg.renormalize_logits is True:
        procs.append(LogitNormalization())
    return procs
