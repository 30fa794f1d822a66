"""Beam search and beam-search multinomial sampling (transformers 4.55's vectorised ``_beam_search``).

Each step keeps ``beams_to_keep = max(2, 1 + n_eos) * num_beams`` candidates so that beams
finishing on EOS never starve the running set; finished hypotheses are merged into a
per-batch top-``num_beams`` list with the length penalty applied. The arithmetic (float32
log-probs, -1e9 sentinels, the early-stopping heuristic) follows transformers line for line,
since beam search amplifies any difference into a different output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.runtime.processors import LogitsProcessorList, log_softmax, softmax
from edgelm.runtime.state import DecodeState
from edgelm.runtime.stopping import StoppingCriteriaList

BIG = np.float32(1.0e9)


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of each row, largest first (argpartition, then sort only k)."""
    if k >= x.shape[-1]:
        return np.argsort(-x, axis=-1, kind="stable")
    part = np.argpartition(-x, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(x, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1) if x.ndim == 1 else np.stack(
        [np.lexsort((p, -v)) for p, v in zip(part.reshape(-1, k), vals.reshape(-1, k))]).reshape(part.shape)
    return np.take_along_axis(part, order, axis=-1)


def _gather(t: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``t[b, idx[b, j], ...]``: transformers' ``_gather_beams``."""
    while idx.ndim < t.ndim:
        idx = idx[..., None]
    return np.take_along_axis(t, np.broadcast_to(idx, idx.shape[:2] + t.shape[2:]) if t.ndim > 2 else idx, axis=1)


def run(state: DecodeState, cfg: Any, processors: LogitsProcessorList, stopping: StoppingCriteriaList,
        rng: np.random.Generator | None, batch_size: int) -> dict[str, Any]:
    """``state`` holds the prompt rows already repeated ``num_beams`` times."""
    num_beams = cfg.num_beams
    eos = cfg.eos_ids
    max_length = cfg.max_length
    length_penalty = cfg.length_penalty
    early_stopping = cfg.early_stopping
    cur_len = state.cur
    prompt_len = cur_len
    beams_to_keep = max(2, 1 + len(eos)) * num_beams
    top_num_beam_mask = np.arange(beams_to_keep) < num_beams
    pad = cfg.pad_token_id
    fill = pad if pad else (eos[0] if eos else -1)  # transformers: `pad_token_id or eos_token_id[0]`

    running = np.full((batch_size, num_beams, max_length), fill, dtype=np.int64)
    running[:, :, :cur_len] = state.input_ids.reshape(batch_size, num_beams, cur_len)
    sequences = running.copy()
    running_scores = np.zeros((batch_size, num_beams), np.float32)
    running_scores[:, 1:] = -BIG
    beam_scores = np.full((batch_size, num_beams), -BIG, np.float32)
    finished = np.zeros((batch_size, num_beams), bool)
    heuristic_unsatisfied = np.ones((batch_size, 1), bool)
    running_beam_idx = np.full((batch_size, num_beams, max_length - cur_len), -1, np.int64)
    beam_indices = running_beam_idx.copy()
    batch_offset = (np.arange(batch_size) * num_beams)[:, None]

    logits = state.prefill()
    while True:
        flat_running = running[:, :, :cur_len].reshape(batch_size * num_beams, cur_len)
        log_probs = log_softmax(logits).astype(np.float32)
        log_probs = processors(flat_running, log_probs)
        state.record(log_probs, logits)
        vocab = log_probs.shape[-1]
        acc = (log_probs.reshape(batch_size, num_beams, vocab) + running_scores[:, :, None]).reshape(batch_size, -1)

        # top-k continuations over all beams of each batch item
        if cfg.do_sample:
            probs = softmax(acc.astype(np.float32))
            picks = np.stack([rng.choice(acc.shape[1], size=beams_to_keep, replace=False, p=_normalised(p)) for p in probs])
            topk_lp = np.take_along_axis(acc, picks, axis=1)
        else:
            picks = topk_indices(acc, beams_to_keep)
            topk_lp = np.take_along_axis(acc, picks, axis=1)
        src_beam = picks // vocab
        topk_ids = picks % vocab
        topk_beam_idx = _gather(running_beam_idx, src_beam)
        topk_running = _gather(running, src_beam)
        topk_running[:, :, cur_len] = topk_ids
        topk_beam_idx[:, :, cur_len - prompt_len] = src_beam + batch_offset

        hits = stopping(topk_running[:, :, : cur_len + 1].reshape(batch_size * beams_to_keep, cur_len + 1), None)
        hits = hits.reshape(batch_size, beams_to_keep)

        # running beams for the next step: the best num_beams that did not just stop
        next_lp = (topk_lp + hits.astype(np.float32) * -BIG).astype(np.float32)
        keep = topk_indices(next_lp, num_beams)
        running = _gather(topk_running, keep)
        running_scores = np.take_along_axis(next_lp, keep, axis=1)
        running_beam_idx = _gather(topk_beam_idx, keep)

        # finished hypotheses: merge the ones that just stopped into the best-so-far list
        just_finished = hits & top_num_beam_mask[None, :]
        fin_lp = (topk_lp / np.float32((cur_len + 1 - prompt_len) ** length_penalty)).astype(np.float32)
        full = np.all(finished, axis=-1, keepdims=True) & (early_stopping is True)
        fin_lp = fin_lp + full.astype(np.float32) * -BIG
        fin_lp = fin_lp + (~heuristic_unsatisfied).astype(np.float32) * -BIG
        fin_lp = fin_lp + (~just_finished).astype(np.float32) * -BIG
        merged_seq = np.concatenate([sequences, topk_running], axis=1)
        merged_scores = np.concatenate([beam_scores, fin_lp.astype(np.float32)], axis=1)
        merged_idx = np.concatenate([beam_indices, topk_beam_idx], axis=1)
        merged_fin = np.concatenate([finished, just_finished], axis=1)
        best = topk_indices(merged_scores, num_beams)
        sequences = _gather(merged_seq, best)
        beam_scores = np.take_along_axis(merged_scores, best, axis=1)
        beam_indices = _gather(merged_idx, best)
        finished = np.take_along_axis(merged_fin, best, axis=1)

        # the cache follows the surviving beams; their new token goes in
        reorder = running_beam_idx[:, :, cur_len - prompt_len].reshape(-1)
        state.reorder(reorder)
        state.append(running[:, :, cur_len].reshape(-1))
        cur_len += 1

        # early-stop heuristic: can a running beam still beat the worst finished one?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_running = running_scores[:, :1] / np.float32(best_len ** length_penalty)
        worst_finished = np.where(finished, np.min(beam_scores, axis=1, keepdims=True), np.float32(-1.0e9))
        heuristic_unsatisfied = heuristic_unsatisfied & np.any(best_running > worst_finished, axis=-1, keepdims=True)
        improvement_possible = heuristic_unsatisfied.any()
        open_beam = not (finished.all() and early_stopping is True)
        valid = not hits.all()
        if not (improvement_possible and open_beam and valid):
            break
        logits = state.forward_last()

    nrs = cfg.num_return_sequences
    sequences = sequences[:, :nrs].reshape(batch_size * nrs, -1)
    scores = beam_scores[:, :nrs].reshape(-1)
    indices = beam_indices[:, :nrs].reshape(batch_size * nrs, -1)
    generated = int((indices != -1).sum(axis=1).max())
    return {
        "sequences": sequences[:, : prompt_len + generated],
        "sequences_scores": scores,
        "beam_indices": indices[:, :generated],
    }


def _normalised(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return p / p.sum()
