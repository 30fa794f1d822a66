"""Diverse (group) beam search, as transformers 4.55's ``_group_beam_search`` with its ``BeamSearchScorer``.

The beams are split into ``num_beam_groups`` groups decoded one after another at each step;
a group's scores are lowered by ``diversity_penalty`` times how often earlier groups picked
each token at this step (Hamming diversity). Finished hypotheses are kept per (batch, group)
in a bounded list. transformers keeps this older, per-hypothesis bookkeeping for group beam
search (plain beam search was vectorised), and the outputs depend on its details, so it is
mirrored here, down to which beam-index history it reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelm.runtime.processors import HammingDiversityLogitsProcessor, LogitsProcessorList, log_softmax
from edgelm.runtime.state import DecodeState
from edgelm.runtime.stopping import StoppingCriteriaList
from edgelm.runtime.strategies.beam_search import topk_indices


class BeamHypotheses:
    """The best ``num_beams`` finished hypotheses of one (batch, group), with length-normalised scores."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool | str, max_length: int):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_length = max_length
        self.beams: list[tuple[float, np.ndarray, tuple | None]] = []
        self.worst_score = 1e9

    def add(self, hyp: np.ndarray, sum_logprobs: float, beam_indices: tuple | None, generated_len: int) -> None:
        score = sum_logprobs / (generated_len ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp, beam_indices))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int, prompt_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0.0:
            best = best_sum_logprobs / (cur_len - prompt_len) ** self.length_penalty
        else:
            best = best_sum_logprobs / (self.max_length - prompt_len) ** self.length_penalty
        return self.worst_score >= best


def run(state: DecodeState, cfg: Any, processors: LogitsProcessorList, stopping: StoppingCriteriaList,
        batch: int) -> dict[str, Any]:
    nb, groups = cfg.num_beams, cfg.num_beam_groups
    gs = nb // groups
    eos = set(cfg.eos_ids)
    pad = cfg.pad_token_id
    prompt_len = state.cur
    track = bool(cfg.return_dict_in_generate and cfg.output_scores)
    hyps = [BeamHypotheses(gs, cfg.length_penalty, cfg.early_stopping, cfg.max_length) for _ in range(batch * groups)]
    done = [False] * (batch * groups)
    beam_scores = np.full((batch, nb), -1e9, np.float32)
    beam_scores[:, ::gs] = 0
    beam_scores = beam_scores.reshape(-1)
    history: list[tuple] = [tuple(() for _ in range(gs * batch)) for _ in range(groups)]
    hamming = HammingDiversityLogitsProcessor(cfg.diversity_penalty, nb, groups) if cfg.diversity_penalty else None
    keep = max(2, 1 + len(eos)) * gs
    logits = state.prefill()
    while True:
        input_ids = state.input_ids.copy()
        cur_len = input_ids.shape[1] + 1
        current = np.zeros(batch * nb, np.int64)
        reorder = np.zeros(batch * nb, np.int64)
        processed = np.zeros_like(logits)
        for g in range(groups):
            start = g * gs
            rows = np.array([b * nb + i for b in range(batch) for i in range(start, start + gs)])
            group_ids = input_ids[rows]
            lp = log_softmax(logits[rows]).astype(np.float32)
            if hamming is not None:
                lp = hamming(group_ids, lp, current, g)
            lp = processors(group_ids, lp)
            processed[rows] = lp
            vocab = lp.shape[-1]
            flat = (lp + beam_scores[rows][:, None]).reshape(batch, gs * vocab)
            top = topk_indices(flat, keep)
            top_scores = np.take_along_axis(flat, top, axis=1)
            top_beam, top_tok = top // vocab, top % vocab
            flat_history = sum(history, ())  # transformers indexes this concatenation with in-group indices
            nxt_scores = np.zeros((batch, gs), np.float32)
            nxt_tokens = np.zeros((batch, gs), np.int64)
            nxt_idx = np.zeros((batch, gs), np.int64)
            for b in range(batch):
                bg = b * groups + g
                if done[bg]:
                    nxt_tokens[b] = pad
                    continue
                j = 0
                for rank in range(keep):
                    tok, score, src = int(top_tok[b, rank]), top_scores[b, rank], b * gs + int(top_beam[b, rank])
                    if tok in eos:
                        if rank >= gs:
                            continue
                        hist = flat_history[src] + (src,) if track else None
                        hyps[bg].add(group_ids[src].copy(), float(score), hist, cur_len - prompt_len)
                    else:
                        nxt_scores[b, j], nxt_tokens[b, j], nxt_idx[b, j] = score, tok, src
                        j += 1
                    if j == gs:
                        break
                done[bg] = done[bg] or hyps[bg].is_done(float(top_scores[b].max()), cur_len, prompt_len)
            beam_scores[rows] = nxt_scores.reshape(-1)
            chosen = nxt_idx.reshape(-1)
            if track:
                history[g] = tuple(history[g][chosen[i]] + (int(chosen[i]),) for i in range(len(history[0])))
            input_ids[rows] = group_ids[chosen]
            current[rows] = nxt_tokens.reshape(-1)
            reorder[rows] = nb * (chosen // gs) + start + (chosen % gs)
        state.record(processed, logits)
        state.reorder(reorder)
        state.append(current)
        if all(done) or stopping(state.input_ids, None).all():
            break
        logits = state.forward_last()
    return _finalize(state.input_ids, beam_scores, hyps, done, history if track else None, cfg, batch, prompt_len)


def _finalize(ids: np.ndarray, beam_scores: np.ndarray, hyps: list[BeamHypotheses], done: list[bool],
              history: list | None, cfg: Any,
              batch: int, prompt_len: int) -> dict[str, Any]:
    groups, keep_n = cfg.num_beam_groups, cfg.num_return_sequences
    gs = cfg.num_beams // groups
    flat_history = sum(history, ()) if history is not None else None
    for bg, hyp in enumerate(hyps):
        if done[bg]:
            continue
        for i in range(gs):
            row = bg * gs + i
            hyp.add(ids[row], float(beam_scores[row]), flat_history[row] if flat_history is not None else None,
                    ids.shape[1] - prompt_len)
    best, best_idx, scores = [], [], np.zeros(batch * keep_n, np.float32)
    for b in range(batch):
        cands = [beam for h in hyps[b * groups:(b + 1) * groups] for beam in h.beams]
        ranked = sorted(cands, key=lambda x: x[0])
        for j in range(keep_n):
            score, hyp, idx = ranked.pop()
            best.append(hyp)
            best_idx.append(idx)
            scores[b * keep_n + j] = score
    lengths = [len(h) for h in best]
    width = min(max(lengths) + 1, cfg.max_length)
    out = np.full((len(best), width), cfg.pad_token_id if cfg.pad_token_id is not None else 0, np.int64)
    indices = np.full((len(best), width), -1, np.int64) if history is not None else None
    for i, (hyp, idx) in enumerate(zip(best, best_idx)):
        out[i, : len(hyp)] = hyp
        if indices is not None:
            indices[i, : len(idx)] = idx
        if len(hyp) < width:
            out[i, len(hyp)] = cfg.eos_ids[0]
    return {"sequences": out, "sequences_scores": scores, "beam_indices": indices}
