"""Generation settings: transformers' ``GenerationConfig`` names and defaults.

Defaults come from the model folder's ``generation_config.json`` and are then updated by
the caller's keyword arguments, as ``generate`` does in transformers. Unknown names are an
error (a typo must not be silently ignored). What the values may be is ``checks``; which
strategy they select and how they may combine is ``modes``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgelm.runtime import checks, modes
from edgelm.runtime.errors import GenerationConfigError

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
        """The strategy these settings select (``modes.generation_mode``)."""
        return modes.generation_mode(self, assistant_model)

    def check_types(self, vocab_size: int | None = None) -> None:
        """Every setting's type and range (``checks.check_types``)."""
        checks.check_types(self, vocab_size)

    def validate(self, vocab_size: int | None = None) -> None:
        """Types and ranges first, then the rules between settings (``modes.check_rules``)."""
        checks.check_types(self, vocab_size)
        modes.check_rules(self)
