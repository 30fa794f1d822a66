"""Stopping criteria: ``(input_ids, scores) -> bool array`` of rows that are done, as in transformers.

A criterion that stops every row at once (a length or time limit) may answer with one bool, as a caller's
criteria may (``generate``'s ``stopping_criteria``): ``StoppingCriteriaList`` spreads it over the rows.
The list runs after every token, right after a step's matrix products have emptied the CPU's caches, when
each numpy call costs a few microseconds: answering in plain Python where one bool says it all is part of
what brought ``generate``'s own time per step level with a bare loop's (``benchmarks/loop_overhead.py``).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np


class StoppingCriteria:
    def __call__(self, input_ids: np.ndarray, scores: np.ndarray | None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class MaxLengthCriteria(StoppingCriteria):
    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, input_ids, scores):
        return input_ids.shape[-1] >= self.max_length


class MaxTimeCriteria(StoppingCriteria):
    def __init__(self, max_time: float, start: float | None = None):
        self.max_time = max_time
        self.start = time.perf_counter() if start is None else start

    def __call__(self, input_ids, scores):
        return time.perf_counter() - self.start > self.max_time


class EosTokenCriteria(StoppingCriteria):
    def __init__(self, eos_token_id: Sequence[int]):
        self.eos = np.asarray(list(eos_token_id), dtype=np.int64)
        self._eos = frozenset(int(e) for e in self.eos)

    def __call__(self, input_ids, scores):
        if input_ids.shape[0] == 1:  # one row: its answer is every row's (module docstring)
            return int(input_ids[0, -1]) in self._eos
        last = input_ids[:, -1]
        if self.eos.size == 1:  # the common case, without np.isin's set machinery (it runs every step)
            return last == self.eos[0]
        return (last[:, None] == self.eos[None, :]).any(axis=1)


class StopStringCriteria(StoppingCriteria):
    """Done when the text ends with a stop string; the last token may run past it, as in transformers."""

    def __init__(self, tokenizer: Any, stop_strings: str | Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.prompt_length = prompt_length
        self.window = max(len(s) for s in self.stop_strings) + 2

    def __call__(self, input_ids, scores):
        done = np.zeros(input_ids.shape[0], dtype=bool)
        for row, seq in enumerate(input_ids):
            tail = seq[max(self.prompt_length, len(seq) - self.window):]
            if len(tail) == 0:
                continue
            text = self.tokenizer.decode(tail)
            before = len(self.tokenizer.decode(tail[:-1])) if len(tail) > 1 else 0
            for s in self.stop_strings:
                at = text.find(s)
                while at != -1:
                    if at + len(s) > before:
                        done[row] = True
                        break
                    at = text.find(s, at + 1)
        return done


class StoppingCriteriaList(list):
    def __call__(self, input_ids: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        """(rows,) bool: the rows some criterion stops. Read it, do not write to it: it may be a criterion's own
        answer."""
        done = self.stops(input_ids, scores)
        return np.full(input_ids.shape[0], done) if isinstance(done, bool) else done

    def stops(self, input_ids: np.ndarray, scores: np.ndarray | None) -> bool | np.ndarray:
        """What ``__call__`` answers, or one bool when it is the same for every row (the decoding loop's common
        case, with no array made)."""
        every, rows = False, None
        for crit in self:
            done = crit(input_ids, scores)
            if isinstance(done, (bool, np.bool_)) or np.ndim(done) == 0:
                every = every or bool(done)
            else:
                done = np.asarray(done, dtype=bool)
                rows = done if rows is None else rows | done
        if rows is None or every:
            return every
        return rows

    @property
    def max_length(self) -> int | None:
        for crit in self:
            if isinstance(crit, MaxLengthCriteria):
                return crit.max_length
        return None


def build_stopping(cfg: Any, prompt_length: int, tokenizer: Any = None) -> StoppingCriteriaList:
    crits = StoppingCriteriaList([MaxLengthCriteria(cfg.max_length)])
    if cfg.max_time is not None:
        crits.append(MaxTimeCriteria(cfg.max_time))
    if cfg.stop_strings is not None:
        if tokenizer is None:
            from edgelm.runtime.errors import GenerationConfigError

            raise GenerationConfigError("stop_strings needs the model's tokenizer")
        crits.append(StopStringCriteria(tokenizer, cfg.stop_strings, prompt_length))
    if cfg.eos_ids:
        crits.append(EosTokenCriteria(cfg.eos_ids))
    return crits
