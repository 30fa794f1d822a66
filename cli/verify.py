"""``edgelm verify MODEL_DIR [--reference SOURCE]``: the project's parity checks, on the user's own model.

The export runs in edgelm's runtime, the reference (the checkpoint folder or GGUF file it was made
from) in transformers, on the same prompts, and every strategy is compared:

- greedy (each prompt alone, and all of them as one left-padded batch), beam search with
  ``num_return_sequences``, diverse beam search, contrastive search, repetition penalty with
  ``no_repeat_ngram_size``: token for token, and the processed scores of every step;
- sampling settings (top-k, top-p, temperature): the processed scores of the first step, since
  random draws differ between numpy and torch;
- masked LMs: fill-mask candidates and scores against transformers' pipeline.

A quantized export cannot be token-exact; it is compared with its float reference by top-1
agreement of the next token along the reference's greedy path and by perplexity ratio, and the
table says so. Exit 0 when everything matches, 1 when anything differs, 2 on usage errors.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
)
MASKED_PROMPTS = ("The capital of France is [MASK].", "I drink [MASK] every morning.")
NEW_TOKENS = 12
SCORE_ATOL = 1e-3
TOP1_MIN = 0.75
RATIO_MAX = 1.25
"""Quantized exports pass with at least this top-1 agreement with the float reference and at most RATIO_MAX times
its perplexity: a sanity bound (a damaged graph scores near chance), not a quality target; `edgelm export` records
the measured ratio of every quantized export."""

STRATEGIES: dict[str, dict[str, Any]] = {
    "beam search (4 beams, 2 returned)": dict(num_beams=4, num_return_sequences=2, early_stopping=True),
    "diverse beam search (4 beams, 2 groups)": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    "contrastive search": dict(penalty_alpha=0.6, top_k=4),
    "repetition penalty + no-repeat 3-grams": dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
}
SAMPLING = {
    "sampling scores: top-k 20": dict(do_sample=True, top_k=20),
    "sampling scores: top-p 0.9, temperature 0.7": dict(do_sample=True, top_p=0.9, temperature=0.7, top_k=0),
}


class Row(dict):
    """strategy, cases, exact (count), first_diff (position or None), max_score_diff, note."""

    @property
    def ok(self) -> bool:
        return self["exact"] == self["cases"] and self["max_score_diff"] <= SCORE_ATOL


def _scores_diff(ours: tuple, theirs: tuple) -> float:
    worst = 0.0
    for a, b in zip(ours, theirs):
        b = b.float().numpy() if hasattr(b, "numpy") else np.asarray(b)
        a = np.asarray(a)
        fa, fb = np.isfinite(a), np.isfinite(b)
        if a.shape != b.shape or not np.array_equal(fa, fb):
            return float("inf")
        if fa.any():
            worst = max(worst, float(np.abs(a[fa] - b[fb]).max()))
    return worst


def _first_diff(a: np.ndarray, b: np.ndarray) -> int | None:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    if diff.size:
        return int(diff[0])
    return None if len(a) == len(b) else n


def _compare(name: str, lm: Any, model: Any, ids: np.ndarray, mask: np.ndarray, **kw: Any) -> Row:
    import torch

    prompt = ids.shape[1]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), return_dict_in_generate=True,
                             output_scores=True, max_new_tokens=NEW_TOKENS, **kw)
    out = lm.generate(ids, mask, return_dict_in_generate=True, output_scores=True, max_new_tokens=NEW_TOKENS, **kw)
    theirs, ours = ref.sequences.numpy(), out.sequences
    exact, first = 0, None
    for a, b in zip(ours, theirs):
        d = _first_diff(a[prompt:], b[prompt:])
        exact += d is None and len(a) == len(b)
        if d is not None and (first is None or d < first):
            first = d
    if ours.shape != theirs.shape and first is None:
        first = min(ours.shape[1], theirs.shape[1]) - prompt
    return Row(strategy=name, cases=len(theirs), exact=int(exact), first_diff=first,
               max_score_diff=_scores_diff(out.scores or (), ref.scores or ()), note="")


def _sampling_scores(name: str, lm: Any, model: Any, ids: np.ndarray, mask: np.ndarray, **kw: Any) -> Row:
    import torch

    worst, cases = 0.0, 0
    for row in range(ids.shape[0]):
        keep = mask[row].astype(bool)
        one = ids[row][keep][None]
        with torch.no_grad():
            ref = model.generate(torch.from_numpy(one), attention_mask=torch.ones_like(torch.from_numpy(one)),
                                 return_dict_in_generate=True, output_scores=True, max_new_tokens=1, **kw)
        out = lm.generate(one, return_dict_in_generate=True, output_scores=True, max_new_tokens=1, seed=0, **kw)
        worst = max(worst, _scores_diff(out.scores, ref.scores))
        cases += 1
    exact = cases if worst <= SCORE_ATOL else 0
    return Row(strategy=name, cases=cases, exact=exact, first_diff=None if exact == cases else 0, max_score_diff=worst,
               note="first step's processed scores (draws differ between numpy and torch)")


def _quantized(lm: Any, model: Any, ids: np.ndarray, mask: np.ndarray) -> list[Row]:
    import torch

    agree, total, nll_ours, nll_ref = 0, 0, [], []
    for row in range(ids.shape[0]):
        one = ids[row][mask[row].astype(bool)][None]
        with torch.no_grad():
            path = model.generate(torch.from_numpy(one), attention_mask=torch.ones_like(torch.from_numpy(one)),
                                  max_new_tokens=24, do_sample=False).numpy()
            ref_logits = model(torch.from_numpy(path)).logits[0].float().numpy()
        ours, _ = lm.decoder.step(path, np.ones_like(path), np.arange(path.shape[1])[None], lm.decoder.new_cache(1))
        ours = ours[0]
        agree += int((ours[:-1].argmax(-1) == ref_logits[:-1].argmax(-1)).sum())
        total += path.shape[1] - 1
        for logits, bucket in ((ours, nll_ours), (ref_logits, nll_ref)):
            z = logits[:-1].astype(np.float64)
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            bucket.extend(-logp[np.arange(len(z)), path[0, 1:]])
    ratio = float(np.exp(np.mean(nll_ours) - np.mean(nll_ref)))
    top1 = agree / max(total, 1)
    return [Row(strategy="quantized: next-token top-1 agreement", cases=total, exact=agree, first_diff=None,
                max_score_diff=0.0, note=f"{top1:.1%} (needs {TOP1_MIN:.0%}); perplexity ratio {ratio:.4f} on the "
                                         "reference's greedy continuations", passed=top1 >= TOP1_MIN and ratio <= RATIO_MAX, ratio=ratio)]


def _masked(folder: Path, source: Any, prompts: tuple[str, ...]) -> list[Row]:
    from transformers import pipeline

    from edgelm.runtime import MaskedLM

    lm = MaskedLM.load(folder)
    mask = source.tokenizer.mask_token
    texts = [p.replace("[MASK]", mask) for p in prompts]
    pipe = pipeline("fill-mask", model=source.model, tokenizer=source.tokenizer, device="cpu")
    exact, worst, first = 0, 0.0, None
    for i, text in enumerate(texts):
        ours = lm.fill_mask(text, top_k=5)
        theirs = pipe(text, top_k=5)
        ours = ours if ours and isinstance(ours[0], dict) else ours[0]
        theirs = theirs if theirs and isinstance(theirs[0], dict) else theirs[0]
        same = [a["token"] for a in ours] == [b["token"] for b in theirs]
        exact += same
        if not same and first is None:
            first = i
        worst = max(worst, max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs)))
    return [Row(strategy="fill-mask top-5 candidates", cases=len(texts), exact=exact, first_diff=first,
                max_score_diff=worst, note="against transformers' fill-mask pipeline")]


def verify(folder: Path, reference: str | None, prompts: tuple[str, ...] | None, log: Any) -> dict[str, Any]:
    from edgelm.export.source import load_source
    from edgelm.runtime import CausalLM
    from edgelm.runtime.manifest import read_manifest

    manifest = read_manifest(folder)
    source = reference or manifest.source
    if not source:
        raise SystemExit("edgelm verify: the export does not name its source; give --reference SOURCE")
    log(f"verify: loading the reference {source} with transformers")
    src = load_source(source, manifest.task, log=lambda s: None)
    if manifest.task == "masked-lm":
        rows = _masked(folder, src, prompts or MASKED_PROMPTS)
        return {"model": str(folder), "reference": str(source), "quantized": False, "rows": rows}
    lm = CausalLM.load(folder)
    model = src.model
    pad = lm.generation_config.pad_token_id
    if pad is None:
        pad = lm.generation_config.eos_ids[0] if lm.generation_config.eos_ids else 0
    model.generation_config.pad_token_id = pad
    texts = prompts or PROMPTS
    enc = lm.encode_prompts(list(texts))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    quantized = bool(manifest.validation.get("quantization"))
    if quantized:
        rows = _quantized(lm, model, ids, mask)
    else:
        log("verify: greedy")
        singles = [_compare("greedy", lm, model, ids[i][mask[i].astype(bool)][None],
                            np.ones((1, int(mask[i].sum())), np.int64), do_sample=False) for i in range(len(texts))]
        rows = [Row(strategy="greedy (batch 1)", cases=len(singles), exact=sum(r["exact"] for r in singles),
                    first_diff=min((r["first_diff"] for r in singles if r["first_diff"] is not None), default=None),
                    max_score_diff=max(r["max_score_diff"] for r in singles), note="")]
        rows.append(_compare("greedy (left-padded batch)", lm, model, ids, mask, do_sample=False))
        for name, kw in STRATEGIES.items():
            if lm.decoder.static:
                continue
            if "penalty_alpha" in kw and not lm.decoder.has_hidden:
                continue
            log(f"verify: {name}")
            rows.append(_compare(name, lm, model, ids, mask, **kw))
        for name, kw in SAMPLING.items():
            rows.append(_sampling_scores(name, lm, model, ids, mask, **kw))
    return {"model": str(folder), "reference": str(source), "quantized": quantized, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} against {result['reference']}"
             + (" (quantized: compared by top-1 agreement and perplexity, not token for token)"
                if result["quantized"] else ""), "",
             "| strategy | cases | token-exact | first differing position | max abs score difference | |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ok = r.get("passed", r.ok if isinstance(r, Row) else False)
        first = "-" if r["first_diff"] is None else str(r["first_diff"])
        lines.append(f"| {r['strategy']} | {r['cases']} | {r['exact']}/{r['cases']} | {first} | "
                     f"{r['max_score_diff']:.2e} | {'ok' if ok else 'DIFFERS'}{' - ' + r['note'] if r['note'] else ''} |")
    return "\n".join(lines)


def passed(result: dict[str, Any]) -> bool:
    return all(r.get("passed", r.ok) for r in result["rows"])


def main_verify(args: Any) -> int:
    prompts = None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            print(f"edgelm: error: --prompts {path} is not a file (one prompt per line)", file=sys.stderr)
            return 2
        prompts = tuple(line for line in path.read_text().splitlines() if line.strip())
        if not prompts:
            print(f"edgelm: error: --prompts {path} holds no prompt", file=sys.stderr)
            return 2
    result = verify(Path(args.model_dir), args.reference, prompts, lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({**result, "passed": passed(result),
                          "rows": [{**r, "passed": r.get("passed", r.ok)} for r in result["rows"]]}, default=float))
    else:
        print(table(result))
    return 0 if passed(result) else 1
