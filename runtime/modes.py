"""Which decoding strategy a set of generation settings selects, and the rules between settings.

transformers' ``get_generation_mode`` and the contradictions and ignored-setting warnings of its
``GenerationConfig.validate``, with its messages, so that a script moved from transformers fails
or warns the same way.
"""

from __future__ import annotations

import warnings
from typing import Any

from edgelm.runtime.errors import GenerationConfigError

DRAFT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")
"""transformers' values of num_assistant_tokens_schedule: the one list the checks, the CLI and the drafts read."""

GREEDY = "greedy_search"
SAMPLE = "sample"
BEAM_SEARCH = "beam_search"
BEAM_SAMPLE = "beam_sample"
GROUP_BEAM_SEARCH = "group_beam_search"
CONTRASTIVE_SEARCH = "contrastive_search"
ASSISTED = "assisted_generation"


def generation_mode(cfg: Any, assistant_model: Any = None) -> str:
    """transformers' ``get_generation_mode`` rules."""
    if cfg.num_beams == 1:
        if cfg.do_sample is False:
            if cfg.top_k is not None and cfg.top_k > 1 and cfg.penalty_alpha is not None and cfg.penalty_alpha > 0:
                mode = CONTRASTIVE_SEARCH
            else:
                mode = GREEDY
        else:
            mode = SAMPLE
    else:
        if cfg.num_beam_groups > 1:
            mode = GROUP_BEAM_SEARCH
        elif cfg.do_sample is True:
            mode = BEAM_SAMPLE
        else:
            mode = BEAM_SEARCH
    if assistant_model is not None or cfg.prompt_lookup_num_tokens is not None:
        if mode in (GREEDY, SAMPLE):
            mode = ASSISTED
        else:
            raise GenerationConfigError(
                "assisted decoding (assistant_model or prompt_lookup_num_tokens) works only with greedy search "
                f"or sampling, but the other settings select {mode}"
            )
    return mode


def check_rules(cfg: Any) -> None:
    """Errors for contradictions, warnings (as transformers gives) for settings the mode ignores.

    Expects settings that passed ``checks.check_types`` (each value of the right type and range).
    """
    def err(msg: str) -> None:
        raise GenerationConfigError(msg)

    if cfg.early_stopping not in (True, False, "never"):
        err(f"early_stopping must be a boolean or 'never', but is {cfg.early_stopping!r}")
    if cfg.do_sample and cfg.temperature is not None and not (
            isinstance(cfg.temperature, (int, float)) and cfg.temperature > 0):
        err(f"temperature must be a strictly positive float with do_sample=True, got {cfg.temperature!r}; "
            "for greedy decoding set do_sample=False")
    if cfg.num_assistant_tokens_schedule not in DRAFT_SCHEDULES:
        err("num_assistant_tokens_schedule must be 'constant', 'heuristic' or 'heuristic_transient', "
            f"got {cfg.num_assistant_tokens_schedule!r}")
    minor: list[str] = []
    if cfg.do_sample is False:
        msg = ("`do_sample` is set to `False`. However, `{0}` is set to `{1}` -- this flag is only used in "
               "sample-based generation modes. You should set `do_sample=True` or unset `{0}`.")
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("typical_p", 1.0),
                              ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0)):
            value = getattr(cfg, name)
            if value is not None and value != default:
                minor.append(msg.format(name, value))
        if cfg.min_p is not None:
            minor.append(msg.format("min_p", cfg.min_p))
        if cfg.top_k is not None and cfg.top_k != 50 and cfg.penalty_alpha is None:
            minor.append(msg.format("top_k", cfg.top_k))
    if cfg.num_beams == 1:
        msg = ("`num_beams` is set to 1. However, `{0}` is set to `{1}` -- this flag is only used in beam-based "
               "generation modes. You should set `num_beams>1` or unset `{0}`.")
        if cfg.early_stopping is not False:
            minor.append(msg.format("early_stopping", cfg.early_stopping))
        if cfg.num_beam_groups != 1:
            minor.append(msg.format("num_beam_groups", cfg.num_beam_groups))
        if cfg.diversity_penalty is not None and cfg.diversity_penalty != 0.0:
            minor.append(msg.format("diversity_penalty", cfg.diversity_penalty))
        if cfg.length_penalty is not None and cfg.length_penalty != 1.0:
            minor.append(msg.format("length_penalty", cfg.length_penalty))
    else:
        if cfg.diversity_penalty != 0.0 or cfg.num_beam_groups != 1:
            prefix = "`diversity_penalty` is not 0.0 or `num_beam_groups` is not 1, triggering group beam search. In this generation mode, "
            if cfg.do_sample is True:
                err(prefix + "`do_sample` must be set to `False`")
            if cfg.num_beams % cfg.num_beam_groups != 0:
                err(prefix + f"`num_beams` ({cfg.num_beams}) should be divisible by `num_beam_groups` ({cfg.num_beam_groups})")
            if cfg.diversity_penalty == 0.0:
                err(prefix + "`diversity_penalty` should be greater than `0.0`, otherwise your groups will be identical.")
            if cfg.num_beam_groups > cfg.num_beams:
                err(f"num_beam_groups ({cfg.num_beam_groups}) cannot exceed num_beams ({cfg.num_beams})")
    if cfg.num_return_sequences != 1:
        if cfg.num_beams == 1:
            if cfg.do_sample is False:
                err("Greedy methods without beam search do not support `num_return_sequences` different than 1 "
                    f"(got {cfg.num_return_sequences}); use do_sample=True or num_beams>1")
        elif cfg.num_return_sequences > cfg.num_beams:
            err(f"num_return_sequences ({cfg.num_return_sequences}) has to be smaller or equal to num_beams ({cfg.num_beams})")
    if cfg.penalty_alpha is not None and cfg.penalty_alpha > 0 and cfg.do_sample:
        err("penalty_alpha selects contrastive search, which is deterministic: it cannot be combined with "
            "do_sample=True; unset penalty_alpha to sample, or set do_sample=False")
    if cfg.diversity_penalty not in (None, 0.0) and cfg.num_beam_groups == 1:
        err(f"diversity_penalty ({cfg.diversity_penalty}) works only in group beam search: set num_beam_groups>1 "
            "(and num_beams divisible by it), or unset diversity_penalty")
    if cfg.return_dict_in_generate is not True:
        for flag in ("output_scores", "output_logits"):
            if getattr(cfg, flag) is True:
                minor.append(f"`return_dict_in_generate` is NOT set to `True`, but `{flag}` is. When "
                             f"`return_dict_in_generate` is not `True`, `{flag}` is ignored.")
    for msg in minor:
        warnings.warn(msg, UserWarning, stacklevel=3)
