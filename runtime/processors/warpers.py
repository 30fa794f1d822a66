"""Warpers: reshape or truncate the distribution a sampling step draws from (temperature, top-k, top-p,
min-p, typical, epsilon and eta cutoffs). Only sampling modes use them; ``keep`` is the number of
candidates beam sampling must always leave.
"""

from __future__ import annotations

import numpy as np

from edgelm.runtime.errors import GenerationConfigError
from edgelm.runtime.processors.base import LogitsProcessor, NEG_INF, kth_largest, log_softmax, softmax


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
        threshold = kth_largest(scores, self.top_k)
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
        remove = (softmax(scores) < self.epsilon) & (scores < kth_largest(scores, self.min_tokens_to_keep))
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
        remove = (probs < eta) & (scores < kth_largest(scores, self.min_tokens_to_keep))
        return np.where(remove, NEG_INF, scores).astype(scores.dtype, copy=False)
