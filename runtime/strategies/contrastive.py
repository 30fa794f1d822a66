"""Contrastive search (Su et al. 2022), as transformers 4.55's ``_contrastive_search``.

Each step scores the ``top_k`` most likely next tokens by
``(1 - alpha) * p(token) - alpha * max cosine(hidden(token), hidden(context))`` and keeps the
best. The candidates' hidden states come from one batched forward pass of ``batch * top_k``
rows over the cache repeated ``top_k`` times; the cache of the chosen candidate becomes the
next step's cache, so no second forward is needed. This is why the exported graph returns
``last_hidden_state``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.runtime.processors import LogitsProcessorList, softmax
from edgelm.runtime.state import DecodeState
from edgelm.runtime.stopping import StoppingCriteriaList
from edgelm.runtime.strategies.beam_search import topk_indices


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def run(state: DecodeState, cfg: Any, processors: LogitsProcessorList, stopping: StoppingCriteriaList,
        streamer: Any = None) -> DecodeState:
    top_k, alpha = int(cfg.top_k), np.float32(cfg.penalty_alpha)
    batch = state.batch
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    has_eos = bool(cfg.eos_ids)
    decoder = state.decoder
    logits = state.prefill()
    # Normalised hidden states of every position so far, in a buffer sized for the whole generation:
    # each step normalises one new state instead of the whole context, and nothing is repeated top_k times.
    prompt_len, hidden = state.hidden.shape[1], state.hidden.shape[2]
    cap = max(cfg.max_length, prompt_len + 1)
    context = np.zeros((batch, cap, hidden), np.float32)
    # Padding positions are masked out of the penalty; their states are zeroed first because a
    # fused attention kernel (or SDPA) may leave them non-finite, and NaN + mask is still NaN.
    real = state.attention_mask[:, :, None] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        context[:, :prompt_len] = np.where(real, _normalise(state.hidden.astype(np.float32)), 0.0)
    penalty_mask = np.zeros((batch, cap), np.float32)  # padding positions never count as "repeated"
    penalty_mask[:, :prompt_len] = (1.0 - state.attention_mask) * np.finfo(np.float32).min
    n_ctx = prompt_len
    unfinished = np.ones(batch, dtype=bool)
    expand = np.repeat(np.arange(batch), top_k)
    rows = np.arange(batch)
    while True:
        scores = processors(state.input_ids, logits)
        state.record(scores, logits)
        probs = softmax(scores)
        top_ids = topk_indices(probs, top_k)  # (batch, top_k), most likely first
        top_probs = np.take_along_axis(probs, top_ids, axis=1)

        # one forward pass over all candidates, on the cache repeated top_k times
        cand = state.cache.gathered(expand)
        mask = np.concatenate([state.attention_mask, np.ones((batch, 1), np.int64)], axis=1)[expand]
        pos = state.next_positions()[expand]
        cand_logits, cand_hidden = decoder.step(top_ids.reshape(-1, 1), mask, pos, cand, want_hidden=True)
        next_norm = _normalise(cand_hidden[:, 0, :].astype(np.float32)).reshape(batch, top_k, hidden)

        # degeneration penalty: the largest cosine similarity with any real context position
        cos = np.einsum("bsh,bkh->bks", context[:, :n_ctx], next_norm) + penalty_mask[:, None, :n_ctx]
        score = (1.0 - alpha) * top_probs - alpha * cos.max(axis=-1)
        selected = score.argmax(axis=-1)

        next_tokens = top_ids[rows, selected]
        cand.reorder(rows * top_k + selected)
        state.cache = cand
        context[:, n_ctx] = next_norm[rows, selected]
        n_ctx += 1
        logits = cand_logits[rows * top_k + selected, -1, :].astype(np.float32)
        if state.emit(next_tokens, unfinished, pad, stopping, scores, streamer, pad_finished=has_eos):
            break
    return state
