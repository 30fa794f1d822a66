"""The growing state of one ``generate`` call: token ids, attention mask, positions and the KV cache.

Ids and mask live in buffers preallocated to ``max_length`` so appending a token writes one
column instead of copying the whole sequence each step; the cache is the decoder's
(OrtValues handed from one step to the next).
"""

from __future__ import annotations

import numpy as np

from edgelm.runtime.decoder import Decoder, ReusedOutputs
from edgelm.runtime.processors import LogitsProcessorList
from edgelm.runtime.stopping import StoppingCriteriaList


class DecodeState:
    def __init__(self, decoder: Decoder, input_ids: np.ndarray, attention_mask: np.ndarray, max_length: int,
                 output_scores: bool = False, output_logits: bool = False, want_hidden: bool = False,
                 cache=None):
        """``cache``: a cache already holding the first ``cache.length`` tokens of ``input_ids`` (a conversation's
        earlier turns); the prefill then runs only the rest. It is updated in place."""
        self.decoder = decoder
        batch, length = input_ids.shape
        cap = max(max_length, length + 1)
        self._ids = np.zeros((batch, cap), dtype=np.int64)
        self._mask = np.zeros((batch, cap), dtype=np.int64)
        self._ids[:, :length] = input_ids
        self._mask[:, :length] = attention_mask
        self._mask[:, length:] = 1  # every appended token is real: ``append`` then writes the ids alone
        self.cur = length
        self.prompt_length = length
        self._real = attention_mask.sum(axis=1).astype(np.int64)
        """Real (unmasked) tokens of each row's prompt; every token after the prompt is real (``truncate`` keeps it)."""
        if cache is None:
            cache = decoder.new_cache(batch, capacity=cap)
        elif cache.batch != batch:  # one cached prompt, several rows (beams): every row starts from it
            cache.reorder(np.zeros(batch, dtype=np.int64))
        self.cache = cache
        self.output_scores = output_scores
        self.output_logits = output_logits
        self.want_hidden = want_hidden
        self.scores: list[np.ndarray] = []
        self.raw_logits: list[np.ndarray] = []
        self.hidden: np.ndarray | None = None
        self.steps = 0
        self._reused = ReusedOutputs()
        """Logits buffers for passes whose logits are read before the next pass and never kept (``greedy_next``,
        ``forward(reuse=True)``)."""

    @property
    def batch(self) -> int:
        return self._ids.shape[0]

    @property
    def input_ids(self) -> np.ndarray:
        return self._ids[:, : self.cur]

    @property
    def attention_mask(self) -> np.ndarray:
        return self._mask[:, : self.cur]

    def _positions(self, new: int) -> np.ndarray:
        """transformers' rule (cumsum of the mask minus one, padding at 1), without a cumsum per step.

        Only the prompt can hold padding; every appended token is real, so the last ``new``
        positions are the row's real-token count minus ``new`` .. minus 1.
        """
        if new == self.cur:
            mask = self.attention_mask
            pos = np.cumsum(mask, axis=1) - 1
            pos[mask == 0] = 1
            return pos
        first = self._real + (self.cur - self.prompt_length - new)
        return first[:, None] if new == 1 else first[:, None] + np.arange(new)

    def next_positions(self) -> np.ndarray:
        """(batch, 1) position of a token appended next."""
        return (self._real + (self.cur - self.prompt_length))[:, None]

    def forward(self, new: int, keep: int = 0, reuse: bool = False) -> np.ndarray:
        """Run the last ``new`` tokens; returns their logits (batch, new, vocab), or the last ``keep`` of them, as float32.

        ``reuse``: the caller reads the logits before the next pass and keeps nothing of them (nor does
        ``record``): they may come back in this state's reused buffers (``decoder.ReusedOutputs``)."""
        ids = self._ids[:, self.cur - new: self.cur]
        logits, hidden = self.decoder.step(ids, self.attention_mask, self._positions(new), self.cache, self.want_hidden,
                                           keep, self._reused if reuse and not (self.output_scores or self.output_logits)
                                           else None)
        self.hidden = hidden
        self.steps += 1
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def greedy_next(self, bans: LogitsProcessorList | None = None) -> np.ndarray:
        """Run the tokens the cache does not hold yet (the prompt, then each appended token); returns the argmax of
        the last one's logits per row, through the graph's greedy head where it has one (``Decoder.greedy_tokens``).
        For greedy search with nothing that reads the logits (``generate`` decides).

        ``bans``: processors that only ban tokens (``LogitsProcessor.bans_only``). A ban never raises another
        token, so the argmax is theirs too unless they ban it; they are asked about the pick alone
        (``LogitsProcessorList.banned``), and only a banned pick has them run over the logits: the ones the
        pass returned, or, through the greedy head, a rerun of the pass with the full head."""
        new = self.cur - self.cache.length
        ids = self._ids[:, self.cur - new: self.cur]
        tokens, logits = self.decoder.greedy_tokens(ids, self.attention_mask, self._positions(new), self.cache,
                                                    self._reused)
        self.hidden = None
        self.steps += 1
        if bans and any(bans.banned(self.input_ids, tokens.tolist(), self.decoder.columns)):
            if logits is None:
                self.cache.crop(self.cache.length - new)
                logits = self.forward(new, keep=1)[:, -1, :]
            tokens = np.argmax(bans(self.input_ids, logits.astype(np.float32, copy=False)), axis=-1)
        return tokens

    def prefill(self) -> np.ndarray:
        """Run the prompt's tokens that the cache does not hold yet; logits of the last one."""
        return self.forward(self.cur - self.cache.length, keep=1)[:, -1, :]

    def forward_last(self, reuse: bool = False) -> np.ndarray:
        return self.forward(1, keep=1, reuse=reuse)[:, -1, :]

    def _grow(self, extra: int) -> None:
        if self.cur + extra <= self._ids.shape[1]:
            return
        new_cap = max(self._ids.shape[1] * 2, self.cur + extra)
        for name, fill in (("_ids", 0), ("_mask", 1)):
            old = getattr(self, name)
            buf = np.full((old.shape[0], new_cap), fill, dtype=old.dtype)
            buf[:, : self.cur] = old[:, : self.cur]
            setattr(self, name, buf)

    def append(self, tokens: np.ndarray) -> None:
        """Append one token per row (or a (batch, n) block)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim == 1:
            tokens = tokens[:, None]
        n = tokens.shape[1]
        if self.cur + n > self._ids.shape[1]:
            self._grow(n)
        self._ids[:, self.cur: self.cur + n] = tokens
        self.cur += n

    def emit(self, tokens: np.ndarray, unfinished: np.ndarray, pad: int, stopping: StoppingCriteriaList,
             scores: np.ndarray | None, streamer=None, pad_finished: bool = True) -> bool:
        """Append one token per row (finished rows get ``pad``), stream it, update ``unfinished`` in place.

        Returns True when every row has stopped. Called while some row runs (the loops stop when it returns True).
        """
        if pad_finished and not (unfinished.shape[0] == 1 and unfinished[0]):  # one running row: nothing to pad
            tokens = np.where(unfinished, tokens, pad)
        self.append(tokens)
        if streamer is not None:
            streamer.put(tokens)
        done = stopping.stops(self.input_ids, scores)
        if done is True:
            unfinished[:] = False
            return True
        if done is False:  # no row stopped, and some row was running
            return False
        unfinished &= ~done
        return not unfinished.any()

    def truncate(self, length: int, cache_length: int | None = None) -> None:
        """Forget tokens after ``length`` (rejected draft tokens); the cache keeps ``cache_length`` (default ``length``).
        The prompt stays: positions count on its real tokens."""
        if length < self.prompt_length:
            raise ValueError(f"truncate to {length} tokens would cut into the {self.prompt_length}-token prompt")
        self.cur = length
        self.cache.crop(length if cache_length is None else cache_length)

    def reorder(self, rows: np.ndarray) -> None:
        """Keep ``rows`` (beam search): ids, mask and cache follow."""
        self._ids = self._ids[rows]
        self._mask = self._mask[rows]
        self._real = self._real[rows]
        self.cache.reorder(rows)

    def record(self, scores: np.ndarray, logits: np.ndarray) -> None:
        if self.output_scores:
            self.scores.append(scores)
        if self.output_logits:
            self.raw_logits.append(logits)
