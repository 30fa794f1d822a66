"""Processors that change which tokens may come next whatever the strategy: penalties (repetition,
n-gram repeats, group diversity), bans (bad words, suppressed tokens), length rules (minimum
length, forced BOS/EOS, exponential decay) and renormalisation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgelm.runtime.errors import GenerationConfigError
from edgelm.runtime.processors.base import LogitsProcessor, NEG_INF, among, ban, log_softmax


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
    bans_only = True

    def __init__(self, ngram_size: int):
        if not isinstance(ngram_size, (int, np.integer)) or ngram_size <= 0:
            raise GenerationConfigError(f"no_repeat_ngram_size must be a strictly positive integer, got {ngram_size!r}")
        self.n = int(ngram_size)

    def _banned_rows(self, input_ids: np.ndarray) -> list[np.ndarray]:
        """Per row, the tokens that would complete an n-gram the row already holds (repeats allowed).

        Every n-gram start is compared with the row's last n-1 tokens in one array operation: greedy search
        asks this on every step, and a Python loop over the sequence would grow with it, step after step."""
        ids = np.asarray(input_ids)
        cur_len = ids.shape[1]
        if cur_len < self.n:  # no n-gram complete yet
            return [ids[row, :0] for row in range(ids.shape[0])]
        follow = ids[:, self.n - 1:]  # the token after each (n-1)-token window that starts at 0..cur_len-n
        if self.n == 1:
            return list(follow)
        windows = np.lib.stride_tricks.sliding_window_view(ids[:, :-1], self.n - 1, axis=1)
        hits = (windows == ids[:, None, cur_len + 1 - self.n:]).all(axis=2)
        return [follow[row][hits[row]] for row in range(ids.shape[0])]

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] + 1 < self.n:
            return scores
        out = scores.copy()
        for row, banned in enumerate(self._banned_rows(input_ids)):
            if banned.size:
                out[row, banned] = NEG_INF
        return out

    def banned(self, input_ids, tokens, columns):
        return [int(t) in banned.tolist() for t, banned in zip(tokens, self._banned_rows(input_ids))]


class NoBadWordsLogitsProcessor(LogitsProcessor):
    """Bans single tokens always, and the last token of a sequence whose prefix was just generated."""

    bans_only = True

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
        self._single = frozenset(self.single)
        self.multi = [s for s in seqs if len(s) > 1]

    def __call__(self, input_ids, scores):
        bias = np.zeros_like(scores)
        if self.single:
            bias[:, self.single] = NEG_INF
        for seq in self.multi:
            if len(seq) > input_ids.shape[1]:
                continue
            bias[self._matches(input_ids, seq), seq[-1]] += NEG_INF
        return scores + bias

    @staticmethod
    def _matches(input_ids: np.ndarray, seq: list[int]) -> np.ndarray:
        """(rows,) bool: the row ends with ``seq`` but its last token, which is then banned."""
        return np.all(input_ids[:, -(len(seq) - 1):] == np.asarray(seq[:-1]), axis=1)

    def banned(self, input_ids, tokens, columns):
        out = among(tokens, self._single)
        for seq in self.multi:
            if len(seq) <= input_ids.shape[1] and seq[-1] in tokens:
                out = [o or (int(t) == seq[-1] and bool(m)) for o, t, m in zip(out, tokens, self._matches(input_ids, seq))]
        return out


class MinLengthLogitsProcessor(LogitsProcessor):
    bans_only = True

    def __init__(self, min_length: int, eos_token_id: Sequence[int]):
        if not isinstance(min_length, (int, np.integer)) or min_length < 0:
            raise GenerationConfigError(f"min_length must be a non-negative integer, got {min_length!r}")
        self.min_length = int(min_length)
        self.eos = list(eos_token_id)
        self._eos = frozenset(self.eos)

    def __call__(self, input_ids, scores):
        return ban(scores, self.eos) if input_ids.shape[-1] < self.min_length else scores

    def banned(self, input_ids, tokens, columns):
        return among(tokens, self._eos, input_ids.shape[-1] < self.min_length)


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    bans_only = True

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id: Sequence[int]):
        if not isinstance(min_new_tokens, (int, np.integer)) or min_new_tokens < 0:
            raise GenerationConfigError(f"min_new_tokens must be a non-negative integer, got {min_new_tokens!r}")
        self.skip = int(prompt_length_to_skip)
        self.min_new_tokens = int(min_new_tokens)
        self.eos = list(eos_token_id)
        self._eos = frozenset(self.eos)

    def __call__(self, input_ids, scores):
        return ban(scores, self.eos) if input_ids.shape[-1] - self.skip < self.min_new_tokens else scores

    def banned(self, input_ids, tokens, columns):
        return among(tokens, self._eos, input_ids.shape[-1] - self.skip < self.min_new_tokens)


class SuppressTokensLogitsProcessor(LogitsProcessor):
    bans_only = True

    def __init__(self, suppress_tokens: Sequence[int]):
        self.tokens = [int(t) for t in suppress_tokens]
        self._tokens = frozenset(self.tokens)

    def __call__(self, input_ids, scores):
        return ban(scores, self.tokens) if self.tokens else scores

    def banned(self, input_ids, tokens, columns):
        return among(tokens, self._tokens)


class SuppressTokensAtBeginLogitsProcessor(LogitsProcessor):
    bans_only = True

    def __init__(self, begin_suppress_tokens: Sequence[int], begin_index: int):
        self.tokens = [int(t) for t in begin_suppress_tokens]
        self._tokens = frozenset(self.tokens)
        self.begin_index = begin_index

    def __call__(self, input_ids, scores):
        return ban(scores, self.tokens) if input_ids.shape[-1] == self.begin_index and self.tokens else scores

    def banned(self, input_ids, tokens, columns):
        return among(tokens, self._tokens, input_ids.shape[-1] == self.begin_index)


class ForcedBOSTokenLogitsProcessor(LogitsProcessor):
    bans_only = True

    def __init__(self, bos_token_id: int):
        self.bos = int(bos_token_id)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != 1:
            return scores
        out = np.full_like(scores, NEG_INF)
        out[:, self.bos] = 0
        return out

    def banned(self, input_ids, tokens, columns):
        return [input_ids.shape[-1] == 1 and int(t) != self.bos for t in tokens]


class ForcedEOSTokenLogitsProcessor(LogitsProcessor):
    bans_only = True

    def __init__(self, max_length: int, eos_token_id: Sequence[int]):
        self.max_length = max_length
        self.eos = list(eos_token_id)
        if any(e < 0 for e in self.eos):
            raise GenerationConfigError(f"forced_eos_token_id must be non-negative, got {self.eos}")
        self._eos = frozenset(self.eos)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] != self.max_length - 1:
            return scores
        out = np.full_like(scores, NEG_INF)
        out[:, self.eos] = 0
        return out

    def banned(self, input_ids, tokens, columns):
        at_end = input_ids.shape[-1] == self.max_length - 1
        return [at_end and int(t) not in self._eos for t in tokens]


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
