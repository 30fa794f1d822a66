"""The greedy head (export.greedy_head): its bound holds on onnxruntime's real kernel, its pick is the full head's
argmax (ties included), and greedy search takes it only where nothing reads the logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

V, K = 512, 96


def _table(rng: np.random.Generator) -> np.ndarray:
    """Rows of mixed scales: outlier rows, a zero block, and rows 7 and 300 equal (exact ties)."""
    table = rng.standard_normal((V, K)).astype(np.float32) * 0.05
    table[rng.integers(0, V, 20)] *= 10
    table[11, 32:64] = 0
    table[7] = rng.standard_normal(K).astype(np.float32) * 0.5
    table[300] = table[7]
    return table


def _head_model(table: np.ndarray, tied: bool) -> onnx.ModelProto:
    """hidden -> logits through a float32 head: FusedMatMul over a (vocab, K) table or MatMul by (K, vocab)."""
    if tied:
        node = helper.make_node("FusedMatMul", ["hidden", "table"], ["logits"], domain="com.microsoft", transB=1,
                                alpha=1.0)
        weight = numpy_helper.from_array(table, "table")
    else:
        node = helper.make_node("MatMul", ["hidden", "table"], ["logits"])
        weight = numpy_helper.from_array(np.ascontiguousarray(table.T), "table")
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, None, K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, V])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _hidden(rng: np.random.Generator, rows: int) -> np.ndarray:
    h = rng.standard_normal((1, rows, K)).astype(np.float32) * rng.uniform(0.2, 20, (1, rows, 1)).astype(np.float32)
    spikes = rng.integers(0, K, rows)
    h[0, np.arange(rows), spikes] *= 40  # the outlier dimensions real hidden states have
    return h


@pytest.mark.parametrize("tied", [True, False])
def test_bound_holds_on_onnxruntimes_kernel_and_the_pick_is_the_argmax(tied):
    from edgelm.export import greedy_head

    rng = np.random.default_rng(0)
    table = _table(rng)
    model = _head_model(table, tied)
    report = greedy_head.add_greedy_head(model)
    assert report == {"bits": 8, "block_size": 32, "bytes": report["bytes"], "vocab": V}
    assert greedy_head.add_greedy_head(model) is None  # once only
    model.graph.output.extend([helper.make_tensor_value_info(f"greedy_head/{n}", TensorProto.FLOAT, None)
                               for n in ("approx", "bound")])
    sess = _session(model)
    h = _hidden(rng, 64)
    h[0, 0] = table[7] * 3  # rows 7 and 300 tie at the top: the pick must be the lower id
    full, ids0, cand0 = sess.run(["logits", "greedy_ids", "greedy_logits"], {"hidden": h})
    assert ids0.shape == (0,) and cand0.shape == (1, 0, 0)  # off by default: optimum's graph
    logits, ids, cand, approx, bound = sess.run(["logits", "greedy_ids", "greedy_logits", "greedy_head/approx",
                                                 "greedy_head/bound"], {"hidden": h, "greedy_head": np.array([1])})
    assert logits.shape == (1, 0, V) and cand.shape == (1, 64, ids.size)
    err = np.abs(full - approx)
    assert (err <= bound).all(), f"bound broken by {float((err - bound).max()):.3g}"
    # The activation term is needed: the weights' rounding alone (the last row of G, times |h|_1) is exceeded.
    weight_only = np.abs(h).sum(-1, keepdims=True) * (np.abs(table).reshape(V, -1, 32).max(-1).max(-1) / 254)
    assert (err > weight_only).any()
    top = cand == cand.max(-1, keepdims=True)
    picks = np.where(top, ids[None, None, :], V).min(-1)
    np.testing.assert_array_equal(picks, full.argmax(-1))
    assert picks[0, 0] == 7 and full[0, 0, 7] == full[0, 0, 300]
    np.testing.assert_allclose(cand, np.take_along_axis(full, np.broadcast_to(ids, cand.shape), -1), rtol=1e-5,
                               atol=1e-4)
    assert ids.size < 64 * V / 4  # the bound leaves a few candidates per position, not the vocabulary


def test_graphs_it_cannot_serve_are_left_alone():
    from edgelm.export import greedy_head

    rng = np.random.default_rng(1)
    odd = _head_model(rng.standard_normal((V, K)).astype(np.float32), True)
    odd.graph.initializer[0].CopyFrom(numpy_helper.from_array(rng.standard_normal((V, 40)).astype(np.float32), "table"))
    assert greedy_head.add_greedy_head(odd) is None  # 40 is no multiple of 32
    quantized = _head_model(rng.standard_normal((V, K)).astype(np.float32), True)
    quantized.graph.node[0].op_type = "Gemm"
    assert greedy_head.add_greedy_head(quantized) is None


def _recorded(lm) -> list[bool]:
    """Whether each session run of ``lm`` went through the greedy head."""
    calls: list[bool] = []
    run = lm.decoder._run

    def recording(*args, **kwargs):
        calls.append(bool(kwargs.get("greedy")))
        return run(*args, **kwargs)

    lm.decoder._run = recording
    return calls


def test_greedy_search_takes_the_head_only_where_nothing_reads_the_logits(exported, hf_model):
    import torch

    from conftest import left_pad
    from edgelm.runtime import CausalLM

    folder = exported("tiny-llama")
    lm = CausalLM.load(folder)
    assert lm.decoder.greedy_head and lm.manifest.validation["greedy_head"]["positions"] > 0
    model, _ = hf_model("tiny-llama")
    ids, mask = left_pad([[5, 17, 99, 3, 250, 8], [42, 7]], pad=0)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=20,
                             do_sample=False, pad_token_id=0).numpy()
    calls = _recorded(lm)
    np.testing.assert_array_equal(lm.generate(ids, mask, max_new_tokens=20, do_sample=False, pad_token_id=0), ref)
    assert calls and all(calls)  # prefill and every step
    calls.clear()
    out = lm.generate(ids, mask, max_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                      output_scores=True)
    np.testing.assert_array_equal(out.sequences, ref)
    assert calls and not any(calls)  # scores asked for: the full head
    calls.clear()
    lm.generate(ids, mask, max_new_tokens=4, do_sample=False, pad_token_id=0, repetition_penalty=1.3)
    lm.generate(ids, mask, max_new_tokens=4, do_sample=False, pad_token_id=0, stopping_criteria=[lambda i, s: False])
    assert calls and not any(calls)  # a processor, a caller's criterion (it may read the scores)


def _ban_cases(hf_model):
    """Two left-padded prompts, the generate settings, transformers' tokens under each ban-only setting, and those
    settings: min_new_tokens, suppress_tokens, bad_words_ids and no_repeat_ngram_size, each chosen so that it bans
    a token greedy search would otherwise pick (checked)."""
    import torch

    from conftest import left_pad

    model, _ = hf_model("tiny-llama")
    ids, mask = left_pad([[5, 17, 99, 3, 250, 8], [42, 7]], pad=0)
    common = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}

    def transformers(**kw):
        with torch.no_grad():
            return model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **common, **kw).numpy()

    plain = transformers(eos_token_id=None)
    first, third = int(plain[0, ids.shape[1]]), int(plain[0, ids.shape[1] + 2])
    cases = [{"min_new_tokens": 12, "eos_token_id": third}, {"suppress_tokens": [first], "eos_token_id": None},
             {"bad_words_ids": [[first]], "eos_token_id": None}, {"no_repeat_ngram_size": 1, "eos_token_id": None}]
    refs = []
    for kw in cases:
        ref = transformers(**kw)
        assert not np.array_equal(ref, plain[:, :ref.shape[1]]) or ref.shape != plain.shape, kw  # the ban bites
        refs.append(ref)
    return ids, mask, common, list(zip(cases, refs))


def test_greedy_search_keeps_the_head_under_processors_that_only_ban(exported, hf_model):
    """min_new_tokens, suppress_tokens, bad_words_ids and no_repeat_ngram_size only ban tokens, so greedy search
    keeps the head and asks them about its pick alone; a banned pick reruns that pass through the full head.
    The tokens are transformers' either way; each case here bans a pick at least once."""
    from edgelm.runtime import CausalLM

    lm = CausalLM.load(exported("tiny-llama"))
    ids, mask, common, cases = _ban_cases(hf_model)
    calls = _recorded(lm)
    for kw, ref in cases:
        calls.clear()
        np.testing.assert_array_equal(lm.generate(ids, mask, **common, **kw), ref, err_msg=str(kw))
        assert calls.count(True) >= 2 and False in calls, (kw, calls)  # the head, and a rerun for a banned pick


def test_greedy_search_without_the_head_asks_the_bans_about_its_argmax(exported, hf_model):
    """A graph without the head (quantized exports, --no-greedy-head) returns its logits; greedy search with
    ban-only processors takes their argmax, asks the processors about that token alone, and runs them over the
    logits only when they ban it. Tokens equal transformers' with each ban biting; the processors ran over
    logits on some steps, not all."""
    from edgelm.runtime import CausalLM
    from edgelm.runtime.processors import LogitsProcessorList

    lm = CausalLM.load(exported("tiny-llama", greedy_head=False))
    assert not lm.decoder.greedy_head
    ids, mask, common, cases = _ban_cases(hf_model)
    processed = []
    call = LogitsProcessorList.__call__

    def counting(self, input_ids, scores):
        processed.append(input_ids.shape[1])
        return call(self, input_ids, scores)

    LogitsProcessorList.__call__ = counting
    try:
        for kw, ref in cases:
            processed.clear()
            np.testing.assert_array_equal(lm.generate(ids, mask, **common, **kw), ref, err_msg=str(kw))
            assert 0 < len(processed) < ref.shape[1] - ids.shape[1], (kw, processed)
    finally:
        LogitsProcessorList.__call__ = call


def test_export_without_the_head_gives_the_same_tokens(exported):
    from edgelm.runtime import CausalLM

    with_head, without = CausalLM.load(exported("tiny-llama")), CausalLM.load(exported("tiny-llama", greedy_head=False))
    assert with_head.decoder.greedy_head and not without.decoder.greedy_head
    assert "greedy_head" not in without.manifest.validation and "greedy_head" not in without.manifest.inputs
    ids = np.array([[5, 17, 99, 3, 250, 8]])
    np.testing.assert_array_equal(with_head.generate(ids, max_new_tokens=24, do_sample=False),
                                  without.generate(ids, max_new_tokens=24, do_sample=False))


def test_quantized_exports_go_without(exported):
    from edgelm.runtime import CausalLM

    assert not CausalLM.load(exported("tiny-llama", quantize="int8")).decoder.greedy_head


def test_cli_leaves_it_out_on_request(tmp_path, checkpoint):
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "edgelm.cli", "export", str(checkpoint("tiny-gpt2")), str(out),
                           "--no-greedy-head"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "edgelm.json").read_text())
    assert "greedy_head" not in manifest["inputs"] and "greedy_head" not in manifest["validation"]
    assert "greedy head added" not in proc.stderr


def test_a_wrong_head_fails_the_export_and_writes_nothing(tmp_path, checkpoint, monkeypatch):
    """Validation runs the prompt through the head: codes of the wrong tokens (rows shifted by one) pick tokens
    PyTorch does not, and the export stops with nothing written."""
    from edgelm.export import api, greedy_head
    from edgelm.runtime.errors import ExportError

    real = greedy_head.quantize_rows
    monkeypatch.setattr(greedy_head, "quantize_rows", lambda table, block=32: tuple(
        np.roll(a, 1, axis=0) for a in real(table, block)))
    with pytest.raises(ExportError, match="greedy head failed its check against PyTorch"):
        api.export_model(checkpoint("tiny-gemma3"), tmp_path / "out", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []
