"""The model's tokenizer from ``tokenizer.json`` (Hugging Face ``tokenizers``), with transformers' behaviour.

transformers' fast tokenizers are this same Rust tokenizer plus a little Python: special
tokens named in ``tokenizer_config.json``, the clean-up of spaces before punctuation on
decode, and chat templates rendered with a sandboxed Jinja environment. Those parts are
reproduced here so ids and texts match transformers' exactly.
"""

from __future__ import annotations

import warnings

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from edgelm.runtime.errors import InputError, ModelLoadError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the space that word-level decoders put before punctuation."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re"))


def pad_rows(rows: list[list[int]], pad_id: int, padding_side: str = "left",
             type_rows: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    """Token id rows -> padded ``input_ids`` and ``attention_mask`` (and ``token_type_ids``) int64 arrays."""
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64) if type_rows is not None else None
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
        if types is not None:
            types[i, sl] = type_rows[i]
    out = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = types
    return out


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any], chat_template: str | None = None):
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.model_input_names = list(config.get("model_input_names") or ["input_ids", "attention_mask"])
        for name in SPECIAL_NAMES:
            setattr(self, name, _token_text(config.get(name)))
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = {i for i, tok in added.items() if tok.special}
        self._size = max(tokenizer.get_vocab_size(with_added_tokens=False), max(added, default=-1) + 1)

    @classmethod
    def load(cls, model_dir: str | Path) -> "Tokenizer":
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json; re-export the model (the runtime needs a fast tokenizer)")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a plain Exception on bad files
            raise ModelLoadError(f"{path} cannot be read by tokenizers: {exc}") from exc
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = model_dir / name
            if p.is_file():
                try:
                    config.update(json.loads(p.read_text()))
                except ValueError as exc:
                    raise ModelLoadError(f"{p} is not valid JSON: {exc}") from exc
        template = config.get("chat_template")
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text()
        if isinstance(template, list):  # several named templates: transformers uses "default"
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        return cls(tok, config, template)

    # --- vocabulary ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """How many token ids there are (transformers' ``len(tokenizer)``): the model's vocabulary and any added
        token past it.

        Read from the model's size and the added tokens, which tokenizers keeps at hand, rather than from
        ``get_vocab_size(with_added_tokens=True)``, which builds the whole vocabulary map (23 ms of a
        SmolLM2 load, every load).
        """
        return self._size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_token_id") and name[: -len("_id")] in SPECIAL_NAMES:
            return self.token_to_id(self.__dict__.get(name[: -len("_id")]))
        raise AttributeError(name)

    @property
    def all_special_ids(self) -> list[int]:
        ids = set(self._special_ids)
        for name in SPECIAL_NAMES:
            i = self.token_to_id(getattr(self, name))
            if i is not None:
                ids.add(i)
        return sorted(ids)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    # --- encoding -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}")
        _check_unicode(text)
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        self._warn_unknown([ids])
        return ids

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = True, padding_side: str = "left",
                 return_token_type_ids: bool = False) -> dict[str, np.ndarray]:
        """Encode one text or a batch into padded int64 arrays (left padding by default, for generation)."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a string or a non-empty list of strings")
        for text in texts:
            _check_unicode(text)
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        self._warn_unknown([e.ids for e in encs])
        return self.pad([e.ids for e in encs], padding_side,
                        [e.type_ids for e in encs] if return_token_type_ids else None)

    def _warn_unknown(self, rows: list[list[int]]) -> None:
        """Warn when most tokens of a text are the unknown token: the model would read nothing of it (a tokenizer that
        lower-cases an upper-case vocabulary, text in a script the vocabulary lacks)."""
        unk = self.unk_token_id
        if unk is None:
            return
        special = set(self._special_ids) - {unk}
        for ids in rows:
            real = [i for i in ids if i not in special]
            unknown = sum(1 for i in real if i == unk)
            if len(real) >= 2 and unknown * 2 > len(real):
                warnings.warn(f"{unknown} of the {len(real)} tokens of the input are the unknown token "
                              f"{self.unk_token!r}: the model cannot read this text (check its case and script, or "
                              "re-export with the right --tokenizer-option)", UserWarning, stacklevel=3)
                return

    def pad(self, rows: list[list[int]], padding_side: str = "left",
            type_rows: list[list[int]] | None = None) -> dict[str, np.ndarray]:
        pad_id = self.pad_token_id
        if pad_id is None:
            pad_id = self.eos_token_id if self.eos_token_id is not None else 0
        return pad_rows(rows, pad_id, padding_side, type_rows)

    def check_belongs_to(self, vocab_size: int, model_dir: Path) -> None:
        """A tokenizer with more tokens than the model has logits was copied from another model."""
        if vocab_size and self.vocab_size > vocab_size:
            raise ModelLoadError(f"the tokenizer in {model_dir} has {self.vocab_size} tokens but the model only "
                                 f"{vocab_size}: the tokenizer belongs to another model")

    # --- decoding -------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)]
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, rows: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        return [self.decode(r, **kwargs) for r in rows]

    # --- chat -----------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs: Any) -> str | list[int]:
        """Render the model's chat template like transformers (sandboxed Jinja, same globals)."""
        if not self.chat_template:
            raise InputError("this model has no chat template; pass plain text instead of chat messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts")
        text = _compiled(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{name: getattr(self, name) for name in SPECIAL_NAMES}, **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _check_unicode(text: str) -> None:
    """Lone surrogates (e.g. bytes decoded with surrogateescape) cannot be UTF-8 encoded, so no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"the text holds a character that is not valid Unicode ({text[exc.start]!r} at position {exc.start}); "
            "decode raw bytes with errors='replace' before tokenizing") from None


_TEMPLATES: dict[str, Any] = {}


def _compiled(template: str) -> Any:
    if template not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template]
