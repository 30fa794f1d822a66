"""Each generation setting's type and range, checked before any rule reads it.

Separate from the mode rules (``modes``) because these are facts about one value (an integer,
a probability, a token id inside the vocabulary) while the rules are about combinations of
settings; a NaN temperature must be named here rather than surface later as a numpy error.
"""

from __future__ import annotations

import math
from typing import Any

from edgelm.runtime.errors import GenerationConfigError


def check_types(cfg: Any, vocab_size: int | None = None) -> None:
    """Each setting's type and range, before any rule uses it: a NaN temperature or a token id past the
    vocabulary must be named here, not surface later as a numpy error or a silently wrong answer."""
    for name in ("max_length", "num_beams", "num_beam_groups", "num_return_sequences", "num_assistant_tokens"):
        _integer(name, getattr(cfg, name), low=1)
    for name, low in (("min_length", 0), ("no_repeat_ngram_size", 0)):
        _integer(name, getattr(cfg, name), low=low)
    for name, low in (("max_new_tokens", 1), ("min_new_tokens", 0), ("prompt_lookup_num_tokens", 1),
                      ("max_matching_ngram_size", 1)):
        _integer(name, getattr(cfg, name), low=low, optional=True)
    _integer("top_k", cfg.top_k, low=0, optional=True)
    for name in ("do_sample", "renormalize_logits", "output_scores", "output_logits", "return_dict_in_generate",
                 "use_cache"):
        if not isinstance(getattr(cfg, name), bool):
            raise GenerationConfigError(f"{name} must be True or False, got {getattr(cfg, name)!r}")
    ranges = {  # name: (low, high, low inclusive, high inclusive)
        "temperature": (0.0, None, True, False), "top_p": (0.0, 1.0, True, True), "min_p": (0.0, 1.0, True, True),
        "typical_p": (0.0, 1.0, False, True), "epsilon_cutoff": (0.0, 1.0, True, False),
        "eta_cutoff": (0.0, 1.0, True, False), "repetition_penalty": (0.0, None, False, False),
        "diversity_penalty": (0.0, None, True, False), "length_penalty": (None, None, True, True),
        "penalty_alpha": (0.0, 1.0, True, True), "max_time": (0.0, None, False, False),
        "assistant_confidence_threshold": (0.0, 1.0, True, True),
    }
    for name, (low, high, low_in, high_in) in ranges.items():
        _real(name, getattr(cfg, name), low, high, low_in, high_in)
    for name in ("pad_token_id", "bos_token_id", "forced_bos_token_id"):
        _token(name, getattr(cfg, name), vocab_size, optional=True)
    for name in ("eos_token_id", "forced_eos_token_id"):
        value = getattr(cfg, name)
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            _token(name, item, vocab_size, optional=not isinstance(value, (list, tuple)))
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        value = getattr(cfg, name)
        if value is not None:
            if not isinstance(value, (list, tuple)):
                raise GenerationConfigError(f"{name} must be a list of token ids, got {value!r}")
            for item in value:
                _token(name, item, vocab_size)
    if cfg.bad_words_ids is not None:
        if not isinstance(cfg.bad_words_ids, (list, tuple)) or not cfg.bad_words_ids or not all(
                isinstance(seq, (list, tuple)) and seq for seq in cfg.bad_words_ids):
            raise GenerationConfigError(
                f"bad_words_ids must be a list of non-empty lists of token ids, got {cfg.bad_words_ids!r}")
        for seq in cfg.bad_words_ids:
            for item in seq:
                _token("bad_words_ids", item, vocab_size)
    decay = cfg.exponential_decay_length_penalty
    if decay is not None:
        if not isinstance(decay, (list, tuple)) or len(decay) != 2:
            raise GenerationConfigError(
                f"exponential_decay_length_penalty must be (start_index, decay_factor), got {decay!r}")
        _integer("exponential_decay_length_penalty start_index", decay[0], low=0)
        _real("exponential_decay_length_penalty decay_factor", decay[1], 0.0, None, False, False)
    stops = cfg.stop_strings
    if stops is not None:
        items = [stops] if isinstance(stops, str) else stops
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(x, str) and x for x in items):
            raise GenerationConfigError(f"stop_strings must be a non-empty string or list of them, got {stops!r}")


def _integer(name: str, value: Any, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GenerationConfigError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")


def _real(name: str, value: Any, low: float | None, high: float | None, low_in: bool, high_in: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GenerationConfigError(f"{name} must be a finite number, got {value!r}")
    bad_low = low is not None and (value < low or (value == low and not low_in))
    bad_high = high is not None and (value > high or (value == high and not high_in))
    if bad_low or bad_high:
        lo = "(-inf" if low is None else ("[" if low_in else "(") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + ("]" if high_in else ")")
        raise GenerationConfigError(f"{name} must be in {lo}, {hi}, got {value!r}")


def _token(name: str, value: Any, vocab_size: int | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (vocab_size and value >= vocab_size):
        limit = f"outside the vocabulary [0, {vocab_size})" if vocab_size else "that are not ids >= 0"
        raise GenerationConfigError(f"{name} holds token ids {limit}: {value!r}")
