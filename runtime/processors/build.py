"""The list of processors a generation config asks for, in transformers' order (processors, then warpers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgelm.runtime.processors.base import LogitsProcessorList
from edgelm.runtime.processors.constraints import (
    ExponentialDecayLengthPenalty, ForcedBOSTokenLogitsProcessor, ForcedEOSTokenLogitsProcessor,
    LogitNormalization, MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor, SuppressTokensLogitsProcessor,
)
from edgelm.runtime.processors.warpers import (
    EpsilonLogitsWarper, EtaLogitsWarper, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper, TypicalLogitsWarper,
)

if TYPE_CHECKING:
    from edgelm.runtime.config import GenerationConfig


def build_processors(cfg: GenerationConfig, prompt_length: int, vocab_size: int | None = None) -> LogitsProcessorList:
    """The processors (then warpers) a config asks for, in transformers' order."""
    eos = cfg.eos_ids
    procs = LogitsProcessorList()
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size is not None and cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids is not None:
        procs.append(NoBadWordsLogitsProcessor(cfg.bad_words_ids, eos, vocab_size))
    if cfg.min_length is not None and eos and cfg.min_length > 0:
        procs.append(MinLengthLogitsProcessor(cfg.min_length, eos))
    if cfg.min_new_tokens is not None and eos and cfg.min_new_tokens > 0:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_length, cfg.min_new_tokens, eos))
    if cfg.forced_bos_token_id is not None:
        procs.append(ForcedBOSTokenLogitsProcessor(cfg.forced_bos_token_id))
    if cfg.forced_eos_token_id is not None:
        forced = cfg.forced_eos_token_id
        procs.append(ForcedEOSTokenLogitsProcessor(cfg.max_length, forced if isinstance(forced, list) else [forced]))
    if cfg.exponential_decay_length_penalty is not None:
        procs.append(ExponentialDecayLengthPenalty(cfg.exponential_decay_length_penalty, eos, prompt_length))
    if cfg.suppress_tokens is not None:
        procs.append(SuppressTokensLogitsProcessor(cfg.suppress_tokens))
    if cfg.begin_suppress_tokens is not None:
        begin = prompt_length if (prompt_length > 1 or cfg.forced_bos_token_id is None) else prompt_length + 1
        procs.append(SuppressTokensAtBeginLogitsProcessor(cfg.begin_suppress_tokens, begin))
    if cfg.do_sample:
        keep = (len(eos) + 1 if eos else 2) if cfg.num_beams > 1 else 1
        if cfg.temperature is not None and cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k is not None and cfg.top_k != 0:
            procs.append(TopKLogitsWarper(cfg.top_k, keep))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p, keep))
        if cfg.min_p is not None:
            procs.append(MinPLogitsWarper(cfg.min_p, keep))
        if cfg.typical_p is not None and cfg.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(cfg.typical_p, keep))
        if cfg.epsilon_cutoff is not None and 0.0 < cfg.epsilon_cutoff < 1.0:
            procs.append(EpsilonLogitsWarper(cfg.epsilon_cutoff, keep))
        if cfg.eta_cutoff is not None and 0.0 < cfg.eta_cutoff < 1.0:
            procs.append(EtaLogitsWarper(cfg.eta_cutoff, keep))
    if cfg.renormalize_logits is True:
        procs.append(LogitNormalization())
    return procs
