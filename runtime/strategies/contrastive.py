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

from edgelm.runtime.kv_cache import KVCache
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
    context = state.hidden.astype(np.float32)  # (batch, prompt, hidden): every prompt position
    context_mask = state.attention_mask.astype(np.float32)  # padding positions never count as "repeated"
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
        cand = KVCache(state.cache.names, list(state.cache.values), state.cache.device, state.cache.device_id)
        cand.reorder(expand)
        mask = np.concatenate([state.attention_mask, np.ones((batch, 1), np.int64)], axis=1)[expand]
        pos = (np.cumsum(mask, axis=1) - 1)[:, -1:]
        cand_logits, cand_hidden = decoder.step(top_ids.reshape(-1, 1), mask, pos, cand, want_hidden=True)
        next_hidden = cand_hidden[:, 0, :].astype(np.float32)  # (batch*top_k, hidden)

        # degeneration penalty: the largest cosine similarity with any real context position
        ctx = _normalise(context)[expand]  # (batch*top_k, seq, hidden)
        cos = np.einsum("bsh,bh->bs", ctx, _normalise(next_hidden))
        cos = cos + (1.0 - context_mask[expand]) * np.finfo(np.float32).min
        penalty = cos.max(axis=-1)
        score = ((1.0 - alpha) * top_probs.reshape(-1) - alpha * penalty).reshape(batch, top_k)
        selected = score.argmax(axis=-1)
        chosen = rows * top_k + selected

        next_tokens = top_ids[rows, selected]
        state.cache.replace(cand.values)
        state.cache.reorder(chosen)
        context = np.concatenate([context, next_hidden[chosen][:, None, :]], axis=1)
        context_mask = np.concatenate([context_mask, np.ones((batch, 1), np.float32)], axis=1)
        logits = cand_logits[chosen, -1, :].astype(np.float32)

        if state.emit(next_tokens, unfinished, pad, stopping, scores, streamer, pad_finished=has_eos):
            break
    return state
