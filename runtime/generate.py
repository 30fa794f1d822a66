"""``generate``: check inputs, settle the config, pick the strategy by transformers' rules, run it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelm.runtime import modes
from edgelm.runtime.config import GenerationConfig
from edgelm.runtime.errors import GenerationConfigError, InputError, UnsupportedError
from edgelm.runtime.processors import build_processors
from edgelm.runtime.state import DecodeState
from edgelm.runtime.stopping import build_stopping


@dataclass
class GenerateOutput:
    """What ``return_dict_in_generate=True`` returns (transformers' field names)."""

    sequences: np.ndarray
    scores: tuple[np.ndarray, ...] | None = None
    logits: tuple[np.ndarray, ...] | None = None
    sequences_scores: np.ndarray | None = None
    beam_indices: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def check_input_ids(input_ids: Any, vocab_size: int) -> np.ndarray:
    """Token ids as a (batch, length) int64 array, or an InputError that says what is wrong."""
    if input_ids is None:
        raise InputError("input_ids is required: a (batch, length) array of token ids")
    try:
        arr = np.asarray(input_ids)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"input_ids must be a rectangular (batch, length) array of ints: {exc}") from None
    if arr.dtype == object or arr.dtype.kind not in "iu":
        if arr.dtype.kind == "b" or arr.size == 0 and arr.dtype.kind == "f":
            raise InputError(f"input_ids must hold integer token ids, got dtype {arr.dtype}")
        if arr.dtype.kind == "f" and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            raise InputError(f"input_ids must hold integer token ids, got dtype {arr.dtype}; cast with .astype(np.int64)")
        raise InputError(f"input_ids must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"input_ids must have shape (batch, length), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"input_ids is empty (shape {arr.shape}); give at least one token per row")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"input_ids holds ids outside the vocabulary [0, {vocab_size}): min {lo}, max {hi}")
    return arr.astype(np.int64, copy=False)


def check_attention_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    try:
        arr = np.asarray(mask)
    except Exception as exc:
        raise InputError(f"attention_mask must be a (batch, length) array of 0 and 1: {exc}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.shape != shape:
        raise InputError(f"attention_mask has shape {arr.shape} but input_ids has shape {shape}")
    if arr.dtype.kind not in "iub" or not np.isin(arr, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 and 1")
    if (arr.sum(axis=1) == 0).any():
        raise InputError("attention_mask masks every token of a row; each row needs at least one real token")
    return arr.astype(np.int64)


def default_attention_mask(input_ids: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """transformers' rule: mask the pad token when it can be told apart from EOS, else attend to all."""
    pad = cfg.pad_token_id
    if pad is not None and (input_ids == pad).any() and pad not in cfg.eos_ids:
        mask = (input_ids != pad).astype(np.int64)
        if (mask.sum(axis=1) > 0).all():
            return mask
    return np.ones_like(input_ids)


def prepare_config(base: GenerationConfig, generation_config: GenerationConfig | None, prompt_length: int,
                   max_positions: int | None, kwargs: dict[str, Any], vocab_size: int | None = None) -> GenerationConfig:
    cfg = (generation_config or base).updated(**kwargs)
    cfg.validate(vocab_size)
    if cfg.pad_token_id is None and cfg.eos_ids:
        cfg.pad_token_id = cfg.eos_ids[0]
    user_set_max_length = "max_length" in kwargs or (generation_config is not None and generation_config.max_new_tokens is None)
    if cfg.max_new_tokens is not None:
        if "max_length" in kwargs and kwargs["max_length"] is not None:
            warnings.warn("both max_new_tokens and max_length are set; max_new_tokens takes precedence", UserWarning,
                          stacklevel=3)
        cfg.max_length = cfg.max_new_tokens + prompt_length
    elif not user_set_max_length and prompt_length >= cfg.max_length:
        warnings.warn(f"input length {prompt_length} is not below max_length {cfg.max_length}: one token will be "
                      "generated; set max_new_tokens to control the output length", UserWarning, stacklevel=3)
    if cfg.min_new_tokens is not None and cfg.min_new_tokens > 0 and cfg.max_length - prompt_length < cfg.min_new_tokens:
        raise GenerationConfigError(
            f"min_new_tokens ({cfg.min_new_tokens}) exceeds the tokens max_length allows ({cfg.max_length - prompt_length})")
    if max_positions:
        if prompt_length >= max_positions:
            raise InputError(
                f"the prompt has {prompt_length} tokens but the model's context is {max_positions} positions; "
                "shorten the prompt")
        if cfg.max_length > max_positions:
            warnings.warn(f"max_length {cfg.max_length} exceeds the model's {max_positions} positions; generation stops "
                          f"at {max_positions} tokens", UserWarning, stacklevel=3)
            cfg.max_length = max_positions
    return cfg


def check_past(past_key_values: Any, ids: np.ndarray, mask: np.ndarray, mode: str) -> None:
    """A kept cache must hold a strict prefix of one unpadded row's prompt, for a strategy that can start from it."""
    if past_key_values is None:
        return
    if ids.shape[0] != 1 or past_key_values.batch != 1 or not mask.all():
        raise InputError("past_key_values (a kept cache) works with one unpadded prompt (batch 1)")
    if past_key_values.length >= ids.shape[1]:
        raise InputError(f"the kept cache holds {past_key_values.length} tokens but the prompt has {ids.shape[1]}: at "
                         "least the last prompt token must be new (crop the cache first)")
    if mode == modes.CONTRASTIVE_SEARCH:
        raise UnsupportedError("contrastive search needs the hidden states of the whole context, which a kept cache "
                               "does not have; run it without past_key_values")


def generate(lm: Any, input_ids: Any = None, attention_mask: Any = None, generation_config: GenerationConfig | None = None,
             streamer: Any = None, seed: int | None = None, generator: np.random.Generator | None = None,
             assistant_model: Any = None, past_key_values: Any = None, stopping_criteria: Any = None,
             **kwargs: Any) -> np.ndarray | GenerateOutput:
    """transformers' ``generate``. ``past_key_values``: a cache (from ``lm.decoder.new_cache(1)``) holding the first
    ``past_key_values.length`` prompt tokens, as transformers takes one: only the rest is prefilled, and the cache
    is updated in place (``Conversation`` keeps one between turns). ``stopping_criteria``: extra callables
    ``(input_ids, scores) -> bool or (batch,) bools`` checked after every token with the built-in ones, as
    transformers' argument of that name (e.g. a user pressing Stop)."""
    if lm.decoder.token_ids is not None:
        raise GenerationConfigError(
            f"{lm.model_dir} is a draft (`edgelm draft`): its logits cover {len(lm.decoder.token_ids)} of "
            f"{lm.vocab_size} tokens, so it cannot generate on its own; pass it as assistant_model= to a full model")
    ids = check_input_ids(input_ids, lm.vocab_size)
    cfg = prepare_config(lm.generation_config, generation_config, ids.shape[1], lm.max_positions, kwargs, lm.vocab_size)
    mask = (check_attention_mask(attention_mask, ids.shape) if attention_mask is not None
            else default_attention_mask(ids, cfg))
    mode = cfg.generation_mode(assistant_model)
    check_past(past_key_values, ids, mask, mode)
    if lm.decoder.static and mode not in (modes.GREEDY, modes.SAMPLE, modes.ASSISTED):
        raise UnsupportedError(
            f"{mode} needs a cache that changes batch size, which a static-shape export cannot; use greedy or sampling "
            "with this model, or the dynamic export for this strategy")
    if streamer is not None and (cfg.num_beams > 1 or ids.shape[0] * cfg.num_return_sequences > 1):
        raise GenerationConfigError("streaming works with a single sequence (batch 1, num_beams=1, num_return_sequences=1)")
    if generator is not None and seed is not None:
        raise GenerationConfigError("pass either seed or generator, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise GenerationConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise GenerationConfigError(f"generator must be a numpy.random.Generator, got {type(generator).__name__}")
    rng = generator if generator is not None else np.random.default_rng(seed)
    if mode in (modes.GREEDY, modes.SAMPLE) and cfg.num_return_sequences > 1:
        ids = np.repeat(ids, cfg.num_return_sequences, axis=0)
        mask = np.repeat(mask, cfg.num_return_sequences, axis=0)
    processors = build_processors(cfg, ids.shape[1], lm.vocab_size)
    stopping = build_stopping(cfg, ids.shape[1], lm.tokenizer)
    for crit in stopping_criteria or ():
        if not callable(crit):
            raise GenerationConfigError(f"stopping_criteria holds {crit!r}, which is not callable (input_ids, scores)")
        stopping.append(crit)

    if mode in (modes.BEAM_SEARCH, modes.BEAM_SAMPLE, modes.GROUP_BEAM_SEARCH):
        from edgelm.runtime.strategies import beam_search, group_beam_search

        state = DecodeState(lm.decoder, np.repeat(ids, cfg.num_beams, axis=0), np.repeat(mask, cfg.num_beams, axis=0),
                            cfg.max_length, cfg.output_scores, cfg.output_logits, cache=past_key_values)
        if mode == modes.GROUP_BEAM_SEARCH:
            result = group_beam_search.run(state, cfg, processors, stopping, ids.shape[0])
        else:
            result = beam_search.run(state, cfg, processors, stopping, rng, ids.shape[0])
        if not cfg.return_dict_in_generate:
            return result["sequences"]
        return GenerateOutput(
            sequences=result["sequences"],
            sequences_scores=result["sequences_scores"] if cfg.output_scores else None,
            scores=tuple(state.scores) if cfg.output_scores else None,
            logits=tuple(state.raw_logits) if cfg.output_logits else None,
            beam_indices=result["beam_indices"],
        )

    want_hidden = mode == modes.CONTRASTIVE_SEARCH
    if want_hidden and not lm.decoder.has_hidden:
        raise UnsupportedError(
            "contrastive search needs the model's last_hidden_state output, which this graph lacks (an optimum "
            "export?); re-export the model with `edgelm export`")
    state = DecodeState(lm.decoder, ids, mask, cfg.max_length, cfg.output_scores, cfg.output_logits, want_hidden,
                        cache=past_key_values)
    if mode == modes.ASSISTED:
        from edgelm.runtime.strategies import assisted

        candidates = _candidates(lm, assistant_model, cfg)
        stats = _streamed(streamer, ids, lambda: assisted.run(state, cfg, processors, stopping, candidates, streamer,
                                                                 rng))
        lm.last_assisted_stats = stats
    elif mode == modes.CONTRASTIVE_SEARCH:
        from edgelm.runtime.strategies import contrastive

        _streamed(streamer, ids, lambda: contrastive.run(state, cfg, processors, stopping, streamer))
    else:
        from edgelm.runtime.strategies import sampling

        # Processors that only ban tokens are asked about the argmax alone (``DecodeState.greedy_next``).
        argmax_only = (mode == modes.GREEDY and (not processors or (lm.decoder.columns and processors.bans_only))
                       and not stopping_criteria
                       and not cfg.output_scores and not cfg.output_logits)
        _streamed(streamer, ids, lambda: sampling.run(state, cfg, processors, stopping, rng, streamer, argmax_only))
    out = _finish(state, cfg)
    if mode == modes.ASSISTED and isinstance(out, GenerateOutput):
        out.extras["assisted"] = stats
    return out


def _streamed(streamer: Any, prompt: np.ndarray, body: Any) -> Any:
    """Run a strategy with the streamer fed the prompt first and closed whatever happens."""
    if streamer is None:
        return body()
    streamer.put(prompt)
    try:
        return body()
    finally:
        streamer.end()


def _candidates(lm: Any, assistant_model: Any, cfg: GenerationConfig) -> Any:
    from edgelm.runtime.strategies import assisted

    if assistant_model is not None and cfg.prompt_lookup_num_tokens is not None:
        raise GenerationConfigError("pass either assistant_model or prompt_lookup_num_tokens, not both")
    if assistant_model is not None:
        assisted.check_assistant(lm, assistant_model)
        return assisted.DraftModelCandidates(assistant_model, cfg)
    if cfg.prompt_lookup_num_tokens < 1:
        raise GenerationConfigError(f"prompt_lookup_num_tokens must be >= 1, got {cfg.prompt_lookup_num_tokens}")
    return assisted.PromptLookupCandidates(cfg.prompt_lookup_num_tokens, cfg.max_matching_ngram_size, cfg.eos_ids,
                                           cfg.num_assistant_tokens_schedule)


def _finish(state: DecodeState, cfg: GenerationConfig) -> np.ndarray | GenerateOutput:
    seqs = state.input_ids.copy()
    if not cfg.return_dict_in_generate:
        return seqs
    return GenerateOutput(
        sequences=seqs,
        scores=tuple(state.scores) if cfg.output_scores else None,
        logits=tuple(state.raw_logits) if cfg.output_logits else None,
    )
