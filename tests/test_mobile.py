"""Device exports: ORT format, static shapes and quantized variants drive the same runtime and agree with model.onnx."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from edgelm.runtime import CausalLM
from edgelm.runtime.errors import ExportError, InputError, ModelLoadError, UnsupportedError

PROMPTS = ("hello world", "the cat sat on the")


def _feeds(sess, batch=2, past=3, new=4, vocab=50):
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(3, vocab, (batch, new)).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, past + new), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(past, past + new), (batch, 1)).astype(np.int64)
        else:
            shape = [batch, i.shape[1], past, i.shape[3]]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mobile_export_writes_ort_equal_to_onnx(arch, exported):
    folder = exported(f"tiny-{arch}", mobile=True)
    man = json.loads((folder / "edgelm.json").read_text())
    assert man["variants"] == {"ort": "model.ort"}
    ops = (folder / "required_operators.config").read_text()
    assert "ai.onnx;" in ops and "MatMul" in ops
    a = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(folder / "model.ort"), providers=["CPUExecutionProvider"])
    feeds = _feeds(a)
    for x, y in zip(a.run(None, feeds), b.run(None, feeds)):
        np.testing.assert_array_equal(x, y)


def test_runtime_loads_ort_and_generates_the_same_tokens(exported):
    folder = exported("tiny-llama", mobile=True)
    onnx_lm, ort_lm = CausalLM.load(folder), CausalLM.load(folder, model_file="model.ort")
    assert ort_lm.decoder.model_file == "model.ort"
    enc = onnx_lm.tokenizer(list(PROMPTS), padding_side="left")
    for kw in (dict(do_sample=False), dict(num_beams=3), dict(do_sample=True, top_p=0.8, seed=5)):
        np.testing.assert_array_equal(
            ort_lm.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=24, **kw),
            onnx_lm.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=24, **kw))


def test_model_file_errors(exported):
    folder = exported("tiny-llama")
    with pytest.raises(ModelLoadError, match="export with --mobile"):
        CausalLM.load(folder, model_file="model.ort")
    with pytest.raises(ModelLoadError, match="not a path"):
        CausalLM.load(folder, model_file="../x/model.onnx")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen2"])
def test_static_shapes_give_the_dynamic_models_tokens(arch, exported):
    dyn = CausalLM.load(exported(f"tiny-{arch}"))
    folder = exported(f"tiny-{arch}", static_max_length=64)
    static = CausalLM.load(folder)
    sess = static.decoder.session
    for i in sess.get_inputs() + sess.get_outputs():
        assert all(isinstance(d, int) for d in i.shape), (i.name, i.shape)
    assert [i.shape for i in sess.get_inputs() if i.name == "past_key_values.0.key"][0][2] == 64
    for prompt in PROMPTS:
        ids = dyn.tokenizer(prompt)["input_ids"]
        for kw in (dict(do_sample=False), dict(do_sample=True, temperature=0.7, top_k=20, seed=11),
                   dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2)):
            np.testing.assert_array_equal(static.generate(ids, max_new_tokens=40, **kw),
                                          dyn.generate(ids, max_new_tokens=40, **kw))


def test_static_shapes_assisted_and_prompt_lookup_match_greedy(exported):
    static = CausalLM.load(exported("tiny-llama", static_max_length=64))
    ids = static.tokenizer("the cat sat on the mat and the cat sat on the")["input_ids"]
    want = static.generate(ids, max_new_tokens=30, do_sample=False)
    np.testing.assert_array_equal(static.generate(ids, max_new_tokens=30, prompt_lookup_num_tokens=3), want)
    np.testing.assert_array_equal(static.generate(ids, max_new_tokens=30, assistant_model=static), want)


def test_static_shapes_limits_are_clear(exported):
    static = CausalLM.load(exported("tiny-llama", static_max_length=64))
    tok = static.tokenizer
    with pytest.raises(InputError, match="64 positions"):
        static.generate(np.full((1, 70), 5, np.int64), max_new_tokens=2)
    with pytest.warns(UserWarning, match="exceeds the model's 64 positions"):
        out = static.generate(np.full((1, 60), 5, np.int64), max_new_tokens=20)
    assert out.shape == (1, 64)
    with pytest.raises(UnsupportedError, match="static-shape"):
        static.generate(tok("hi")["input_ids"], num_beams=2, max_new_tokens=4)
    with pytest.raises(UnsupportedError, match="batch 1"):
        enc = tok(list(PROMPTS), padding_side="left")
        static.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=4)


def test_static_export_options_are_checked(checkpoint, tmp_path):
    from edgelm.export import export_model

    with pytest.raises(ExportError, match="at least 8"):
        export_model(checkpoint("tiny-llama"), tmp_path / "a", static_max_length=2)
    with pytest.raises(ExportError, match="causal LMs"):
        export_model(checkpoint("tiny-bert"), tmp_path / "b", static_max_length=32)
    with pytest.raises(ExportError, match="positions"):
        export_model(checkpoint("tiny-llama"), tmp_path / "c", static_max_length=10**6)
    assert not any(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "edgelm.cli", "export", str(checkpoint("tiny-llama")),
                           str(tmp_path / "d"), "--static-shapes"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--max-length" in proc.stderr


@pytest.mark.parametrize("scheme,op", [("int8", "MatMulNBits"), ("int4", "MatMulNBits"), ("int8-dynamic", "MatMulInteger")])
def test_quantized_mobile_static_variant(scheme, op, exported):
    """Quantization, static shapes and --mobile combine into one folder whose .ort runs like its .onnx."""
    folder = exported("tiny-llama", quantize=scheme, mobile=True, static_max_length=48)
    ops = (folder / "required_operators.config").read_text()
    assert op in ops
    man = json.loads((folder / "edgelm.json").read_text())
    assert man["validation"]["quantization"]["scheme"] == scheme
    lm = CausalLM.load(folder, model_file="model.ort")
    ids = lm.tokenizer("hello world")["input_ids"]
    out = lm.generate(ids, max_new_tokens=20, do_sample=False)
    ref = CausalLM.load(folder).generate(ids, max_new_tokens=20, do_sample=False)
    np.testing.assert_array_equal(out, ref)
    assert out.shape == (1, np.asarray(ids).shape[-1] + 20)


def test_provider_options_reach_onnxruntime_or_fall_back(exported):
    """(name, options) specs: options go to the provider; a missing provider warns with its package, then CPU runs."""
    from edgelm.runtime.session import resolve_providers

    assert resolve_providers(("cpu", {"arena_extend_strategy": "kSameAsRequested"})) == [
        ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    with pytest.warns(RuntimeWarning, match="XnnpackExecutionProvider.*onnxruntime-android"):
        lm = CausalLM.load(exported("tiny-llama"), provider=[("xnnpack", {"intra_op_num_threads": "1"}), "cpu"])
    assert lm.decoder.providers == ["CPUExecutionProvider"]
    for name in ("nnapi", "coreml", "qnn"):
        with pytest.warns(RuntimeWarning, match="Falling back to CPU"):
            assert resolve_providers(name) == [("CPUExecutionProvider", {})]


def test_cli_provider_options(exported):
    folder = exported("tiny-llama")
    ok = subprocess.run([sys.executable, "-m", "edgelm.cli", "generate", str(folder), "hello", "--max-new-tokens", "3",
                         "--provider", "cpu", "--provider-option", "arena_extend_strategy=kSameAsRequested", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["new_ids"][0]) == 3
    bad = subprocess.run([sys.executable, "-m", "edgelm.cli", "generate", str(folder), "hello", "--provider-option",
                          "novalue"], capture_output=True, text=True)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
