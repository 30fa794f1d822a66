"""``MaskedLM``: fill-mask with the keys and ordering of transformers' fill-mask pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgelm.runtime.errors import InputError, ModelLoadError
from edgelm.runtime.manifest import Manifest, read_manifest, resolve_model_file
from edgelm.runtime.processors import softmax
from edgelm.runtime.session import ProviderSpec, create_session
from edgelm.runtime.tokenizer import Tokenizer


class MaskedLM:
    def __init__(self, model_dir: Path, manifest: Manifest, session: Any, tokenizer: Tokenizer):
        self.model_dir = model_dir
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.input_names = [i.name for i in session.get_inputs()]
        if tokenizer.mask_token_id is None:
            raise ModelLoadError(f"the tokenizer in {model_dir} has no mask token; it is not a masked LM tokenizer")

    @classmethod
    def load(cls, model_dir: str | Path, provider: ProviderSpec = "cpu", threads: int | None = None,
             optimization: str = "all", model_file: str | None = None,
             load_cache: bool | str | None = None) -> "MaskedLM":
        """``load_cache`` as for ``CausalLM.load``."""
        model_dir = Path(model_dir)
        manifest = read_manifest(model_dir)
        if manifest.task != "masked-lm":
            raise ModelLoadError(f"{model_dir} holds a {manifest.task} model; load it with CausalLM.load")
        session = create_session(model_dir / resolve_model_file(model_dir, manifest, model_file), provider, threads,
                                 optimization, use_cache=load_cache)
        tokenizer = Tokenizer.load(model_dir)
        tokenizer.check_belongs_to(manifest.vocab_size, model_dir)
        return cls(model_dir, manifest, session, tokenizer)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run(["logits"], {k: v for k, v in feeds.items() if k in self.input_names})[0]

    def fill_mask(self, text: str | Sequence[str], top_k: int = 5) -> list:
        """For one text: a list of candidates (one mask) or a list of lists (several masks); a list per text for a batch."""
        if isinstance(text, (list, tuple)):
            return [self.fill_mask(t, top_k) for t in text]
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        mask_id = self.tokenizer.mask_token_id
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int64)
        positions = np.flatnonzero(ids == mask_id)
        if positions.size == 0:
            raise InputError(f"no mask token ({self.tokenizer.mask_token}) found in the text: {text[:80]!r}")
        limit = self.manifest.max_position_embeddings
        if limit and ids.size > limit:
            raise InputError(f"the text has {ids.size} tokens but the model takes at most {limit}; shorten it")
        logits = self.logits(ids[None, :], np.ones((1, ids.size), dtype=np.int64))[0]
        probs = softmax(logits[positions].astype(np.float32))
        k = min(int(top_k), probs.shape[-1])
        single = positions.size == 1
        pad = self.tokenizer.pad_token_id
        result = []
        for i, row in enumerate(probs):
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.argsort(-row[top], kind="stable")]
            cands = []
            for tok in top:
                filled = ids.copy()
                filled[positions[i]] = tok
                if pad is not None:
                    filled = filled[filled != pad]
                cands.append({
                    "score": float(row[tok]),
                    "token": int(tok),
                    "token_str": self.tokenizer.decode([int(tok)]),
                    "sequence": self.tokenizer.decode(filled, skip_special_tokens=single),
                })
            result.append(cands)
        return result[0] if single else result
