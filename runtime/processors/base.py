"""The processor interface and the numpy helpers the processors share (softmax, k-th largest, bans)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

NEG_INF = -np.inf


class LogitsProcessor:
    bans_only = False
    """True for a processor that only bans tokens (their scores to -inf) and leaves the others' order alone (a
    forced token is the one survivor of a ban on all the rest): the argmax before it is then the argmax after it
    whenever it survives. Greedy search with only such processors takes the graph's greedy head and asks them
    about its pick alone (``DecodeState.greedy_next``)."""

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


def kth_largest(scores: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of each row, (rows, 1), in O(vocab) with argpartition."""
    k = min(k, scores.shape[-1])
    part = np.partition(scores, scores.shape[-1] - k, axis=-1)
    return part[:, scores.shape[-1] - k][:, None]


def ban(scores: np.ndarray, token_ids: Sequence[int]) -> np.ndarray:
    out = scores.copy()
    out[:, list(token_ids)] = NEG_INF
    return out
