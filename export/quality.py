"""What a quantized export costs in quality, measured on the export itself, never assumed.

The quantized graph and the float32 graph it came from (validated against PyTorch moments
before) both read a text shipped in the package (``data/quality.txt``, a few hundred tokens of
technical prose) through edgelm's own runtime, one window of at most 512 tokens at a time, the
two graphs in step so that each window's logits of both are compared while they are in memory.
Two figures come out: the ratio of their perplexities (1.000 means no loss; what
``--max-quality-loss`` limits) and the mean KL divergence of the quantized graph's next-token
distributions from the float32 graph's. The divergence is there because the ratio scores only the
text's own next token: changes elsewhere in the distribution partly cancel in it, and on a few
hundred tokens it moves by tenths of a percent between exports that differ in their last bits,
where the divergence holds still (llama.cpp's perplexity tool reports it for the same reason).
Masked LMs get the pseudo-perplexity (every token predicted with one token in ten masked, ten
passes) and the divergence over the same masked positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgelm.export.quant.calibrate import builtin_text

WINDOW = 512
TEXT = "quality.txt"
LOGITS_BUDGET = 1 << 27
"""Logits values one graph's window may hold (512 MB of float32, two graphs in step): a vocabulary past 262k tokens
gets shorter windows."""


def _window(vocab: int) -> int:
    return max(64, min(WINDOW, LOGITS_BUDGET // max(vocab, 1)))


def _log_probs(logits: np.ndarray, rows: slice) -> np.ndarray:
    from edgelm.runtime.processors import log_softmax

    return log_softmax(logits[rows].astype(np.float64))


def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] row by row, float64, 64 rows at a time (see ``score_rows``)."""
    out = np.empty(len(targets))
    for start in range(0, len(targets), 64):
        rows = slice(start, start + 64)
        logp = _log_probs(logits, rows)
        out[rows] = -logp[np.arange(logp.shape[0]), targets[rows]]
    return out


def score_rows(logits: np.ndarray, reference: np.ndarray,
               targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(NLL of ``targets`` under ``logits``, the same under ``reference``, KL(reference || logits)) row by row.

    Float64, 64 rows at a time: a window of a 262k-token vocabulary in float64 would be a gigabyte."""
    n = len(targets)
    nll, ref_nll, kl = np.empty(n), np.empty(n), np.empty(n)
    for start in range(0, n, 64):
        rows = slice(start, start + 64)
        logq, logp = _log_probs(logits, rows), _log_probs(reference, rows)
        picked = np.arange(logq.shape[0]), targets[rows]
        nll[rows], ref_nll[rows] = -logq[picked], -logp[picked]
        p = np.exp(logp)
        with np.errstate(invalid="ignore"):  # a token the reference rules out (-inf) adds nothing, not nan
            kl[rows] = np.where(p > 0, p * (logp - logq), 0.0).sum(axis=-1)
    return nll, ref_nll, kl


def _causal_windows(model_dir: Path, manifest: Any, model_file: str,
                    ids: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(logits of each position but the last, the next tokens) for each window of ``ids``, each from an empty
    cache."""
    from edgelm.runtime.decoder import Decoder, StaticDecoder

    make = StaticDecoder if manifest.static_max_length else Decoder
    decoder = make(model_dir, manifest, model_file=model_file)
    window = min(_window(manifest.vocab_size), (manifest.static_max_length or WINDOW) - 1,
                 (manifest.max_position_embeddings or WINDOW) - 1)
    for start in range(0, len(ids) - 1, window):
        chunk = np.asarray([ids[start:start + window]], np.int64)
        if chunk.shape[1] < 2:
            break
        cache = decoder.new_cache(1, chunk.shape[1])
        logits, _ = decoder.step(chunk, np.ones_like(chunk), np.arange(chunk.shape[1])[None], cache)
        yield logits[0, :-1], chunk[0, 1:]


def _masked_windows(model_dir: Path, manifest: Any, model_file: str, ids: list[int],
                    mask_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(logits at the masked positions, the tokens they hid) for each of ten passes, one token in ten masked."""
    from edgelm.runtime.session import create_session

    session = create_session(model_dir / model_file, "cpu", None, "all")
    limit = min(WINDOW, manifest.max_position_embeddings or WINDOW)
    row = np.asarray([ids[:limit]], np.int64)
    feeds = {"input_ids": row, "attention_mask": np.ones_like(row)}
    if "token_type_ids" in {i.name for i in session.get_inputs()}:
        feeds["token_type_ids"] = np.zeros_like(row)
    for offset in range(10):
        masked = row.copy()
        positions = np.arange(1 + offset, row.shape[1] - 1, 10)  # keep the first and last (special) tokens
        if not len(positions):
            continue
        masked[0, positions] = mask_id
        logits = session.run(["logits"], {**feeds, "input_ids": masked})[0]
        yield logits[0, positions], row[0, positions]


def _token_ids(model_dir: Path, manifest: Any, text: str) -> tuple[list[int], int | None]:
    """The text's token ids (with the special tokens a masked LM reads) and the mask token's id (masked LMs)."""
    from edgelm.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(model_dir)
    if manifest.task == "causal-lm":
        return [int(i) for i in tokenizer.encode(text)], None
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=True)], tokenizer.mask_token_id


def _windows(model_dir: Path, manifest: Any, model_file: str, ids: list[int],
             mask_id: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if manifest.task == "causal-lm":
        return _causal_windows(model_dir, manifest, model_file, ids)
    return _masked_windows(model_dir, manifest, model_file, ids, mask_id)


def compare(model_dir: Path, manifest: Any, float_file: str, text: str | None = None) -> dict[str, Any]:
    """Perplexity of the folder's graph and of its float32 graph ``float_file``, their ratio, and the mean KL
    divergence of the first from the second, per token scored (nats)."""
    ids, mask_id = _token_ids(model_dir, manifest, text if text is not None else builtin_text(TEXT))
    scores = [score_rows(logits, reference, targets) for (logits, targets), (reference, _) in
              zip(_windows(model_dir, manifest, manifest.model_file, ids, mask_id),
                  _windows(model_dir, manifest, float_file, ids, mask_id))]
    nll, ref_nll, kl = (np.concatenate(column) for column in zip(*scores))
    quantized, reference = float(np.exp(nll.mean())), float(np.exp(ref_nll.mean()))
    return {
        "text": "built-in (edgelm/export/data/quality.txt)" if text is None else "given",
        "tokens": int(nll.size),
        "measure": "perplexity" if manifest.task == "causal-lm" else "pseudo-perplexity (1 token in 10 masked)",
        "perplexity": round(quantized, 4),
        "float32_perplexity": round(reference, 4),
        "ratio": round(quantized / reference, 5),
        "kl_divergence": round(float(kl.mean()), 6),
    }
