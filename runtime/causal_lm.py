"""``CausalLM``: a loaded causal LM folder with transformers-style ``generate``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgelm.runtime.config import GenerationConfig
from edgelm.runtime.decoder import Decoder, StaticDecoder
from edgelm.runtime.errors import InputError, ModelLoadError
from edgelm.runtime.generate import GenerateOutput, generate
from edgelm.runtime.manifest import Manifest, read_manifest, resolve_model_file
from edgelm.runtime.session import ProviderSpec
from edgelm.runtime.tokenizer import Tokenizer

if TYPE_CHECKING:
    from edgelm.runtime.conversation import Conversation


class CausalLM:
    """A loaded model. One instance serves several threads at once: ``generate`` keeps its state
    per call (the session is thread-safe and each call binds its own inputs and cache), and the
    only per-call result kept on the object, ``last_assisted_stats``, is per thread."""

    def __init__(self, model_dir: Path, manifest: Manifest, decoder: Decoder, tokenizer: Tokenizer,
                 generation_config: GenerationConfig):
        self.model_dir = model_dir
        self.manifest = manifest
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self._local = threading.local()

    @property
    def last_assisted_stats(self) -> dict | None:
        """Acceptance counts of this thread's last assisted/prompt-lookup ``generate`` (None before one)."""
        return getattr(self._local, "assisted_stats", None)

    @last_assisted_stats.setter
    def last_assisted_stats(self, stats: dict | None) -> None:
        self._local.assisted_stats = stats

    @classmethod
    def load(cls, model_dir: str | Path, provider: ProviderSpec = "cpu", threads: int | None = None,
             optimization: str = "all", model_file: str | None = None,
             load_cache: bool | str | None = None, stable_rows: bool = False) -> "CausalLM":
        """Load a folder made by ``edgelm export`` (or ``optimum-cli export onnx``).

        ``model_file`` picks another graph file of the folder, e.g. ``"model.ort"`` written by
        ``edgelm export --mobile``; by default the manifest's ``model.onnx``. ``load_cache``: keep
        onnxruntime's prepacked graph on this device so later loads skip that work (see
        ``runtime.load_cache``; default ``$EDGELM_LOAD_CACHE``, on): True writes a missing entry from a
        background process after a plain load, ``"sync"`` during this load, False never.

        ``stable_rows``: every pass of a single sequence holds two tokens or more (a decode step feeds its
        token twice), so that a token's logits are the same bit for bit whether its pass reads it alone
        or among others. On graphs with int8 activations (quantized exports) that is what makes assisted
        decoding and prompt lookup give exactly this model's greedy tokens (and a conversation's cached
        turns exactly a whole-history pass's); it costs one more row per decode step. Float32 graphs
        differ only in last bits without it. Static-shape exports feed one token per pass, always alike.
        """
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        if manifest.task != "causal-lm":
            raise ModelLoadError(f"{model_dir} holds a {manifest.task} model; load it with MaskedLM.load")
        tokenizer = Tokenizer.load(model_dir)
        tokenizer.check_belongs_to(manifest.vocab_size, model_dir)
        model_file = resolve_model_file(model_dir, manifest, model_file)
        make = StaticDecoder if manifest.static_max_length else Decoder
        decoder = make(model_dir, manifest, provider, threads, optimization, model_file, load_cache,
                       stable_rows=stable_rows)
        gen = GenerationConfig.from_model_dir(model_dir, manifest.eos_token_id, manifest.pad_token_id, manifest.bos_token_id)
        return cls(model_dir, manifest, decoder, tokenizer, gen)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size or self.tokenizer.vocab_size

    @property
    def max_positions(self) -> int | None:
        limits = [n for n in (self.manifest.max_position_embeddings, self.manifest.static_max_length) if n]
        return min(limits) if limits else None

    def generate(self, input_ids: Any = None, attention_mask: Any = None, generation_config: GenerationConfig | None = None,
                 streamer: Any = None, **kwargs: Any) -> np.ndarray | GenerateOutput:
        """transformers' ``generate`` on numpy: returns (batch * num_return_sequences, length) ids, prompt included."""
        return generate(self, input_ids, attention_mask, generation_config, streamer, **kwargs)

    def conversation(self, system: str | None = None, context_policy: str = "error") -> "Conversation":
        """A chat that keeps its KV cache between turns (see ``Conversation``): ``conv.send(text, **generate_kwargs)``.

        ``context_policy``: "error" (default) refuses a history past the model's context and says what to do;
        "drop_oldest" drops whole early turns (the system message stays) and re-primes the cache.
        """
        from edgelm.runtime.conversation import Conversation

        return Conversation(self, system=system, context_policy=context_policy)

    def encode_prompts(self, prompts: str | Sequence[str] | list[dict], chat: bool = False) -> dict[str, np.ndarray]:
        if isinstance(prompts, list) and prompts and isinstance(prompts[0], dict):
            chat, prompts = True, [prompts]
        if isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        if not prompts:
            raise InputError("give at least one prompt")
        if chat:
            rows = []
            for p in prompts:
                messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
                rows.append(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
            return self.tokenizer.pad(rows, "left")
        return self.tokenizer(list(prompts), padding_side="left")

    def generate_text(self, prompts: str | Sequence[str] | list[dict], chat: bool = False,
                      skip_special_tokens: bool = True, **kwargs: Any) -> str | list[str]:
        """Text in, generated text out (prompt excluded). A string gives a string, a list a list."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        enc = self.encode_prompts(prompts, chat)
        out = self.generate(enc["input_ids"], enc["attention_mask"], **kwargs)
        seqs = out.sequences if isinstance(out, GenerateOutput) else out
        texts = self.tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=skip_special_tokens)
        return texts[0] if single and len(texts) == 1 else texts

