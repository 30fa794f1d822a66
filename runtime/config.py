"""Generation settings: transformers' ``GenerationConfig`` names, defaults, checks and mode rules.

Defaults come from the model folder's ``generation_config.json`` and are then updated by
the caller's keyword arguments, as ``generate`` does in transformers. Unknown names are an
error (a typo must not be silently ignored); settings that only some modes use give the
same warnings transformers gives; contradictions are errors.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgelm.runtime.errors import GenerationConfigError

GREEDY = "greedy_search"
SAMPLE = "sample"
BEAM_SEARCH = "beam_search"
BEAM_SAMPLE = "beam_sample"
GROUP_BEAM_SEARCH = "group_beam_search"
CONTRASTIVE_SEARCH = "contrastive_search"
ASSISTED = "assisted_generation"


@dataclass
class GenerationConfig:
    # length
    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    early_stopping: bool | str = False
    max_time: float | None = None
    stop_strings: str | list[str] | None = None
    # strategy
    do_sample: bool = False
    num_beams: int = 1
    num_beam_groups: int = 1
    penalty_alpha: float | None = None
    # logits manipulation
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    diversity_penalty: float = 0.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] | None = None
    renormalize_logits: bool = False
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    # outputs
    num_return_sequences: int = 1
    output_scores: bool = False
    output_logits: bool = False
    return_dict_in_generate: bool = False
    # special tokens
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # assisted decoding
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float | None = 0.4
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    use_cache: bool = True
    # anything transformers stores in the file that does not change decoding here
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls) if f.name != "extra"}

    @classmethod
    def from_model_dir(cls, model_dir: Path, eos_token_id: list[int] | None = None,
                       pad_token_id: int | None = None, bos_token_id: int | None = None) -> "GenerationConfig":
        cfg = cls(eos_token_id=eos_token_id or None, pad_token_id=pad_token_id, bos_token_id=bos_token_id)
        path = Path(model_dir) / "generation_config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                raise GenerationConfigError(f"{path} is not valid JSON: {exc}") from exc
            names = cls.field_names()
            for key, value in data.items():
                if key in names:
                    setattr(cfg, key, value)
                else:
                    cfg.extra[key] = value
        return cfg

    def updated(self, **kwargs: Any) -> "GenerationConfig":
        """A copy with ``kwargs`` applied; an unknown name is an error naming it."""
        new = copy.deepcopy(self)
        names = self.field_names()
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise GenerationConfigError(
                f"unknown generation setting(s): {', '.join(unknown)}; see GenerationConfig for the supported names"
            )
        for key, value in kwargs.items():
            setattr(new, key, value)
        return new

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def generation_mode(self, assistant_model: Any = None) -> str:
        """transformers' ``get_generation_mode`` rules."""
        if self.num_beams == 1:
            if self.do_sample is False:
                if self.top_k is not None and self.top_k > 1 and self.penalty_alpha is not None and self.penalty_alpha > 0:
                    mode = CONTRASTIVE_SEARCH
                else:
                    mode = GREEDY
            else:
                mode = SAMPLE
        else:
            if self.num_beam_groups > 1:
                mode = GROUP_BEAM_SEARCH
            elif self.do_sample is True:
                mode = BEAM_SAMPLE
            else:
                mode = BEAM_SEARCH
        if assistant_model is not None or self.prompt_lookup_num_tokens is not None:
            if mode in (GREEDY, SAMPLE):
                mode = ASSISTED
            else:
                raise GenerationConfigError(
                    "assisted decoding (assistant_model or prompt_lookup_num_tokens) works only with greedy search "
                    f"or sampling, but the other settings select {mode}"
                )
        return mode

    def check_types(self, vocab_size: int | None = None) -> None:
        """Each setting's type and range, before any rule uses it: a NaN temperature or a token id past the
        vocabulary must be named here, not surface later as a numpy error or a silently wrong answer."""
        for name in ("max_length", "num_beams", "num_beam_groups", "num_return_sequences", "num_assistant_tokens"):
            _integer(name, getattr(self, name), low=1)
        for name, low in (("min_length", 0), ("no_repeat_ngram_size", 0)):
            _integer(name, getattr(self, name), low=low)
        for name, low in (("max_new_tokens", 1), ("min_new_tokens", 0), ("prompt_lookup_num_tokens", 1),
                          ("max_matching_ngram_size", 1)):
            _integer(name, getattr(self, name), low=low, optional=True)
        _integer("top_k", self.top_k, low=0, optional=True)
        for name in ("do_sample", "renormalize_logits", "output_scores", "output_logits", "return_dict_in_generate",
                     "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise GenerationConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        ranges = {  # name: (low, high, low inclusive, high inclusive)
            "temperature": (0.0, None, True, False), "top_p": (0.0, 1.0, True, True), "min_p": (0.0, 1.0, True, True),
            "typical_p": (0.0, 1.0, False, True), "epsilon_cutoff": (0.0, 1.0, True, False),
            "eta_cutoff": (0.0, 1.0, True, False), "repetition_penalty": (0.0, None, False, False),
            "diversity_penalty": (0.0, None, True, False), "length_penalty": (None, None, True, True),
            "penalty_alpha": (0.0, 1.0, True, True), "max_time": (0.0, None, False, False),
            "assistant_confidence_threshold": (0.0, 1.0, True, True),
        }
        for name, (low, high, low_in, high_in) in ranges.items():
            _real(name, getattr(self, name), low, high, low_in, high_in)
        for name in ("pad_token_id", "bos_token_id", "forced_bos_token_id"):
            _token(name, getattr(self, name), vocab_size, optional=True)
        for name in ("eos_token_id", "forced_eos_token_id"):
            value = getattr(self, name)
            for item in (value if isinstance(value, (list, tuple)) else [value]):
                _token(name, item, vocab_size, optional=not isinstance(value, (list, tuple)))
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (list, tuple)):
                    raise GenerationConfigError(f"{name} must be a list of token ids, got {value!r}")
                for item in value:
                    _token(name, item, vocab_size)
        if self.bad_words_ids is not None:
            if not isinstance(self.bad_words_ids, (list, tuple)) or not self.bad_words_ids or not all(
                    isinstance(seq, (list, tuple)) and seq for seq in self.bad_words_ids):
                raise GenerationConfigError(
                    f"bad_words_ids must be a list of non-empty lists of token ids, got {self.bad_words_ids!r}")
            for seq in self.bad_words_ids:
                for item in seq:
                    _token("bad_words_ids", item, vocab_size)
        decay = self.exponential_decay_length_penalty
        if decay is not None:
            if not isinstance(decay, (list, tuple)) or len(decay) != 2:
                raise GenerationConfigError(
                    f"exponential_decay_length_penalty must be (start_index, decay_factor), got {decay!r}")
            _integer("exponential_decay_length_penalty start_index", decay[0], low=0)
            _real("exponential_decay_length_penalty decay_factor", decay[1], 0.0, None, False, False)
        stops = self.stop_strings
        if stops is not None:
            items = [stops] if isinstance(stops, str) else stops
            if not isinstance(items, (list, tuple)) or not items or not all(isinstance(x, str) and x for x in items):
                raise GenerationConfigError(f"stop_strings must be a non-empty string or list of them, got {stops!r}")

    def validate(self, vocab_size: int | None = None) -> None:
        """Errors for contradictions, warnings (as transformers gives) for settings the mode ignores."""
        self.check_types(vocab_size)

        def err(msg: str) -> None:
            raise GenerationConfigError(msg)

        for name in ("max_length", "num_beams", "num_beam_groups", "num_return_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                err(f"{name} must be a positive integer, got {value!r}")
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int)
                                                or self.max_new_tokens <= 0):
            err(f"max_new_tokens must be greater than 0, but is {self.max_new_tokens!r}")
        if self.early_stopping not in (True, False, "never"):
            err(f"early_stopping must be a boolean or 'never', but is {self.early_stopping!r}")
        if self.pad_token_id is not None and self.pad_token_id < 0:
            err(f"pad_token_id must be non-negative, got {self.pad_token_id}")
        if any(e < 0 for e in self.eos_ids):
            err(f"eos_token_id must be non-negative, got {self.eos_token_id}")
        if self.max_time is not None and not self.max_time > 0:
            err(f"max_time must be a positive number of seconds, got {self.max_time!r}")
        if not isinstance(self.do_sample, bool):
            err(f"do_sample must be True or False, got {self.do_sample!r}")
        if self.do_sample and self.temperature is not None and not (
                isinstance(self.temperature, (int, float)) and self.temperature > 0):
            err(f"temperature must be a strictly positive float with do_sample=True, got {self.temperature!r}; "
                "for greedy decoding set do_sample=False")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            err(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 <= self.top_p <= 1):
            err(f"top_p must be a float in [0, 1], got {self.top_p!r}")
        if self.num_assistant_tokens_schedule not in ("constant", "heuristic", "heuristic_transient"):
            err("num_assistant_tokens_schedule must be 'constant', 'heuristic' or 'heuristic_transient', "
                f"got {self.num_assistant_tokens_schedule!r}")
        minor: list[str] = []
        if self.do_sample is False:
            msg = ("`do_sample` is set to `False`. However, `{0}` is set to `{1}` -- this flag is only used in "
                   "sample-based generation modes. You should set `do_sample=True` or unset `{0}`.")
            for name, default in (("temperature", 1.0), ("top_p", 1.0), ("typical_p", 1.0),
                                  ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0)):
                value = getattr(self, name)
                if value is not None and value != default:
                    minor.append(msg.format(name, value))
            if self.min_p is not None:
                minor.append(msg.format("min_p", self.min_p))
            if self.top_k is not None and self.top_k != 50 and self.penalty_alpha is None:
                minor.append(msg.format("top_k", self.top_k))
        if self.num_beams == 1:
            msg = ("`num_beams` is set to 1. However, `{0}` is set to `{1}` -- this flag is only used in beam-based "
                   "generation modes. You should set `num_beams>1` or unset `{0}`.")
            if self.early_stopping is not False:
                minor.append(msg.format("early_stopping", self.early_stopping))
            if self.num_beam_groups != 1:
                minor.append(msg.format("num_beam_groups", self.num_beam_groups))
            if self.diversity_penalty is not None and self.diversity_penalty != 0.0:
                minor.append(msg.format("diversity_penalty", self.diversity_penalty))
            if self.length_penalty is not None and self.length_penalty != 1.0:
                minor.append(msg.format("length_penalty", self.length_penalty))
        else:
            if self.diversity_penalty != 0.0 or self.num_beam_groups != 1:
                prefix = "`diversity_penalty` is not 0.0 or `num_beam_groups` is not 1, triggering group beam search. In this generation mode, "
                if self.do_sample is True:
                    err(prefix + "`do_sample` must be set to `False`")
                if self.num_beams % self.num_beam_groups != 0:
                    err(prefix + f"`num_beams` ({self.num_beams}) should be divisible by `num_beam_groups` ({self.num_beam_groups})")
                if self.diversity_penalty == 0.0:
                    err(prefix + "`diversity_penalty` should be greater than `0.0`, otherwise your groups will be identical.")
                if self.num_beam_groups > self.num_beams:
                    err(f"num_beam_groups ({self.num_beam_groups}) cannot exceed num_beams ({self.num_beams})")
        if self.num_return_sequences != 1:
            if self.num_beams == 1:
                if self.do_sample is False:
                    err("Greedy methods without beam search do not support `num_return_sequences` different than 1 "
                        f"(got {self.num_return_sequences}); use do_sample=True or num_beams>1")
            elif self.num_return_sequences > self.num_beams:
                err(f"num_return_sequences ({self.num_return_sequences}) has to be smaller or equal to num_beams ({self.num_beams})")
        if self.penalty_alpha is not None and self.penalty_alpha > 0 and self.do_sample:
            err("penalty_alpha selects contrastive search, which is deterministic: it cannot be combined with "
                "do_sample=True; unset penalty_alpha to sample, or set do_sample=False")
        if self.diversity_penalty not in (None, 0.0) and self.num_beam_groups == 1:
            err(f"diversity_penalty ({self.diversity_penalty}) works only in group beam search: set num_beam_groups>1 "
                "(and num_beams divisible by it), or unset diversity_penalty")
        if self.return_dict_in_generate is not True:
            for flag in ("output_scores", "output_logits"):
                if getattr(self, flag) is True:
                    minor.append(f"`return_dict_in_generate` is NOT set to `True`, but `{flag}` is. When "
                                 f"`return_dict_in_generate` is not `True`, `{flag}` is ignored.")
        for msg in minor:
            warnings.warn(msg, UserWarning, stacklevel=3)


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
