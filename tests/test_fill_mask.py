"""fill-mask: the same candidates and scores as transformers' fill-mask pipeline."""

from __future__ import annotations

import pytest

from edgelm.runtime import MaskedLM
from edgelm.runtime.errors import InputError


def _pipeline(hf_model, name):
    from transformers import pipeline

    model, tok = hf_model(name)
    return pipeline("fill-mask", model=model, tokenizer=tok, device="cpu")


def _compare(ours, theirs):
    if ours and isinstance(ours[0], list):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _compare(a, b)
        return
    assert [c["token"] for c in ours] == [c["token"] for c in theirs]
    for a, b in zip(ours, theirs):
        assert abs(a["score"] - b["score"]) < 1e-5
        assert a["token_str"] == b["token_str"]
        assert a["sequence"] == b["sequence"]


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
def test_tiny_fill_mask_matches_pipeline(arch, exported, hf_model):
    lm = MaskedLM.load(exported(f"tiny-{arch}"))
    pipe = _pipeline(hf_model, f"tiny-{arch}")
    m = lm.tokenizer.mask_token
    for text in (f"The capital of France is {m}.", f"{m} quick brown fox jumps", f"The {m} brown {m} jumps over."):
        for k in (1, 5):
            _compare(lm.fill_mask(text, top_k=k), pipe(text, top_k=k))


@pytest.mark.real
def test_antiberty_fill_mask_matches_pipeline(exported, hf_model):
    lm = MaskedLM.load(exported("antiberty"))
    pipe = _pipeline(hf_model, "antiberty")
    for text in ("E V Q L [MASK] E S G G G L V Q P G G S L R L S C A A S",
                 "Q V Q L V Q S G A E V K K P G [MASK] S V K V S C K A S",
                 "E V [MASK] L V E S [MASK] G G L"):
        _compare(lm.fill_mask(text, top_k=5), pipe(text, top_k=5))
    best = lm.fill_mask("E V Q L [MASK] E S G G G L V Q P G G S L R L S C A A S", top_k=1)[0]
    assert best["token_str"] in ("V", "L")  # a real antibody model knows the conserved framework residue


def test_fill_mask_errors(exported):
    lm = MaskedLM.load(exported("tiny-bert"))
    with pytest.raises(InputError, match="no mask token"):
        lm.fill_mask("no mask here")
    with pytest.raises(InputError, match="top_k"):
        lm.fill_mask("a [MASK]", top_k=0)
    with pytest.raises(InputError, match="at most"):
        lm.fill_mask("word " * 500 + "[MASK]")
