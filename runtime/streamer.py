"""Streamers: receive token ids as they are generated and emit text, like transformers' streamers.

Text is released only when it is final: a token that ends in the middle of a UTF-8
character decodes to U+FFFD until the next token completes it, and a word-piece may still
grow, so we hold back text after the last space (except for CJK, which has no spaces).
"""

from __future__ import annotations

import queue
import sys
from typing import Any, Callable, Iterator

import numpy as np


class BaseStreamer:
    def put(self, value: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def end(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F or 0x3040 <= cp <= 0x30FF or 0xAC00 <= cp <= 0xD7AF)


class TextStreamer(BaseStreamer):
    """Decodes the stream incrementally and hands finished text to ``on_text`` (stdout by default)."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, on_text: Callable[[str, bool], None] | None = None,
                 **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.on_text = on_text or self._print
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True
        self.generated = 0  # tokens received after the prompt (a caller interrupted mid-way can report it)

    @staticmethod
    def _print(text: str, stream_end: bool = False) -> None:
        sys.stdout.write(text + ("\n" if stream_end else ""))
        sys.stdout.flush()

    def put(self, value: np.ndarray) -> None:
        value = np.asarray(value)
        if value.ndim > 1:
            if value.shape[0] > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            value = value[0]
        is_prompt, self.next_tokens_are_prompt = self.next_tokens_are_prompt, False
        if not is_prompt:
            self.generated += int(value.size)
        elif self.skip_prompt:
            return
        self.token_cache.extend(int(v) for v in value.reshape(-1))
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self.print_len:]
            self.token_cache, self.print_len = [], 0
        elif text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the rest
        elif text and _is_cjk(text[-1]):
            printable = text[self.print_len:]
            self.print_len += len(printable)
        else:
            cut = text.rfind(" ") + 1
            printable = text[self.print_len:cut] if cut > self.print_len else ""
            self.print_len += len(printable)
        if printable:
            self.on_text(printable, False)

    def end(self) -> None:
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len:]
            self.token_cache, self.print_len = [], 0
        else:
            printable = ""
        self.next_tokens_are_prompt = True
        self.on_text(printable, True)


class TextIteratorStreamer(TextStreamer):
    """Iterate over text pieces while ``generate`` runs in another thread."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, on_text=self._enqueue, **decode_kwargs)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout
        self._stop = object()

    def _enqueue(self, text: str, stream_end: bool) -> None:
        if text:
            self.queue.put(text, timeout=self.timeout)
        if stream_end:
            self.queue.put(self._stop, timeout=self.timeout)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        value = self.queue.get(timeout=self.timeout)
        if value is self._stop:
            raise StopIteration
        return value
