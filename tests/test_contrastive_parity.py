"""Contrastive search against transformers 4.55.4 ``generate``.

The reference model uses eager attention: with SDPA, transformers leaves the hidden state of
left-padding positions at exactly zero, their cosine similarity becomes 0/0 = NaN, and the
padded row's output degenerates (e.g. one token repeated). Eager attention gives finite states
there; those positions are masked out of the penalty either way, and the padded row then
equals the same prompt run alone (checked below), which is the correct answer.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import CAUSAL, left_pad
from edgelm.runtime import CausalLM

SETTINGS = [dict(penalty_alpha=0.6, top_k=4), dict(penalty_alpha=0.3, top_k=8), dict(penalty_alpha=0.8, top_k=3),
            dict(penalty_alpha=0.5, top_k=5, repetition_penalty=1.2)]


def _hf(model, ids, mask, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            return model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), trust_remote_code=False,
                                  **kw).numpy()


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_tiny_contrastive_matches_transformers(arch, setting, exported, hf_model):
    model, _ = hf_model(f"tiny-{arch}", attn="eager")
    lm = CausalLM.load(exported(f"tiny-{arch}"))
    ids, mask = left_pad([[5, 17, 99, 3, 250, 8], [42, 7]], pad=0)
    kw = dict(SETTINGS[setting], max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    ref = _hf(model, ids, mask, **kw)
    np.testing.assert_array_equal(lm.generate(ids, mask, **kw), ref)
    alone = lm.generate(ids[1:, -2:], mask[1:, -2:], **kw)
    np.testing.assert_array_equal(alone[0], ref[1, -alone.shape[1]:])


@pytest.mark.real
def test_smollm2_contrastive_matches_transformers(exported, hf_model):
    model, tok = hf_model("smollm2-135m-instruct", attn="eager")
    lm = CausalLM.load(exported("smollm2-135m-instruct"))
    ids, mask = left_pad([tok("The capital of France is")["input_ids"],
                          tok("Once upon a time, a little robot")["input_ids"]], pad=2)
    for setting in SETTINGS[:3]:
        kw = dict(setting, max_new_tokens=32)
        np.testing.assert_array_equal(lm.generate(ids, mask, **kw), _hf(model, ids, mask, **kw))


def test_contrastive_refuses_graph_without_hidden_state(tmp_path, exported):
    """A folder whose graph lacks last_hidden_state (like optimum's) cannot run contrastive search, and says so."""
    import json
    import shutil

    import onnx

    from edgelm.runtime.errors import UnsupportedError

    folder = tmp_path / "m"
    shutil.copytree(exported("tiny-llama"), folder)
    model = onnx.load(str(folder / "model.onnx"))
    keep = [o for o in model.graph.output if o.name != "last_hidden_state"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(folder / "model.onnx"))
    man = json.loads((folder / "edgelm.json").read_text())
    man["outputs"] = [o.name for o in keep]
    (folder / "edgelm.json").write_text(json.dumps(man))
    lm = CausalLM.load(folder)
    assert lm.generate(np.array([[5, 6]]), max_new_tokens=3).shape == (1, 5)
    with pytest.raises(UnsupportedError, match="last_hidden_state"):
        lm.generate(np.array([[5, 6]]), max_new_tokens=3, penalty_alpha=0.6, top_k=4)
