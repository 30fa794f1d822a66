"""Export validation: the ONNX graph must compute what the PyTorch model computes.

The reference is the transformers model itself, called the way ``generate`` calls it
(2D padding mask, position ids from the mask, its own cache), so the check covers the
wrapper's hand-built mask, the cache plumbing and the operators at once. Its outputs are
computed first (``*_reference``) and the graph checked later (``check_*``), once the
PyTorch model is gone: an export never holds both models in memory.
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


def _decided(margin: Any, tol: float) -> Any:
    """Positions whose top-2 margin (PyTorch's) decides the argmax: a near-tie may flip either way."""
    return margin > 2 * tol


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
        decided = [same for same, margin in self.top1 if _decided(margin, tol)]
        return {"max_abs_diff_logits": self.logits, "logits_atol": round(tol, 6), "logits_spread": round(self.spread, 3),
                "logits_margin_used": round(self.logits / tol, 3),
                "top1_agreement": round(sum(decided) / len(decided), 4) if decided else 1.0,
                "top1_positions": len(decided)}

    def rel(self, ours: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> float:
        scale = max(1.0, float(np.abs(ref[valid]).max()) if valid.any() else 1.0)
        return float(np.abs(ours - ref)[valid].max()) / scale if valid.any() else 0.0


def causal_reference(model: Any, tokenizer: Any, fused: bool = False) -> list[dict[str, Any]]:
    """PyTorch's outputs for the checked steps: prefill a left-padded batch of 2, decode 3 steps, then a 3-token chunk.

    Computed before the export so that the PyTorch model can be freed before onnxruntime loads the
    graph: the two never need to be in memory together. A ``fused`` graph (see ``export.fused``)
    gets the chunk on the second row only (onnxruntime's GroupQueryAttention takes several new
    tokens on top of a past for one row at a time; the runtime splits others), and its cache is
    compared with PyTorch run on cache-slot positions, which is what such a graph stores: its logits
    are still compared with PyTorch on the real positions.
    """
    steps = _causal_steps(model, tokenizer, fused, slots=False)
    if fused:
        for step, slotted in zip(steps, _causal_steps(model, tokenizer, fused, slots=True)):
            step["presents"] = slotted["presents"]
    return steps


def _causal_steps(model: Any, tokenizer: Any, fused: bool, slots: bool) -> list[dict[str, Any]]:
    from transformers import DynamicCache

    chunk_batch = 1 if fused else None
    ids, mask = _left_pad(tokenizer, PROMPTS)
    batch = ids.shape[0]
    cache = DynamicCache()
    rng = np.random.default_rng(0)
    plan = [("prefill", ids)] + [(f"decode{i}", None) for i in range(3)]
    plan += [("chunk", rng.integers(3, min(tokenizer.vocab_size, 200), size=(batch, 3)))]
    full_mask, step_ids, next_ids = mask, ids, None
    steps = []
    for name, forced in plan:
        keep = None
        if name == "chunk" and chunk_batch == 1:
            keep = slice(batch - 1, batch)
            forced, full_mask = forced[keep], full_mask[keep]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        if name != "prefill":
            step_ids = forced if forced is not None else next_ids
            full_mask = np.concatenate([full_mask, np.ones_like(step_ids)], axis=1)
        new = step_ids.shape[1]
        pos = _positions(full_mask, new)
        run_pos = np.broadcast_to(np.arange(full_mask.shape[1] - new, full_mask.shape[1]), pos.shape) if slots else pos
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(step_ids), attention_mask=torch.from_numpy(full_mask),
                        position_ids=torch.from_numpy(np.ascontiguousarray(run_pos)), past_key_values=cache, use_cache=True,
                        output_hidden_states=True)
        cache = ref.past_key_values
        logits = ref.logits.numpy().copy()
        steps.append({
            "name": name, "keep": keep, "feeds": {"input_ids": step_ids, "attention_mask": full_mask, "position_ids": pos},
            "logits": logits, "hidden": ref.hidden_states[-1].numpy().copy(),
            "presents": [(layer.keys.numpy().copy(), layer.values.numpy().copy()) for layer in cache.layers],
        })
        next_ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    return steps


def check_causal(onnx_path: Path, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the graph through ``causal_reference``'s steps, feeding its own cache back; compare every output."""
    sess = _session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    batch = steps[0]["feeds"]["input_ids"].shape[0]
    past = _empty_past(steps[0]["presents"], batch)
    stats = _Stats()
    for step in steps:
        if step["keep"] is not None:
            past = {n: t[step["keep"]] for n, t in past.items()}
        feeds = step["feeds"]
        full_mask = feeds["attention_mask"]
        new = feeds["input_ids"].shape[1]
        got = dict(zip(names, sess.run(None, {**feeds, **past})))
        query_valid = full_mask[:, -new:].astype(bool)
        stats.compare_logits(got["logits"], step["logits"], query_valid)
        stats.hidden = max(stats.hidden, stats.rel(got["last_hidden_state"], step["hidden"], query_valid))
        key_valid = full_mask.astype(bool)[:, None, :, None]
        for i, pair in enumerate(step["presents"]):
            for kv, ref_t in zip(("key", "value"), pair):
                ours = got[f"present.{i}.{kv}"]
                if ours.shape != ref_t.shape:
                    raise ExportError(f"present.{i}.{kv} has shape {ours.shape}, PyTorch's cache {ref_t.shape}")
                valid = np.broadcast_to(key_valid, ours.shape)
                stats.present = max(stats.present, stats.rel(ours, ref_t, valid))
                past[f"past_key_values.{i}.{kv}"] = ours
    kept = _check_logits_to_keep(sess, steps[0], stats)
    report = {
        "steps": [s["name"] for s in steps] + (["prefill, last position's logits only"] if kept else []),
        "batch": batch,
        "chunk_batch": next((s["feeds"]["input_ids"].shape[0] for s in steps if s["name"] == "chunk"), batch),
        **stats.logits_report(),
        "max_rel_diff_last_hidden_state": stats.hidden,
        "max_rel_diff_present": stats.present,
        "state_rtol": STATE_RTOL,
    }
    _judge(report, stats.logits, max(stats.hidden, stats.present))
    head = _check_greedy_head(sess, steps[0], report["logits_atol"])  # after the judge: a wrong graph fails on its logits
    if head:
        report["steps"].append("prefill through the greedy head")
        report["greedy_head"] = head
    return report


def masked_reference(model: Any, tokenizer: Any, input_names: list[str]) -> dict[str, Any]:
    """PyTorch's logits for a right-padded batch of 2 texts with masks (before the export, like ``causal_reference``)."""
    m = tokenizer.mask_token
    texts = [f"The capital of France is {m}.", f"Hello {m} world"]
    if getattr(model.config, "vocab_size", 1000) < 64:  # residue vocabularies (AntiBERTy): spaced letters
        texts = [f"E V Q L {m} E S G G", f"Q V {m} L"]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    feeds = {n: enc[n].astype(np.int64) for n in input_names}
    with torch.no_grad():
        ref = model(**{n: torch.from_numpy(v) for n, v in feeds.items()}).logits.numpy().copy()
    return {"feeds": feeds, "logits": ref, "valid": enc["attention_mask"].astype(bool)}


def check_masked(onnx_path: Path, reference: dict[str, Any]) -> dict[str, Any]:
    sess = _session(onnx_path)
    got = sess.run(["logits"], reference["feeds"])[0]
    stats = _Stats()
    stats.compare_logits(got, reference["logits"], reference["valid"])
    report = {"batch": 2, **stats.logits_report()}
    _judge(report, stats.logits, 0.0)
    return report


def _empty_past(presents: list[tuple[np.ndarray, np.ndarray]], batch: int) -> dict[str, np.ndarray]:
    """An empty cache (no positions yet) shaped like PyTorch's ``presents``, in optimum's input names."""
    return {f"past_key_values.{i}.{kv}": np.zeros((batch, t.shape[1], 0, t.shape[3]), np.float32)
            for i, pair in enumerate(presents) for kv, t in zip(("key", "value"), pair)}


def _session(onnx_path: Path) -> Any:
    """A quiet CPU session: onnxruntime warns at every load of a causal export that ``logits_to_keep`` has a
    default value, which is the point of it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def _check_logits_to_keep(sess: Any, prefill: dict[str, Any], stats: "_Stats") -> bool:
    """Rerun the prefill asking for the last position's logits only (``graph.add_logits_to_keep``): they must
    come out alone and match PyTorch's last position like the full run did. False when the graph has
    no such input."""
    from edgelm.export.graph import LOGITS_TO_KEEP

    if not any(i.name == LOGITS_TO_KEEP for i in sess.get_overridable_initializers()):
        return False
    feeds = {**prefill["feeds"], **_empty_past(prefill["presents"], prefill["feeds"]["input_ids"].shape[0]),
             LOGITS_TO_KEEP: np.array([1], np.int64)}
    got = sess.run(["logits"], feeds)[0]
    ref = prefill["logits"][:, -1:]
    if got.shape != ref.shape:
        raise ExportError(f"logits_to_keep=1 gave logits of shape {got.shape}, expected {ref.shape}")
    stats.compare_logits(got, ref, np.ones(ref.shape[:2], bool))
    return True


def _check_greedy_head(sess: Any, prefill: dict[str, Any], tol: float) -> dict[str, Any] | None:
    """Rerun the prefill through the greedy head (``export.greedy_head``) at every position. Its candidates must
    hold PyTorch's argmax everywhere (the bound's promise), their logits must match PyTorch's within the full
    head's tolerance, and its pick must be PyTorch's argmax wherever the full head's would have to be (top-2
    margin over twice the tolerance: a near tie may flip either way, as in the full head's check). None when the
    graph has no greedy head."""
    from edgelm.export.greedy_head import IDS, INPUT, LOGITS
    from edgelm.runtime.decoder import greedy_picks

    if not any(i.name == INPUT for i in sess.get_overridable_initializers()):
        return None
    feeds = {**prefill["feeds"], **_empty_past(prefill["presents"], prefill["feeds"]["input_ids"].shape[0]),
             INPUT: np.array([1], np.int64)}
    logits, ids, cand = sess.run(["logits", IDS, LOGITS], feeds)
    ref = prefill["logits"]
    if logits.shape[1] != 0 or cand.shape[:2] != ref.shape[:2]:
        raise ExportError(f"the greedy head gave logits {logits.shape} and candidates {cand.shape} for a prompt of "
                          f"{ref.shape[1]} positions; re-export with --no-greedy-head and report this")
    valid = prefill["feeds"]["attention_mask"].astype(bool)
    best = ref.argmax(-1)
    missing = int((~np.isin(best, ids) & valid).sum())
    diff = float(np.abs(cand - ref[:, :, ids])[valid].max()) if ids.size else float("inf")
    top2 = np.sort(ref, axis=-1)[..., -2:]
    decided = valid & _decided(top2[..., 1] - top2[..., 0], tol)
    wrong = int(((greedy_picks(ids, cand) != best) & decided).sum())
    if missing or wrong or diff > tol:
        raise ExportError(f"the greedy head failed its check against PyTorch over {int(valid.sum())} positions: argmax "
                          f"not among its candidates at {missing}, another pick at {wrong}, candidate logits max abs "
                          f"diff {diff:.3g} (limit {tol:.3g}); re-export with --no-greedy-head and report this")
    return {"positions": int(valid.sum()), "candidates": int(ids.size), "max_abs_diff_logits": diff}


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
