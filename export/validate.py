"""Export validation: the ONNX graph must compute what the PyTorch model computes.

The reference is the transformers model itself, called the way ``generate`` calls it
(2D padding mask, position ids from the mask, its own cache), so the check covers the
wrapper's hand-built mask, the cache plumbing and the operators at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelm.runtime.errors import ExportError

LOGITS_ATOL = 1e-3
"""float32 logits of a correct export differ by ~1e-4 on SmolLM2; a real error is far above 1e-3."""
LOGITS_RTOL = 5e-5
"""Larger models accumulate more float32 rounding (Qwen2.5 0.5B: 8.7e-4 while its greedy scores differ by 9e-5):
the logits limit is the larger of LOGITS_ATOL and this share of the logits' spread (max - min over the checked
positions), so it grows with the model's scale. A wrong graph (a broken rotary setting, another model's weights) is
off by whole units, and also fails the top-1 check."""
STATE_RTOL = 1e-3
"""Hidden and cache states: relative to the tensor's largest magnitude (tiny random models have large ones)."""

PROMPTS = ("The capital of France is", "Hello, my name is Ada and I like to write")


def _left_pad(tokenizer: Any, texts: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    from edgelm.runtime.tokenizer import pad_rows

    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    enc = pad_rows(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, "left")
    return enc["input_ids"], enc["attention_mask"]


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    pos = np.cumsum(mask, axis=1) - 1
    pos = np.where(mask == 0, 1, pos)
    return pos[:, -new:].astype(np.int64)


class _Stats:
    def __init__(self) -> None:
        self.logits = 0.0
        self.hidden = 0.0
        self.present = 0.0
        self.spread = 0.0
        self.top1: list[tuple[bool, float]] = []
        """(ONNX argmax == PyTorch argmax, PyTorch's top-2 margin) per checked position."""

    def compare_logits(self, got: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> None:
        self.logits = max(self.logits, float(np.abs(got - ref)[valid].max()))
        rows_got, rows_ref = got[valid], ref[valid]
        self.spread = max(self.spread, float((rows_ref.max(-1) - rows_ref.min(-1)).max()))
        top2 = np.sort(rows_ref, axis=-1)[:, -2:]
        same = rows_got.argmax(-1) == rows_ref.argmax(-1)
        self.top1.extend(zip(same.tolist(), (top2[:, 1] - top2[:, 0]).tolist()))

    def logits_report(self) -> dict[str, Any]:
        tol = max(LOGITS_ATOL, LOGITS_RTOL * self.spread)
        decided = [same for same, margin in self.top1 if margin > 2 * tol]  # near-ties may flip either way
        return {"max_abs_diff_logits": self.logits, "logits_atol": round(tol, 6), "logits_spread": round(self.spread, 3),
                "logits_margin_used": round(self.logits / tol, 3),
                "top1_agreement": round(sum(decided) / len(decided), 4) if decided else 1.0,
                "top1_positions": len(decided)}

    def rel(self, ours: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> float:
        scale = max(1.0, float(np.abs(ref[valid]).max()) if valid.any() else 1.0)
        return float(np.abs(ours - ref)[valid].max()) / scale if valid.any() else 0.0


def validate_causal(model: Any, tokenizer: Any, onnx_path: Path, num_layers: int,
                    chunk_batch: int | None = None) -> dict[str, Any]:
    """Prefill a left-padded batch of 2, decode 3 steps, then a 3-token chunk; compare every output.

    ``chunk_batch=1`` runs the chunk on the second row only: onnxruntime's GroupQueryAttention
    takes several new tokens on top of a past for one row at a time (the runtime splits others).
    """
    import onnxruntime as ort
    from transformers import DynamicCache

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ids, mask = _left_pad(tokenizer, PROMPTS)
    batch = ids.shape[0]
    cache = DynamicCache()
    past = {f"past_key_values.{i}.{kv}": np.zeros((batch, 0, 0, 0), np.float32) for i in range(num_layers) for kv in ("key", "value")}
    past_shape_known = False
    stats = _Stats()
    steps = [("prefill", ids)]
    rng = np.random.default_rng(0)
    steps += [(f"decode{i}", None) for i in range(3)]
    steps += [("chunk", rng.integers(3, min(tokenizer.vocab_size, 200), size=(batch, 3)))]
    full_mask = mask
    step_ids = ids
    for name, forced in steps:
        if name == "chunk" and chunk_batch == 1:
            keep = slice(batch - 1, batch)
            forced, full_mask = forced[keep], full_mask[keep]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            past = {n: t[keep] for n, t in past.items()}
        if name != "prefill":
            step_ids = forced if forced is not None else next_ids
            full_mask = np.concatenate([full_mask, np.ones_like(step_ids)], axis=1)
        new = step_ids.shape[1]
        pos = _positions(full_mask, new)
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(step_ids), attention_mask=torch.from_numpy(full_mask),
                        position_ids=torch.from_numpy(pos), past_key_values=cache, use_cache=True,
                        output_hidden_states=True)
        cache = ref.past_key_values
        feeds = {"input_ids": step_ids, "attention_mask": full_mask, "position_ids": pos}
        if not past_shape_known:
            k0 = cache.layers[0].keys
            past = {k: np.zeros((batch, k0.shape[1], 0, k0.shape[3]), np.float32) for k in past}
            past_shape_known = True
        feeds.update(past)
        outs = sess.run(None, feeds)
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, outs))
        query_valid = full_mask[:, -new:].astype(bool)
        ref_logits = ref.logits.numpy()
        stats.compare_logits(got["logits"], ref_logits, query_valid)
        stats.hidden = max(stats.hidden, stats.rel(got["last_hidden_state"], ref.hidden_states[-1].numpy(), query_valid))
        key_valid = full_mask.astype(bool)[:, None, :, None]
        for i, layer in enumerate(cache.layers):
            for kv, ref_t in (("key", layer.keys), ("value", layer.values)):
                ours = got[f"present.{i}.{kv}"]
                if ours.shape != tuple(ref_t.shape):
                    raise ExportError(f"present.{i}.{kv} has shape {ours.shape}, PyTorch's cache {tuple(ref_t.shape)}")
                valid = np.broadcast_to(key_valid, ours.shape)
                stats.present = max(stats.present, stats.rel(ours, ref_t.numpy(), valid))
                past[f"past_key_values.{i}.{kv}"] = ours
        next_ids = ref_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    report = {
        "steps": [s for s, _ in steps],
        "batch": batch,
        "chunk_batch": chunk_batch or batch,
        **stats.logits_report(),
        "max_rel_diff_last_hidden_state": stats.hidden,
        "max_rel_diff_present": stats.present,
        "state_rtol": STATE_RTOL,
    }
    _judge(report, stats.logits, max(stats.hidden, stats.present))
    return report


def validate_masked(model: Any, tokenizer: Any, onnx_path: Path, input_names: list[str]) -> dict[str, Any]:
    """A right-padded batch of 2 texts with masks; compare logits at real positions."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    m = tokenizer.mask_token
    texts = [f"The capital of France is {m}.", f"Hello {m} world"]
    if getattr(model.config, "vocab_size", 1000) < 64:  # residue vocabularies (AntiBERTy): spaced letters
        texts = [f"E V Q L {m} E S G G", f"Q V {m} L"]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    feeds = {n: enc[n].astype(np.int64) for n in input_names}
    with torch.no_grad():
        ref = model(**{n: torch.from_numpy(v) for n, v in feeds.items()}).logits.numpy()
    got = sess.run(["logits"], feeds)[0]
    stats = _Stats()
    stats.compare_logits(got, ref, enc["attention_mask"].astype(bool))
    report = {"batch": 2, **stats.logits_report()}
    _judge(report, stats.logits, 0.0)
    return report


def _judge(report: dict[str, Any], logits_diff: float, state_diff: float) -> None:
    tol = report["logits_atol"]
    ok = logits_diff <= tol and state_diff <= STATE_RTOL and report["top1_agreement"] == 1.0
    report["passed"] = bool(ok)
    if not ok:
        raise ExportError(
            f"validation failed: ONNX Runtime differs from PyTorch (logits max abs diff {logits_diff:.3g}, limit "
            f"{tol:.3g} for a logits spread of {report['logits_spread']:.1f}; top-1 agreement "
            f"{report['top1_agreement']:.1%} over {report['top1_positions']} positions; states max rel diff "
            f"{state_diff:.3g}, limit {STATE_RTOL}); nothing was written")
