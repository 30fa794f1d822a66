"""Fused attention (GroupQueryAttention with packed q/k/v and its own rotary) and the file layout of large exports."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import CAUSAL, left_pad
from edgelm.runtime import CausalLM

FUSED = ("llama", "qwen2", "mistral")


def _ops(folder) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("arch", CAUSAL)
def test_llama_family_attention_is_fused(arch, exported):
    folder = exported(f"tiny-{arch}")
    man = json.loads((folder / "edgelm.json").read_text())
    ops = _ops(folder)
    layers = man["num_layers"]
    if arch in FUSED:
        assert man["attention"] == "GroupQueryAttention"
        assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 0 and ops["Softmax"] == 0
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        # optimum's inputs stay, position_ids included, although rotary now reads cache slots
        assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
        assert all(any(a.name == "do_rotary" and a.i == 1 for a in n.attribute)
                   for n in graph.node if n.op_type == "GroupQueryAttention")
    else:
        assert man["attention"] == "onnx" and ops["GroupQueryAttention"] == 0


@pytest.mark.parametrize("arch", FUSED)
def test_fused_and_plain_exports_agree(arch, exported):
    """Same greedy and beam tokens on a left-padded batch; logits within float32 noise."""
    fused = CausalLM.load(exported(f"tiny-{arch}"))
    plain = CausalLM.load(exported(f"tiny-{arch}", fuse=False))
    assert plain.manifest.attention == "onnx"
    ids, mask = left_pad([[5, 17, 99, 3, 250, 8], [42, 7]], pad=0)
    for kw in (dict(do_sample=False), dict(num_beams=3), dict(penalty_alpha=0.6, top_k=4)):
        np.testing.assert_array_equal(fused.generate(ids, mask, max_new_tokens=24, eos_token_id=None, **kw),
                                      plain.generate(ids, mask, max_new_tokens=24, eos_token_id=None, **kw))


def test_multi_token_chunks_on_a_batch_are_split(exported):
    """GroupQueryAttention takes one row when several tokens come on a past; the decoder splits the chunk."""
    fused = CausalLM.load(exported("tiny-llama")).decoder
    plain = CausalLM.load(exported("tiny-llama", fuse=False)).decoder
    assert fused.one_row_chunks and not plain.one_row_chunks
    ids, mask = left_pad([[5, 17, 99, 3], [42, 7, 8]], pad=0)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = {}
    for name, dec in (("fused", fused), ("plain", plain)):
        cache = dec.new_cache(2)
        dec.step(ids, mask, pos, cache)
        chunk = np.array([[11, 12, 13], [21, 22, 23]])
        full = np.concatenate([mask, np.ones_like(chunk)], 1)
        out[name] = dec.step(chunk, full, pos[:, -1:] + 1 + np.arange(3), cache, want_hidden=True)
        assert cache.length == 7
    np.testing.assert_allclose(out["fused"][0], out["plain"][0], atol=1e-4)
    np.testing.assert_allclose(out["fused"][1], out["plain"][1], atol=1e-4)


@pytest.mark.real
def test_smollm2_export_layout(exported):
    """Weights in model.onnx.data, the tied embedding stored once in float32 (beside the greedy head's 8-bit copy,
    about a byte a weight), attention fused; validation passed."""
    folder = exported("smollm2-135m-instruct")
    man = json.loads((folder / "edgelm.json").read_text())
    assert man["attention"] == "GroupQueryAttention" and man["validation"]["passed"]
    data = (folder / "model.onnx.data").stat().st_size
    assert (folder / "model.onnx").stat().st_size < 10 * 1024**2
    params = 134_515_008  # SmolLM2-135M: one 49152 x 576 embedding, shared with the LM head
    head = man["validation"]["greedy_head"]["bytes"]
    table = 49152 * 576
    assert table < head < 1.4 * table
    assert abs(data - 4 * params - head) < 0.01 * 4 * params
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert any(n.op_type == "FusedMatMul" and "logits" in n.output for n in model.graph.node)


def test_shared_buffer_cache_equals_concatenation(exported):
    """Past and present in one buffer (written in place) give the logits of present = concat(past, new),
    including when the buffer has to grow, after a crop, and after a beam reorder."""
    from edgelm.runtime.kv_cache import KVCache, SharedKVCache

    shared = CausalLM.load(exported("tiny-llama")).decoder
    concat = CausalLM.load(exported("tiny-llama")).decoder
    concat.shared_buffer = False
    assert shared.shared_buffer
    ids, mask = left_pad([[5, 17, 99, 3], [42, 7, 8]], pad=0)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    a, b = shared.new_cache(2, capacity=5), concat.new_cache(2)
    assert isinstance(a, SharedKVCache) and isinstance(b, KVCache)
    np.testing.assert_allclose(shared.step(ids, mask, pos, a)[0], concat.step(ids, mask, pos, b)[0], atol=1e-5)
    rng = np.random.default_rng(0)
    for step in range(12):
        tok = rng.integers(3, 300, size=(2, 1))
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        la, lb = shared.step(tok, mask, pos, a)[0], concat.step(tok, mask, pos, b)[0]
        np.testing.assert_allclose(la, lb, atol=1e-5)
        if step == 5:
            for cache in (a, b):
                cache.crop(cache.length - 2)
            mask, pos = mask[:, :-2], pos - 2
        if step == 8:
            for cache in (a, b):
                cache.reorder(np.array([1, 1]))
            mask, pos = mask[[1, 1]], pos[[1, 1]]
    assert a.length == b.length and a.capacity >= a.length > 5
    for x, y in zip(a.numpy(), b.numpy()):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_shared_buffer_steps_hand_back_arrays_the_caller_keeps(exported):
    """A kept binding (the shared-buffer cache binds once and reruns) hands back logits and hidden states as
    views of onnxruntime's outputs: an array a caller keeps (recorded scores, contrastive search's hidden
    states) must not change under later steps, and must hold what a fresh, unbound run gives. Guards any
    change that would let onnxruntime write into reused output buffers."""
    shared = CausalLM.load(exported("tiny-llama")).decoder
    fresh = CausalLM.load(exported("tiny-llama")).decoder
    fresh.shared_buffer = False
    ids = np.array([[5, 17, 99, 3]])
    mask = np.ones_like(ids)
    pos = np.arange(4)[None]
    a, b = shared.new_cache(1), fresh.new_cache(1)
    kept = []
    for step in range(4):
        la, ha = shared.step(ids, mask, pos, a, want_hidden=True, keep=1)
        lb, hb = fresh.step(ids, mask, pos, b, want_hidden=True, keep=1)
        np.testing.assert_allclose(la, lb, atol=1e-5)
        np.testing.assert_allclose(ha, hb, atol=1e-5)
        assert la.shape == (1, 1, shared.manifest.vocab_size) and ha.shape[:2] == ids.shape
        # one more token on both, without asking for the hidden state: the kept binding still computes it
        # (its outputs keep their places) but hands back None
        assert shared.step(np.array([[7]]), np.ones((1, a.length + 1), np.int64), np.array([[a.length]]), a)[1] is None
        fresh.step(np.array([[7]]), np.ones((1, b.length + 1), np.int64), np.array([[b.length]]), b)
        kept.append((la, la.copy(), ha, ha.copy()))
        ids = np.array([[int(np.argmax(la[0, -1]))]])
        mask = np.ones((1, a.length + 1), np.int64)
        pos = np.array([[a.length]])
    for logits, logits_then, hidden, hidden_then in kept:
        np.testing.assert_array_equal(logits, logits_then)
        np.testing.assert_array_equal(hidden, hidden_then)
    assert not any(np.shares_memory(kept[i][0], kept[j][0]) for i in range(4) for j in range(i + 1, 4))


def test_reused_outputs_are_written_in_place_and_kept_apart_from_returned_scores(exported):
    """A loop that reads each step's logits once (greedy search's argmax) hands the decoder ``ReusedOutputs``:
    onnxruntime then writes every step's logits into the same array, which must hold exactly what a run without
    it returns. A loop that returns scores or logits (``output_scores``) must never get those buffers: each
    recorded step keeps its own array, equal to the same generation's without any recording."""
    from edgelm.runtime.decoder import ReusedOutputs

    lm = CausalLM.load(exported("tiny-llama"))
    dec = lm.decoder
    assert dec.reusable and dec.shared_buffer
    reuse = ReusedOutputs()
    a, b = dec.new_cache(1), dec.new_cache(1)
    ids, first = np.array([[5, 17, 99, 3]]), None
    for step in range(5):
        mask, pos = np.ones((1, a.length + ids.shape[1]), np.int64), np.arange(a.length, a.length + ids.shape[1])[None]
        la = dec.step(ids, mask, pos, a, keep=1, reuse=reuse)[0]
        lb = dec.step(ids, mask, pos, b, keep=1)[0]
        np.testing.assert_array_equal(la, lb)
        first = la if first is None else first
        assert np.shares_memory(la, first) and not np.shares_memory(lb, first)
        ids = np.array([[int(np.argmax(lb[0, -1]))]])
    prompt = np.array([[5, 17, 99, 3]])
    kw = dict(max_new_tokens=6, do_sample=True, top_k=0, return_dict_in_generate=True, seed=3)
    plain = lm.generate(prompt, **kw)
    recorded = lm.generate(prompt, output_scores=True, output_logits=True, **kw)
    np.testing.assert_array_equal(plain.sequences, recorded.sequences)
    logits = recorded.logits
    assert len(logits) == 6 and not any(np.shares_memory(logits[i], logits[j]) for i in range(6) for j in range(i))
    seq = recorded.sequences
    for i in range(6):  # each recorded step still holds its own position's logits, recomputed from scratch here
        n = prompt.shape[1] + i
        fresh = dec.step(seq[:, :n], np.ones((1, n), np.int64), np.arange(n)[None], dec.new_cache(1), keep=1)[0]
        np.testing.assert_allclose(logits[i], fresh[:, -1], atol=1e-4)
