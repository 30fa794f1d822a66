"""Bad input to the runtime: a clear edgelm error, never a numpy or onnxruntime traceback."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from edgelm.runtime import CausalLM, GenerationConfigError, InputError, MaskedLM, ModelLoadError, ProviderError


@pytest.fixture(scope="module")
def lm(exported):
    return CausalLM.load(exported("tiny-llama"))


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not an exported model"):
        CausalLM.load(tmp_path)
    with pytest.raises(ModelLoadError, match="not a folder"):
        CausalLM.load(tmp_path / "missing")


def test_missing_tokenizer(tmp_path, exported):
    folder = tmp_path / "m"
    shutil.copytree(exported("tiny-llama"), folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        CausalLM.load(folder)


def test_truncated_model_file(tmp_path, exported):
    folder = tmp_path / "m"
    shutil.copytree(exported("tiny-llama"), folder)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot load"):
        CausalLM.load(folder)


def test_newer_manifest_and_mismatched_manifest(tmp_path, exported):
    folder = tmp_path / "m"
    shutil.copytree(exported("tiny-llama"), folder)
    man = json.loads((folder / "edgelm.json").read_text())
    (folder / "edgelm.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(ModelLoadError, match="newer edgelm"):
        CausalLM.load(folder)
    (folder / "edgelm.json").write_text(json.dumps({**man, "num_layers": man["num_layers"] + 1}))
    with pytest.raises(ModelLoadError, match="layers"):
        CausalLM.load(folder)
    (folder / "edgelm.json").write_text(json.dumps({**man, "head_dim": man["head_dim"] * 2}))
    with pytest.raises(ModelLoadError, match="head size"):
        CausalLM.load(folder)


def test_tokenizer_from_another_model(tmp_path, exported):
    folder = tmp_path / "m"
    shutil.copytree(exported("tiny-bert"), folder)
    shutil.copy(exported("tiny-llama") / "tokenizer.json", folder / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="another model"):
        MaskedLM.load(folder)


def test_wrong_task(exported):
    with pytest.raises(ModelLoadError, match="MaskedLM"):
        CausalLM.load(exported("tiny-bert"))
    with pytest.raises(ModelLoadError, match="CausalLM"):
        MaskedLM.load(exported("tiny-llama"))


@pytest.mark.parametrize("ids,match", [
    (np.array([[1.5, 2.0]]), "integer"),
    (np.array([["a", "b"]]), "integer"),
    (np.zeros((1, 0), np.int64), "empty"),
    (np.zeros((1, 2, 3), np.int64), "shape"),
    (np.array([[5, -1]]), "outside the vocabulary"),
    (np.array([[5, 10 ** 6]]), "outside the vocabulary"),
    ([[1, 2], [3]], "rectangular|integer"),
    (None, "required"),
])
def test_bad_input_ids(lm, ids, match):
    with pytest.raises(InputError, match=match):
        lm.generate(ids, max_new_tokens=2)


def test_bad_attention_mask(lm):
    with pytest.raises(InputError, match="shape"):
        lm.generate(np.array([[5, 6]]), attention_mask=np.ones((1, 3)), max_new_tokens=2)
    with pytest.raises(InputError, match="0 and 1"):
        lm.generate(np.array([[5, 6]]), attention_mask=np.array([[2, 1]]), max_new_tokens=2)
    with pytest.raises(InputError, match="every token"):
        lm.generate(np.array([[5, 6]]), attention_mask=np.array([[0, 0]]), max_new_tokens=2)


def test_prompt_longer_than_context(lm):
    with pytest.raises(InputError, match="context is 256"):
        lm.generate(np.full((1, 300), 5), max_new_tokens=2)


def test_generation_stops_at_the_context(lm):
    with pytest.warns(UserWarning, match="exceeds the model's 256 positions"):
        out = lm.generate(np.full((1, 250), 5), max_new_tokens=50, eos_token_id=None)
    assert out.shape == (1, 256)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0), "divisible"),
    (dict(num_beams=4, diversity_penalty=1.0), "num_beam_groups"),
    (dict(penalty_alpha=0.6, top_k=4, do_sample=True), "penalty_alpha"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(not_a_setting=1), "unknown generation setting"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(bad_words_ids=[[10 ** 6]]), "outside the vocabulary"),
    (dict(bad_words_ids=[]), "bad_words_ids"),
])
def test_contradictory_or_bad_settings(lm, kwargs, match):
    with pytest.raises(GenerationConfigError, match=match):
        lm.generate(np.array([[5, 6]]), **({"max_new_tokens": 3} | kwargs))


def test_greedy_flags_warn_like_transformers(lm):
    with pytest.warns(UserWarning, match="do_sample` is set to `False`. However, `temperature`"):
        lm.generate(np.array([[5, 6]]), max_new_tokens=2, temperature=0.5)


def test_providers(exported):
    with pytest.raises(ProviderError, match="unknown execution provider"):
        CausalLM.load(exported("tiny-llama"), provider="warp-drive")
    for name, package in (("xnnpack", "onnxruntime-android"), ("nnapi", "onnxruntime-android"),
                          ("coreml", "macOS"), ("qnn", "onnxruntime-qnn"), ("cuda", "onnxruntime-gpu")):
        with pytest.warns(RuntimeWarning, match=package):
            lm = CausalLM.load(exported("tiny-llama"), provider=name)
        assert lm.decoder.providers == ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm = CausalLM.load(exported("tiny-llama"), provider=["cpu"], threads=1, optimization="basic")
    assert lm.generate(np.array([[5]]), max_new_tokens=2).shape == (1, 3)
    with pytest.raises(ProviderError, match="optimization"):
        CausalLM.load(exported("tiny-llama"), optimization="max")


def test_stop_strings_and_max_time(lm):
    ids = np.array([[5, 17, 99]])
    full = lm.generate(ids, max_new_tokens=30, eos_token_id=None)
    text = lm.tokenizer.decode(full[0, 3:])
    stop = text[10:13]
    out = lm.generate(ids, max_new_tokens=30, eos_token_id=None, stop_strings=stop)
    got = lm.tokenizer.decode(out[0, 3:])
    assert stop in got and out.shape[1] < full.shape[1]
    assert stop not in lm.tokenizer.decode(out[0, 3:-1])
    quick = lm.generate(ids, max_new_tokens=200, eos_token_id=None, max_time=1e-9)
    assert quick.shape[1] == 4


def test_finished_rows_are_padded(lm):
    ids = np.array([[5, 17, 99], [4, 4, 4]])
    free = lm.generate(ids, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 5])  # pretend the third generated token of row 0 is an end of sequence
    out = lm.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    row = out[0, 3:].tolist()
    first = row.index(eos)
    assert all(t == 0 for t in row[first + 1:])
