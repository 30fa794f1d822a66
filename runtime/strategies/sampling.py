"""Greedy search and multinomial sampling: one token per step (transformers' ``_sample``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.runtime.processors import LogitsProcessorList, softmax
from edgelm.runtime.state import DecodeState
from edgelm.runtime.stopping import StoppingCriteriaList


def sample_token(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from ``probs`` (rows, vocab) by inverse CDF: O(vocab), no sort.

    After top-k/top-p most probabilities are exactly zero; the CDF is then built over the
    non-zero entries only (adding zeros changes no partial sum, so the draw is the same).
    """
    rows, vocab = probs.shape
    u = rng.random(rows)
    picks = np.empty(rows, dtype=np.int64)
    for r in range(rows):
        p = probs[r]
        nz = np.flatnonzero(p)
        if nz.size == 0:
            picks[r] = vocab - 1
            continue
        cdf = np.cumsum(p[nz], dtype=np.float64)
        picks[r] = nz[min(int(np.searchsorted(cdf, u[r] * cdf[-1], side="left")), nz.size - 1)]
    return picks


def run(state: DecodeState, cfg: Any, processors: LogitsProcessorList, stopping: StoppingCriteriaList,
        rng: np.random.Generator | None, streamer: Any = None, argmax_only: bool = False) -> DecodeState:
    """Decode until every row stops; finished rows are padded with ``pad_token_id`` as transformers does.

    ``argmax_only``: greedy search where nothing reads the logits (no processors but ones that only ban
    tokens, no returned scores or logits, no caller's stopping criteria, which may read them): each step asks
    for the next tokens only (``DecodeState.greedy_next``, the bans consulted about its pick), which a float32
    export answers without its LM head. The stopping criteria then see ``scores=None``, as the built-in ones
    allow.
    """
    unfinished = np.ones(state.batch, dtype=bool)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    if argmax_only:
        while not state.emit(state.greedy_next(processors or None), unfinished, pad, stopping, None, streamer):
            pass
        return state
    logits = state.prefill()
    while True:
        scores = processors(state.input_ids, logits)
        state.record(scores, logits)
        if cfg.do_sample:
            next_tokens = sample_token(softmax(scores), rng)
        else:
            next_tokens = np.argmax(scores, axis=-1)
        if state.emit(next_tokens, unfinished, pad, stopping, scores, streamer):
            break
        logits = state.forward_last(reuse=True)  # read once below; ``forward`` reuses no buffer when they are returned
    return state
