"""Diverse (group) beam search against transformers 4.55.4 ``generate``."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import CAUSAL, check_beams_against_transformers, check_tiny_beams, left_pad
from edgelm.runtime import CausalLM

SETTINGS = [
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.5, num_return_sequences=3, length_penalty=0.7),
    dict(num_beams=4, num_beam_groups=4, diversity_penalty=2.0, early_stopping=True),
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.5, early_stopping="never", repetition_penalty=1.2),
]


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_tiny_group_beam_search_matches_transformers(arch, setting, exported, hf_model):
    check_tiny_beams(arch, SETTINGS[setting], exported, hf_model)


@pytest.mark.real
def test_smollm2_group_beam_search_matches_transformers(exported, hf_model):
    model, tok = hf_model("smollm2-135m-instruct")
    lm = CausalLM.load(exported("smollm2-135m-instruct"))
    ids, mask = left_pad([tok("The capital of France is")["input_ids"],
                          tok("Three ideas for a birthday party:")["input_ids"]], pad=2)
    for setting in SETTINGS[:2]:
        check_beams_against_transformers(lm, model, ids, mask, max_new_tokens=24, **setting)


def test_groups_differ_from_each_other(exported):
    """With a strong diversity penalty, the groups' first new tokens are all different."""
    lm = CausalLM.load(exported("tiny-llama"))
    out = lm.generate(np.array([[5, 17, 99]]), max_new_tokens=6, num_beams=4, num_beam_groups=4,
                      diversity_penalty=100.0, num_return_sequences=4, eos_token_id=None)
    assert len(set(out[:, 3].tolist())) == 4
