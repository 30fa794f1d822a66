"""What quantization costs: greedy agreement with the float32 export, and perplexity on a fixed text.

Both models run through edgelm's runtime, so the figures isolate the weights, not the code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea,",
    "To make a cup of tea, first",
    "The theory of relativity explains",
    "List of prime numbers: 2, 3, 5,",
    "Photosynthesis is the process by which",
)
TEXT = (
    "The lighthouse stood at the edge of the cliff for more than a century, guiding fishing boats home through "
    "fog and storm. Its keeper climbed the spiral stairs every evening to light the lamp, and every morning he "
    "wrote the weather in a thick leather book: the direction of the wind, the height of the waves, the ships "
    "that passed. When electric lamps replaced the old oil burner, the keeper was no longer needed, but the "
    "village asked him to stay. He spent his last years teaching children to read the sky, to tell rain clouds "
    "from harmless ones, and to respect the sea that fed the town. The book of weather is now kept in the small "
    "museum by the harbour, where visitors can read, in careful handwriting, forty years of wind and water."
)
NEW_TOKENS = 32


def perplexity(lm: Any, text: str = TEXT) -> float:
    """exp(mean negative log-likelihood) of the text's tokens, from one forward pass."""
    from edgelm.runtime.processors import log_softmax

    ids = np.asarray([lm.tokenizer.encode(text)], np.int64)
    cache = lm.decoder.new_cache(1)
    logits, _ = lm.decoder.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], cache)
    logp = log_softmax(logits[0, :-1].astype(np.float64))
    nll = -logp[np.arange(ids.shape[1] - 1), ids[0, 1:]]
    return float(np.exp(nll.mean()))


def quality(model_dir: str, reference_dir: str, threads: int | None = None) -> dict[str, Any]:
    from edgelm.runtime import CausalLM

    lm, ref = CausalLM.load(model_dir, threads=threads), CausalLM.load(reference_dir, threads=threads)
    same, prefix, agree = 0, [], []
    for prompt in PROMPTS:
        ids = np.asarray([lm.tokenizer.encode(prompt)], np.int64)
        kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        a = lm.generate(ids, **kw)[0, ids.shape[1]:]
        b = ref.generate(ids, **kw)[0, ids.shape[1]:]
        equal = a == b
        same += bool(equal.all())
        prefix.append(int(np.argmin(equal)) if not equal.all() else NEW_TOKENS)
        agree.append(float(equal.mean()))
    ppl, ref_ppl = perplexity(lm), perplexity(ref)
    return {
        "reference": str(reference_dir), "prompts": len(PROMPTS), "new_tokens": NEW_TOKENS,
        "identical_continuations": same, "mean_common_prefix": float(np.mean(prefix)),
        "token_agreement": float(np.mean(agree)), "perplexity": ppl, "reference_perplexity": ref_ppl,
        "perplexity_ratio": ppl / ref_ppl,
    }


def quality_markdown(q: dict[str, Any]) -> str:
    return "\n".join([
        f"Quality against {Path(q['reference']).name} (greedy, {q['prompts']} prompts x {q['new_tokens']} tokens; "
        "perplexity on a fixed 150-word text):", "",
        "| identical continuations | mean common prefix | token agreement | perplexity | reference perplexity | ratio |",
        "|---|---|---|---|---|---|",
        f"| {q['identical_continuations']}/{q['prompts']} | {q['mean_common_prefix']:.1f} | {q['token_agreement']:.0%} | "
        f"{q['perplexity']:.2f} | {q['reference_perplexity']:.2f} | {q['perplexity_ratio']:.3f} |",
    ])
