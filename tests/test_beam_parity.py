"""Beam search and beam sampling against transformers 4.55.4 ``generate``."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import CAUSAL, check_beams_against_transformers, check_tiny_beams, left_pad
from edgelm.runtime import CausalLM

SETTINGS = [
    dict(num_beams=2),
    dict(num_beams=3, length_penalty=0.5, num_return_sequences=3),
    dict(num_beams=4, early_stopping=True, num_return_sequences=2),
    dict(num_beams=5, early_stopping="never", length_penalty=2.0),
    dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=4),
]


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_tiny_beam_search_matches_transformers(arch, setting, exported, hf_model):
    check_tiny_beams(arch, SETTINGS[setting], exported, hf_model, eos_list=True)


@pytest.mark.real
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_smollm2_beam_search_matches_transformers(setting, exported, hf_model):
    model, tok = hf_model("smollm2-135m-instruct")
    lm = CausalLM.load(exported("smollm2-135m-instruct"))
    ids, mask = left_pad([tok("The capital of France is")["input_ids"],
                          tok("Here is a short poem about the sea:")["input_ids"]], pad=2)
    check_beams_against_transformers(lm, model, ids, mask, max_new_tokens=24, **SETTINGS[setting])


def test_beam_sampling_reproduces_and_is_well_formed(exported):
    lm = CausalLM.load(exported("tiny-llama"))
    ids = np.array([[5, 17, 99, 3]], np.int64)
    kw = dict(num_beams=4, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=12, num_return_sequences=3,
              return_dict_in_generate=True, output_scores=True, eos_token_id=None)
    a = lm.generate(ids, seed=5, **kw)
    b = lm.generate(ids, seed=5, **kw)
    c = lm.generate(ids, seed=6, **kw)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert not np.array_equal(a.sequences, c.sequences)
    assert a.sequences.shape == (3, 16)
    assert np.all(np.diff(a.sequences_scores) <= 0)  # best hypothesis first
    for step, scores in enumerate(a.scores):  # top_k=20 with 2 tokens kept at least, over log-probs
        assert scores.shape == (4, 400) and (np.isfinite(scores).sum(-1) == 20).all()
