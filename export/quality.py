"""What a quantized export costs in quality, measured on the export itself, never assumed.

The quantized graph and the float32 graph it came from (validated against PyTorch moments
before) both read a text shipped in the package (``data/quality.txt``, a few hundred tokens of
technical prose) through edgelm's own runtime, one window of at most 512 tokens at a time.
The figure is the ratio of their perplexities: 1.000 means no loss. Masked LMs get the
pseudo-perplexity (every token predicted with one token in ten masked, ten passes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.export.quant.calibrate import builtin_text

WINDOW = 512
TEXT = "quality.txt"
LOGITS_BUDGET = 1 << 27
"""Logits values one window may hold (512 MB of float32): a 262k-token vocabulary gets shorter windows."""


def _window(vocab: int) -> int:
    return max(64, min(WINDOW, LOGITS_BUDGET // max(vocab, 1)))


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] row by row in float64, 64 rows at a time (no full float64 copy)."""
    from edgelm.runtime.processors import log_softmax

    out = np.empty(len(targets))
    for start in range(0, len(targets), 64):
        logp = log_softmax(logits[start:start + 64].astype(np.float64))
        out[start:start + 64] = -logp[np.arange(logp.shape[0]), targets[start:start + 64]]
    return out


def _causal_nll(model_dir: Path, manifest: Any, model_file: str, ids: list[int]) -> np.ndarray:
    from edgelm.runtime.decoder import Decoder, StaticDecoder

    make = StaticDecoder if manifest.static_max_length else Decoder
    decoder = make(model_dir, manifest, model_file=model_file)
    window = min(_window(manifest.vocab_size), (manifest.static_max_length or WINDOW) - 1,
                 (manifest.max_position_embeddings or WINDOW) - 1)
    nll = []
    for start in range(0, len(ids) - 1, window):
        chunk = np.asarray([ids[start:start + window]], np.int64)
        if chunk.shape[1] < 2:
            break
        cache = decoder.new_cache(1, chunk.shape[1])
        logits, _ = decoder.step(chunk, np.ones_like(chunk), np.arange(chunk.shape[1])[None], cache)
        nll.append(_nll_rows(logits[0, :-1], chunk[0, 1:]))
        del logits
    return np.concatenate(nll)


def _masked_nll(model_dir: Path, manifest: Any, model_file: str, ids: list[int], mask_id: int) -> np.ndarray:
    from edgelm.runtime.session import create_session

    session = create_session(model_dir / model_file, "cpu", None, "all")
    limit = min(WINDOW, manifest.max_position_embeddings or WINDOW)
    row = np.asarray([ids[:limit]], np.int64)
    feeds = {"input_ids": row, "attention_mask": np.ones_like(row)}
    if "token_type_ids" in {i.name for i in session.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(row)
    nll = []
    for offset in range(10):
        masked = row.copy()
        positions = np.arange(1 + offset, row.shape[1] - 1, 10)  # keep the first and last (special) tokens
        if not len(positions):
            continue
        masked[0, positions] = mask_id
        logits = session.run(["logits"], {**feeds, "input_ids": masked})[0]
        nll.append(_nll_rows(logits[0, positions], row[0, positions]))
    return np.concatenate(nll)


def perplexity(model_dir: Path, manifest: Any, model_file: str, text: str | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) of one graph of an export folder on ``text`` (default: the built-in one)."""
    from edgelm.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(model_dir)
    text = text if text is not None else builtin_text(TEXT)
    if manifest.task == "causal-lm":
        ids = [int(i) for i in tokenizer.encode(text)]
        nll = _causal_nll(model_dir, manifest, model_file, ids)
    else:
        ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=True)]
        mask_id = tokenizer.mask_token_id
        nll = _masked_nll(model_dir, manifest, model_file, ids, mask_id)
    return float(np.exp(nll.mean())), int(nll.size)


def compare(model_dir: Path, manifest: Any, float_file: str, text: str | None = None) -> dict[str, Any]:
    """Perplexity of the folder's graph and of its float32 graph ``float_file``, and their ratio (one graph in
    memory at a time)."""
    import gc

    quantized, tokens = perplexity(model_dir, manifest, manifest.model_file, text)
    gc.collect()
    reference, _ = perplexity(model_dir, manifest, float_file, text)
    return {
        "text": "built-in (edgelm/export/data/quality.txt)" if text is None else "given",
        "tokens": tokens,
        "measure": "perplexity" if manifest.task == "causal-lm" else "pseudo-perplexity (1 token in 10 masked)",
        "perplexity": round(quantized, 4),
        "float32_perplexity": round(reference, 4),
        "ratio": round(quantized / reference, 5),
    }
