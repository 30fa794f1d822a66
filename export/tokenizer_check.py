"""The tokenizer an export ships, checked before anything else is done.

The runtime reads ``tokenizer.json`` with the ``tokenizers`` library, not transformers; the
check saves the tokenizer as the export will, loads it as the runtime will, and compares:

- a built-in text (English, accents, CJK, emoji, code, whitespace runs, digits) encoded by both:
  the ids must be equal line by line, or the runtime would feed the model other tokens than
  transformers does;
- the vocabulary's own tokens: each token's text encoded again. A vocabulary most of whose
  tokens come back as the unknown token is one the tokenizer cannot produce: AntiBERTy's
  upper-case residues behind BERT's default lower-casing, where every residue becomes [UNK]
  and fill-mask answers confidently and wrongly. transformers accepts that silently; here it
  stops the export, or, when the cause is lower-casing and switching it off fixes it, applies
  that fix with a notice (the same as ``--tokenizer-option do_lower_case=false``).

The agreement figures go into ``edgelm.json`` (``validation.tokenizer``).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from edgelm.runtime.errors import ExportError

SAMPLE = (
    "The quick brown fox jumps over the lazy dog.",
    "Café déjà vu: naïve façade, Ærøskøbing, Straße, São Paulo.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 🙂👍🏽 👨‍👩‍👧 🇫🇷 ✨",
    "def add(a, b):\n    return a + b  # sum\n\tprint(f'{a}+{b}')",
    "Spaces:   three,\t\ttabs,\n\n\nnewlines   and trailing   ",
    "Numbers 3.14159, 1,000,000 and 2024-11-28; URLs https://example.com/a?b=c",
    "ALL CAPS TEXT AND MiXeD cAsE",
)
UNKNOWN_LIMIT = 0.5
"""More than this share of the vocabulary encoding to the unknown token stops the export."""


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--tokenizer-option``) as from_pretrained keyword arguments (bools, ints, floats)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ExportError(f"--tokenizer-option takes KEY=VALUE, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            for cast in (int, float):
                try:
                    out[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                out[key] = value
    return out


def _vocab_unknown(runtime_tok: Any, reference: Any) -> tuple[float, float, int]:
    """(share of vocabulary tokens whose text encodes to the unknown token, share that encode back to themselves,
    tokens tried)."""
    unk = reference.unk_token_id
    special = set(reference.all_special_ids)
    ids = [i for i in range(len(reference)) if i not in special]
    if not ids:
        return 0.0, 1.0, 0
    texts = [reference.convert_tokens_to_string([reference.convert_ids_to_tokens(i)]) for i in ids]
    encoded = runtime_tok._tok.encode_batch(texts, add_special_tokens=False)
    unknown = sum(1 for e in encoded if unk is not None and e.ids and all(t == unk for t in e.ids))
    back = sum(1 for i, e in zip(ids, encoded) if e.ids == [i])
    return unknown / len(ids), back / len(ids), len(ids)


def check(tokenizer: Any, options: dict[str, Any], reload: Callable[[dict[str, Any]], Any],
          log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """(the tokenizer to ship, its report); ``reload(options)`` loads the source's tokenizer with other options."""
    report = _measure(tokenizer)
    if report["vocab_unknown"] > UNKNOWN_LIMIT:
        lowers = getattr(tokenizer, "do_lower_case", False) or _normalizer_lowercases(tokenizer)
        if lowers and "do_lower_case" not in options:
            fixed = reload({**options, "do_lower_case": False})
            fixed_report = _measure(fixed)
            if fixed_report["vocab_unknown"] <= UNKNOWN_LIMIT:
                log(f"      note: the tokenizer lower-cases its input but {report['vocab_unknown']:.0%} of its "
                    "vocabulary then encodes to the unknown token (an upper-case vocabulary); exporting it with "
                    "do_lower_case=false, as --tokenizer-option do_lower_case=false does")
                fixed_report["applied"] = {"do_lower_case": False}
                return fixed, fixed_report
        cause = ("it lower-cases its input while the vocabulary is upper-case: pass --tokenizer-option "
                 "do_lower_case=false" if lowers else
                 "pass the tokenizer options the model was trained with as --tokenizer-option KEY=VALUE, or add the "
                 "model's tokenizer_config.json to the checkpoint folder")
        raise ExportError(f"{report['vocab_unknown']:.0%} of the tokenizer's vocabulary encodes to the unknown token "
                          f"{tokenizer.unk_token!r}, so most inputs would reach the model as unknown tokens: {cause}")
    if report["text_lines_equal"] < report["text_lines"]:
        raise ExportError(
            f"the saved tokenizer.json encodes {report['text_lines'] - report['text_lines_equal']} of "
            f"{report['text_lines']} sample lines differently from transformers (first: {report['first_difference']!r}); "
            "the runtime would feed the model other tokens: the tokenizer has no faithful fast (tokenizer.json) form")
    return tokenizer, report


def _normalizer_lowercases(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = str(getattr(backend, "normalizer", "") or "")
    return "lowercase: true" in text.lower() or "Lowercase" in text


def _measure(tokenizer: Any) -> dict[str, Any]:
    from edgelm.runtime.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="edgelm-tok-") as work:
        tokenizer.save_pretrained(work)
        if not (Path(work) / "tokenizer.json").is_file():
            raise ExportError("the tokenizer did not save a tokenizer.json, which the runtime needs")
        runtime_tok = Tokenizer.load(Path(work))
    equal, first = 0, None
    for line in SAMPLE:
        with warnings.catch_warnings():  # the runtime warns of unknown tokens; here they are what is measured
            warnings.simplefilter("ignore")
            ours = runtime_tok.encode(line, add_special_tokens=True)
        theirs = tokenizer(line, add_special_tokens=True)["input_ids"]
        if list(ours) == list(theirs):
            equal += 1
        elif first is None:
            first = line
    unknown, back, tried = _vocab_unknown(runtime_tok, tokenizer)
    return {"text_lines": len(SAMPLE), "text_lines_equal": equal, "first_difference": first,
            "vocab_tokens_tried": tried, "vocab_unknown": round(unknown, 4), "vocab_round_trip": round(back, 4)}
