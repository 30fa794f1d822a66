"""Greedy search: token for token what transformers 4.55.4 ``generate`` produces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CAUSAL, left_pad
from edgelm.runtime import CausalLM

TINY_PROMPTS = ([5, 17, 99, 3, 250, 8], [42, 7])


def _hf_generate(model, ids, mask, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw)
    return out.numpy()


@pytest.mark.parametrize("arch", CAUSAL)
def test_tiny_greedy_matches_transformers(arch, exported, hf_model):
    model, _ = hf_model(f"tiny-{arch}")
    lm = CausalLM.load(exported(f"tiny-{arch}"))
    ids, mask = left_pad(list(TINY_PROMPTS), pad=0)
    # eos disabled so that the whole 40 tokens are compared, not the first eos of a random model
    ref = _hf_generate(model, ids, mask, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = lm.generate(ids, mask, max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(ours, ref)
    single = lm.generate(ids[:1], mask[:1], max_new_tokens=40, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(single, ref[:1])


@pytest.mark.real
def test_smollm2_greedy_matches_transformers(exported, hf_model):
    model, tok = hf_model("smollm2-135m-instruct")
    lm = CausalLM.load(exported("smollm2-135m-instruct"))
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
               "def fibonacci(n):", "Edge devices are"]
    for a, b in ((0, 1), (2, 3)):
        rows = [tok(p)["input_ids"] for p in (prompts[a], prompts[b])]
        ids, mask = left_pad(rows, pad=2)
        ref = _hf_generate(model, ids, mask, max_new_tokens=40, do_sample=False)
        ours = lm.generate(ids, mask, max_new_tokens=40)
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.real
def test_smollm2_chat_template_and_chat_greedy(exported, hf_model):
    model, tok = hf_model("smollm2-135m-instruct")
    lm = CausalLM.load(exported("smollm2-135m-instruct"))
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."},
         {"role": "assistant", "content": "Red, green, blue."}, {"role": "user", "content": "And two more?"}],
    ]
    for messages in conversations:
        for gen_prompt in (True, False):
            assert lm.tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False) == \
                tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
            assert lm.tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt) == \
                tok.apply_chat_template(messages, add_generation_prompt=gen_prompt)
    ids = np.array([tok.apply_chat_template(conversations[0], add_generation_prompt=True)], np.int64)
    ref = _hf_generate(model, ids, np.ones_like(ids), max_new_tokens=48, do_sample=False)
    np.testing.assert_array_equal(lm.generate(ids, max_new_tokens=48), ref)


def test_generate_text_and_return_dict(exported):
    lm = CausalLM.load(exported("tiny-llama"))
    text = lm.generate_text("The capital of France", max_new_tokens=8, eos_token_id=None)
    assert isinstance(text, str) and text
    enc = lm.tokenizer("The capital of France")
    out = lm.generate(enc["input_ids"], max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True,
                      output_scores=True)
    assert out.sequences.shape == (1, enc["input_ids"].shape[1] + 8)
    assert len(out.scores) == 8
    # greedy picks the argmax of the processed scores at each step
    np.testing.assert_array_equal(np.stack([s.argmax(-1) for s in out.scores], 1)[0],
                                  out.sequences[0, enc["input_ids"].shape[1]:])
    assert lm.tokenizer.decode(out.sequences[0, enc["input_ids"].shape[1]:]) == text
