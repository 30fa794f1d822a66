"""The processor interface and the numpy helpers the processors share (softmax, k-th largest, bans)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

NEG_INF = -np.inf


class LogitsProcessor:
    bans_only = False
    """True for a processor that only bans tokens (their scores to -inf) and leaves the others' order alone (a
    forced token is the one survivor of a ban on all the rest): the argmax before it is then the argmax after it
    whenever it survives. Greedy search with only such processors takes the argmax first (through the graph's
    greedy head where it has one) and asks them about that pick alone (``banned``, ``DecodeState.greedy_next``)."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def banned(self, input_ids: np.ndarray, tokens: Sequence[int], columns: int) -> list[bool]:
        """Per row, whether this ban-only processor bans ``tokens[r]`` for row ``r`` (``tokens``: one id per row).

        The ban processors answer from their rule in O(banned tokens), which is what makes asking about the
        pick cheaper than processing a vocabulary-wide row each greedy step (a copy of SmolLM2's 49,152 scores
        cost more than the rest of the step's Python). They answer in plain Python over the handful of rows:
        every numpy call costs a few microseconds right after a step's matrix products have emptied the CPU's
        caches, and the ban now adds about 0.01 ms to an int4 SmolLM2 step (``benchmarks/loop_overhead.py``,
        its "EOS banned" row against the one without).
        This fallback learns the answer by running the processor on a row of zeros ``columns`` wide, so a
        ban-only processor without a rule of its own still answers right."""
        rows = np.arange(len(tokens))
        return np.isneginf(self(input_ids, np.zeros((len(tokens), columns), np.float32))[rows, list(tokens)]).tolist()


class LogitsProcessorList(list):
    """Applies its processors in order, like transformers' list of the same name."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for proc in self:
            scores = proc(input_ids, scores)
        return scores

    @property
    def bans_only(self) -> bool:
        """Every processor only bans tokens (an empty list bans none)."""
        return all(getattr(proc, "bans_only", False) for proc in self)

    def banned(self, input_ids: np.ndarray, tokens: Sequence[int], columns: int) -> list[bool]:
        """Per row, whether some processor bans ``tokens[r]`` for row ``r`` (every processor ``bans_only``). Bans
        only remove tokens, so a token none of them bans keeps its score through all of them."""
        out = [False] * len(tokens)
        for proc in self:
            out = [a or bool(b) for a, b in zip(out, proc.banned(input_ids, tokens, columns))]
        return out


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


def kth_largest(scores: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of each row, (rows, 1), in O(vocab) with argpartition."""
    k = min(k, scores.shape[-1])
    part = np.partition(scores, scores.shape[-1] - k, axis=-1)
    return part[:, scores.shape[-1] - k][:, None]


def among(tokens: Sequence[int], token_ids: frozenset[int], when: bool = True) -> list[bool]:
    """Per row, ``when`` and ``tokens[r]`` is one of ``token_ids`` (what most bans answer; see ``banned``)."""
    return [when and int(t) in token_ids for t in tokens]


def ban(scores: np.ndarray, token_ids: Sequence[int]) -> np.ndarray:
    out = scores.copy()
    out[:, list(token_ids)] = NEG_INF
    return out
