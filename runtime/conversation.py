"""A chat that keeps its KV cache between turns, so turn N prefills only what turn N added.

The cache only ever holds tokens that a fresh run would also produce: each turn renders the
chat template over the whole history, keeps the longest prefix of that rendering which the
cache already holds, crops the cache there and lets ``generate`` prefill the rest. Templates
that re-render earlier turns differently (dropping old reasoning, dating messages) still give
the right answer, with less reuse. It is a layer above ``generate``: every setting and rule of
``generate`` applies to ``send``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from edgelm.runtime.errors import GenerationConfigError, InputError, UnsupportedError

ROLES = ("system", "user", "assistant")
POLICIES = ("error", "drop_oldest")


class Conversation:
    """One chat with a ``CausalLM``; made by ``lm.conversation(system=...)``.

    A conversation is used by one thread at a time (a second thread entering ``send`` meanwhile
    gets an error); several conversations on one model run in parallel threads.
    """

    def __init__(self, lm: Any, system: str | None = None, context_policy: str = "error"):
        if context_policy not in POLICIES:
            raise GenerationConfigError(f"context_policy must be one of {', '.join(POLICIES)}, got {context_policy!r}")
        if not lm.tokenizer.chat_template:
            raise UnsupportedError("this model has no chat template, so it cannot hold a conversation; use generate "
                                   "with plain text")
        self.lm = lm
        self.context_policy = context_policy
        self._messages: list[dict[str, str]] = []
        self._cache = None
        self._cached: np.ndarray = np.zeros(0, np.int64)
        """The token ids whose keys and values the cache holds, in order."""
        self._busy = threading.Lock()
        self.last_stats: dict[str, Any] = {}
        """Of the last reply: prompt_tokens, reused_tokens, new_tokens."""
        self.reset(system)

    # --- history ------------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict[str, str]]:
        """The history as transformers' chat templates take it (a copy; assign a list to replace it)."""
        return [dict(m) for m in self._messages]

    @messages.setter
    def messages(self, messages: list[dict[str, str]]) -> None:
        self._messages = _checked(messages)

    @property
    def system(self) -> str | None:
        return self._messages[0]["content"] if self._messages and self._messages[0]["role"] == "system" else None

    def reset(self, system: str | None = None) -> None:
        """Start over (with a new system message, if given; else none)."""
        self._messages = [{"role": "system", "content": system}] if system else []
        self._cache = None
        self._cached = np.zeros(0, np.int64)

    def set_system(self, system: str | None) -> None:
        """Replace the system message and keep the turns (the cache is reused as far as it still matches)."""
        turns = [m for m in self._messages if m["role"] != "system"]
        self._messages = ([{"role": "system", "content": system}] if system else []) + turns

    def rewind(self, turns: int = 1) -> None:
        """Drop the last ``turns`` exchanges (user message and reply), and the cache positions past what remains."""
        if not isinstance(turns, int) or isinstance(turns, bool) or turns < 1:
            raise InputError(f"turns must be a positive integer, got {turns!r}")
        users = [i for i, m in enumerate(self._messages) if m["role"] == "user"]
        if not users:
            raise InputError("the conversation has no turn to rewind")
        cut = users[-min(turns, len(users))]
        self._messages = self._messages[:cut]
        if self._cache is not None:
            kept = self._render(add_generation_prompt=False) if self._messages else np.zeros(0, np.int64)
            self._crop(_common_prefix(self._cached, kept))

    # --- a turn -------------------------------------------------------------------------------
    def send(self, text: str, streamer: Any = None, **generate_kwargs: Any) -> str:
        """Add the user message, generate the reply as ``generate`` would (same settings and rules), append it and
        return its text."""
        if not isinstance(text, str):
            raise InputError(f"the message must be a string, got {type(text).__name__}")
        if not self._busy.acquire(blocking=False):
            raise UnsupportedError("this conversation is already generating in another thread; use one conversation "
                                   "per thread (lm.conversation())")
        try:
            return self._send(text, streamer, generate_kwargs)
        finally:
            self._busy.release()

    def _send(self, text: str, streamer: Any, kwargs: dict[str, Any]) -> str:
        from edgelm.runtime.generate import GenerateOutput

        if kwargs.get("return_dict_in_generate") or (kwargs.get("num_return_sequences") or 1) > 1:
            raise GenerationConfigError("send returns one reply's text; call lm.generate for return_dict_in_generate "
                                        "or num_return_sequences")
        self._messages.append({"role": "user", "content": text})
        try:
            ids = self._fit_context(kwargs)
            reused = self._reuse(ids, kwargs)
            out = self.lm.generate(ids[None, :], streamer=streamer, past_key_values=self._cache, **kwargs)
        except BaseException:
            self._messages.pop()
            self._cache, self._cached = None, np.zeros(0, np.int64)  # it may hold part of the failed turn
            raise
        seq = np.asarray(out[0], np.int64)
        reply_ids = seq[len(ids):]
        eos = set(self.lm.generation_config.eos_ids) | set(_as_list(kwargs.get("eos_token_id")))
        while len(reply_ids) and int(reply_ids[-1]) in eos:
            reply_ids = reply_ids[:-1]
        reply = self.lm.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self._messages.append({"role": "assistant", "content": reply})
        if self._cache is not None:
            if self._cache.batch > 1:  # beams: the rows share only the prompt
                self._cache.reorder(np.zeros(1, dtype=np.int64))
                self._cache.crop(len(ids))
            # The cache holds every token that was fed: the prompt, and the reply but its last token.
            self._cached = seq[: self._cache.length]
        self.last_stats = {"prompt_tokens": len(ids), "reused_tokens": reused, "new_tokens": len(seq) - len(ids)}
        return reply

    # --- the cache ----------------------------------------------------------------------------
    def _render(self, add_generation_prompt: bool) -> np.ndarray:
        return np.asarray(self.lm.tokenizer.apply_chat_template(self._messages, add_generation_prompt=add_generation_prompt),
                          np.int64)

    def _reuse(self, ids: np.ndarray, kwargs: dict[str, Any]) -> int:
        """Crop the kept cache to what the new rendering shares with it; returns how many tokens it then holds."""
        if kwargs.get("penalty_alpha") and (kwargs.get("top_k") or 0) > 1:
            self._cache, self._cached = None, np.zeros(0, np.int64)  # contrastive search needs every hidden state
            return 0
        if self._cache is None:
            self._cache = self.lm.decoder.new_cache(1)
            self._cached = np.zeros(0, np.int64)
        keep = min(_common_prefix(self._cached, ids), len(ids) - 1)  # the last prompt token must be fed
        self._crop(keep)
        return keep

    def _crop(self, length: int) -> None:
        if self._cache is None:
            return
        if self._cache.batch != 1:  # beams left several rows: they share the prompt, keep one
            self._cache.reorder(np.zeros(1, dtype=np.int64))
        self._cache.crop(length)
        self._cached = self._cached[:length]

    def _fit_context(self, kwargs: dict[str, Any]) -> np.ndarray:
        """The rendered prompt, within the model's context (dropping whole early turns if the policy says so)."""
        limit = self.lm.max_positions
        room = kwargs.get("max_new_tokens") or 1
        ids = self._render(add_generation_prompt=True)
        if not limit or len(ids) + room <= limit:
            return ids
        if self.context_policy == "error":
            raise InputError(
                f"the conversation holds {len(ids)} tokens and the reply may add {room}, past the model's context of "
                f"{limit} positions; rewind or reset it, or create it with context_policy='drop_oldest' to drop the "
                "oldest turns")
        first = 1 if self.system is not None else 0
        while len(ids) + room > limit:
            users = [i for i, m in enumerate(self._messages) if m["role"] == "user"]
            if len(users) < 2:
                raise InputError(f"the last message alone renders to {len(ids)} tokens, past the model's context of "
                                 f"{limit} positions (with {room} new tokens); shorten it")
            del self._messages[first:users[1]]  # the oldest exchange; the system message stays
            ids = self._render(add_generation_prompt=True)
        return ids


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _checked(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"message {i} must be a dict with a role in {ROLES} and a string content, got {m!r}")
        if m["role"] == "system" and i != 0:
            raise InputError(f"message {i}: a system message can only come first")
        out.append({"role": m["role"], "content": m["content"]})
    return out
