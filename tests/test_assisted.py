"""Assisted decoding and prompt lookup: exactly greedy output with any draft, and transformers' output."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import CAUSAL
from edgelm.runtime import CausalLM, GenerationConfigError
from edgelm.runtime.errors import UnsupportedError

PROMPT = np.array([[5, 17, 99, 3, 5, 17, 99, 3, 5, 17, 250, 8]], np.int64)


@pytest.mark.parametrize("arch", CAUSAL)
def test_any_draft_gives_greedy_output(arch, exported):
    lm = CausalLM.load(exported(f"tiny-{arch}"))
    greedy = lm.generate(PROMPT, max_new_tokens=30, eos_token_id=None)
    eos = int(greedy[0, PROMPT.shape[1] + 18])
    greedy_eos = lm.generate(PROMPT, max_new_tokens=30, eos_token_id=eos)
    drafts = [CausalLM.load(exported(f"tiny-{d}")) for d in ("gpt2", arch)]  # a poor draft and a perfect one
    for kw in [dict(assistant_model=drafts[0]), dict(assistant_model=drafts[1]),
               dict(assistant_model=drafts[0], num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic"),
               dict(prompt_lookup_num_tokens=4), dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=3),
               dict(prompt_lookup_num_tokens=6, num_assistant_tokens_schedule="heuristic")]:
        np.testing.assert_array_equal(lm.generate(PROMPT, max_new_tokens=30, eos_token_id=None, **kw), greedy)
        np.testing.assert_array_equal(lm.generate(PROMPT, max_new_tokens=30, eos_token_id=eos, **kw), greedy_eos)
    # On PROMPT heuristic lookup mostly finds no match that has held 3 tokens; after a copy of the prompt it drafts
    # (rejected on some architectures, accepted whole on others) and must still give greedy's output.
    copy = np.concatenate([greedy[0], PROMPT[0]])[None]
    looked_up = lm.generate(copy, max_new_tokens=30, eos_token_id=None, prompt_lookup_num_tokens=6,
                            num_assistant_tokens_schedule="heuristic")
    assert lm.last_assisted_stats["candidates"] >= 6  # the copy held 12 tokens: a whole first draft
    np.testing.assert_array_equal(looked_up, lm.generate(copy, max_new_tokens=30, eos_token_id=None))
    # A random tiny model doubts all its tokens: without the confidence stop, a perfect draft is always right.
    lm.generate(PROMPT, max_new_tokens=30, eos_token_id=None, assistant_model=drafts[1], assistant_confidence_threshold=0)
    stats = lm.last_assisted_stats
    assert stats["accepted"] == stats["candidates"] and stats["target_passes"] < 5  # a perfect draft is always right


def test_draft_stops_after_a_token_it_doubts(exported):
    """assistant_confidence_threshold (transformers' ConfidenceCriteria): 1.0 stops every draft after one token, 0
    never stops early; the output is greedy's either way."""
    lm, draft = CausalLM.load(exported("tiny-llama")), CausalLM.load(exported("tiny-gpt2"))
    greedy = lm.generate(PROMPT, max_new_tokens=20, eos_token_id=None)
    drafted = {}
    for threshold in (1.0, 0.0):
        out = lm.generate(PROMPT, max_new_tokens=20, eos_token_id=None, assistant_model=draft, num_assistant_tokens=5,
                          assistant_confidence_threshold=threshold)
        np.testing.assert_array_equal(out, greedy)
        drafted[threshold] = lm.last_assisted_stats
    assert drafted[1.0]["candidates"] <= drafted[1.0]["target_passes"]  # one draft token per pass at most
    assert drafted[0.0]["candidates"] > 3 * drafted[0.0]["target_passes"]  # 5 per pass, fewer only near the end


def test_matches_transformers_assisted_and_prompt_lookup(exported, hf_model):
    model, _ = hf_model("tiny-llama")
    draft_hf, _ = hf_model("tiny-gpt2")
    lm, draft = CausalLM.load(exported("tiny-llama")), CausalLM.load(exported("tiny-gpt2"))
    for ours_kw, hf_kw in ((dict(prompt_lookup_num_tokens=3), dict(prompt_lookup_num_tokens=3)),
                           (dict(assistant_model=draft), dict(assistant_model=draft_hf))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                ref = model.generate(torch.from_numpy(PROMPT), attention_mask=torch.ones(PROMPT.shape, dtype=torch.long),
                                     max_new_tokens=25, eos_token_id=None, pad_token_id=0, **hf_kw).numpy()
        np.testing.assert_array_equal(lm.generate(PROMPT, max_new_tokens=25, eos_token_id=None, **ours_kw), ref)


@pytest.mark.real
def test_smollm2_prompt_lookup_and_self_draft(exported, hf_model):
    model, tok = hf_model("smollm2-135m-instruct")
    lm = CausalLM.load(exported("smollm2-135m-instruct"))
    text = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"
    ids = np.array([tok(text)["input_ids"]], np.int64)
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(ids), max_new_tokens=32, do_sample=False, prompt_lookup_num_tokens=5).numpy()
    np.testing.assert_array_equal(lm.generate(ids, max_new_tokens=32, prompt_lookup_num_tokens=5), ref)
    np.testing.assert_array_equal(lm.generate(ids, max_new_tokens=32, assistant_model=lm), ref)


def test_assisted_errors(exported):
    lm = CausalLM.load(exported("tiny-llama"))
    with pytest.raises(GenerationConfigError, match="another vocabulary"):
        lm.generate(PROMPT, max_new_tokens=3, assistant_model=_FakeVocab(CausalLM.load(exported("tiny-llama"))))
    with pytest.raises(GenerationConfigError, match="batch size 1"):
        lm.generate(np.repeat(PROMPT, 2, 0), max_new_tokens=3, prompt_lookup_num_tokens=2)
    with pytest.raises(GenerationConfigError, match="greedy search or sampling"):
        lm.generate(PROMPT, max_new_tokens=3, prompt_lookup_num_tokens=2, num_beams=2)
    with pytest.raises(GenerationConfigError, match="either assistant_model or prompt_lookup"):
        lm.generate(PROMPT, max_new_tokens=3, prompt_lookup_num_tokens=2, assistant_model=lm)


class _FakeVocab:
    """A draft whose vocabulary differs (as a model with another tokenizer would)."""

    def __init__(self, lm):
        self._lm = lm

    def __getattr__(self, name):
        return getattr(self._lm, name)

    @property
    def vocab_size(self):
        return self._lm.vocab_size + 1


def test_speculative_acceptance_keeps_the_target_distribution():
    """Chi-square: draft ~ q, accept/resample against p; the first emitted token is distributed as p."""
    from scipy import stats

    from edgelm.runtime.processors import softmax
    from edgelm.runtime.strategies.assisted import speculative_accept
    from edgelm.runtime.strategies.sampling import sample_token

    gen = np.random.default_rng(0)
    q_scores = gen.standard_normal((1, 12)).astype(np.float32) * 2
    p_scores = gen.standard_normal((2, 12)).astype(np.float32) * 2
    q, p = softmax(q_scores)[0], softmax(p_scores)[0]
    rng = np.random.default_rng(1)
    firsts = []
    for _ in range(20000):
        draft = sample_token(q[None], rng)
        firsts.append(int(speculative_accept(draft, q_scores, p_scores, False, rng)[0]))
    counts = np.bincount(firsts, minlength=12)
    expected = p.astype(np.float64) / p.sum(dtype=np.float64) * counts.sum()
    assert stats.chisquare(counts, expected)[1] > 1e-3


@pytest.mark.parametrize("kind", ["draft", "lookup"])
def test_assisted_sampling_reproduces_and_scores_match_transformers(kind, exported, hf_model):
    """Seeded runs repeat; each step's processed scores equal transformers' processors on the target's logits."""
    from transformers import GenerationConfig as HFConfig

    lm = CausalLM.load(exported("tiny-llama"))
    kw = dict(assistant_model=CausalLM.load(exported("tiny-llama"))) if kind == "draft" else dict(prompt_lookup_num_tokens=3)
    settings = dict(do_sample=True, top_k=20, temperature=0.7, repetition_penalty=1.1)
    a = lm.generate(PROMPT, max_new_tokens=20, eos_token_id=None, seed=3, return_dict_in_generate=True,
                    output_scores=True, **settings, **kw)
    b = lm.generate(PROMPT, max_new_tokens=20, eos_token_id=None, seed=3, **settings, **kw)
    np.testing.assert_array_equal(a.sequences, b)
    assert a.sequences.shape == (1, PROMPT.shape[1] + 20) and len(a.scores) == 20
    model, _ = hf_model("tiny-llama")
    hf_cfg = HFConfig(eos_token_id=None, pad_token_id=0, **settings)
    seq = torch.from_numpy(a.sequences)
    procs = model._get_logits_processor(hf_cfg, input_ids_seq_length=PROMPT.shape[1],
                                        encoder_input_ids=seq, device="cpu")
    with torch.no_grad():
        logits = model(seq).logits[0]
    for step, ours in enumerate(a.scores):
        at = PROMPT.shape[1] + step
        theirs = procs(seq[:, :at], logits[at - 1][None].clone()).numpy()
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
        finite = np.isfinite(theirs)
        assert np.abs(ours[finite] - theirs[finite]).max() < 1e-3
        assert np.isfinite(ours[0, a.sequences[0, at]])  # the emitted token was allowed by the processed scores


def test_prompt_lookup_drafts_from_the_place_being_copied():
    """Among the matches of the tail n-gram, the draft follows the one whose earlier tokens agree longest with the
    sequence (the place an answer is copying); with no agreement beyond the n-gram, the first match, as in
    transformers."""
    from edgelm.runtime.strategies.assisted import PromptLookupCandidates

    lookup = PromptLookupCandidates(3, 2, eos=[])
    #            first "7 8" -> 1 2 3        copied context "4 5 7 8" -> 9 9 9   the answer so far ends "4 5 7 8"
    seq = np.array([7, 8, 1, 2, 3, 0, 4, 5, 7, 8, 9, 9, 9, 0, 6, 4, 5, 7, 8], np.int64)
    draft, _ = lookup.get(seq, limit=10)
    np.testing.assert_array_equal(draft, [9, 9, 9])
    seq = np.array([7, 8, 1, 2, 3, 0, 6, 7, 8, 9, 9, 9, 0, 5, 7, 8], np.int64)  # no match agrees before "7 8"
    draft, _ = lookup.get(seq, limit=10)
    np.testing.assert_array_equal(draft, [1, 2, 3])
    draft, _ = lookup.get(seq, limit=2)
    np.testing.assert_array_equal(draft, [1, 2])


def test_prompt_lookup_length_follows_the_heuristic_schedule():
    """Under num_assistant_tokens_schedule="heuristic" the lookup drafts 2 more tokens after a draft accepted whole
    and 1 fewer (at least 1) after a miss; a round without a match changes nothing; "constant" keeps the length."""
    from edgelm.runtime.strategies.assisted import PromptLookupCandidates

    seq = np.array(list(range(1, 21)) + [0] + list(range(1, 9)), np.int64)  # the copy of 1..8 has held for 8 tokens
    lookup = PromptLookupCandidates(4, 2, eos=[], schedule="heuristic")
    assert len(lookup.get(seq, limit=50)[0]) == 4
    lookup.update(4, 4)
    assert len(lookup.get(seq, limit=50)[0]) == 6
    lookup.update(2, 6)
    lookup.update(0, 0)
    assert len(lookup.get(seq, limit=50)[0]) == 5
    for _ in range(10):
        lookup.update(0, 5)
    assert len(lookup.get(seq, limit=50)[0]) == 1
    constant = PromptLookupCandidates(4, 2, eos=[])
    constant.update(4, 4)
    assert len(constant.get(seq, limit=50)[0]) == 4


def test_heuristic_prompt_lookup_drafts_no_further_than_the_match_has_held():
    """Under the heuristic schedule a match is drafted for at most as many tokens as it has held (n-gram plus the
    agreeing tokens before it), and not at all below MIN_HELD; the constant schedule drafts as transformers does."""
    from edgelm.runtime.strategies.assisted import PromptLookupCandidates

    held_5 = np.array([9, 1, 2, 3, 4, 5] + list(range(6, 30)) + [0, 7, 1, 2, 3, 4, 5], np.int64)
    lookup = PromptLookupCandidates(10, 2, eos=[], schedule="heuristic")
    assert lookup.get(held_5, limit=50)[0].tolist() == [6, 7, 8, 9, 10]  # "1 2 3 4 5" held, not the 9 or 7 before
    chance = np.array([1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 1, 2], np.int64)  # "1 2" recurs with nothing before agreeing
    assert len(lookup.get(chance, limit=50)[0]) == 0
    assert lookup.get(chance[:-1], limit=50)[0].size == 0  # a lone unigram match holds 1 token
    constant = PromptLookupCandidates(10, 2, eos=[])
    assert constant.get(held_5, limit=50)[0].tolist() == list(range(6, 16))
    assert constant.get(chance, limit=50)[0].tolist() == [3, 4, 5, 6, 7, 8, 0, 9, 1, 2]


@pytest.mark.parametrize("options", [{}, {"quantize": "int4"}])
def test_stable_rows_make_a_token_the_same_in_any_pass(options, exported):
    """stable_rows: a one-token pass gives bit for bit the logits that the same token gets inside a longer pass,
    so drafted runs reproduce greedy's scores, not just its tokens, and cached turns equal one whole-history
    pass. Without it a one-token pass takes onnxruntime's single-row kernel in attention (last-bit
    differences that int8 activations can grow; benchmarks/verify_rows.py)."""
    folder = exported("tiny-llama", **options)
    lm = CausalLM.load(folder, stable_rows=True)
    decoder = lm.decoder
    ids = np.concatenate([PROMPT, PROMPT[:, :6]], axis=1)
    n, extra = PROMPT.shape[1], 6
    whole, _ = decoder.step(ids, np.ones((1, n + extra), np.int64), np.arange(n + extra)[None], decoder.new_cache(1))
    cache = decoder.new_cache(1)
    decoder.step(PROMPT, np.ones((1, n), np.int64), np.arange(n)[None], cache)
    for t in range(extra):  # one token at a time on top of the cached prompt
        one, _ = decoder.step(ids[:, n + t: n + t + 1], np.ones((1, n + t + 1), np.int64), np.array([[n + t]]), cache)
        assert one.shape == (1, 1, whole.shape[-1]) and cache.length == n + t + 1
        np.testing.assert_array_equal(one[0, 0], whole[0, n + t])
    # The model's last position has no slot after it for the second row: fed alone, as without the option.
    last = lm.manifest.max_position_embeddings - 1
    tail = np.arange(last + 1)[None] % 200 + 5
    cache = decoder.new_cache(1)
    decoder.step(tail[:, :last], np.ones((1, last), np.int64), np.arange(last)[None], cache)
    one, _ = decoder.step(tail[:, last:], np.ones((1, last + 1), np.int64), np.array([[last]]), cache)
    plain = CausalLM.load(folder).decoder
    plain_cache = plain.new_cache(1)
    plain.step(tail[:, :last], np.ones((1, last), np.int64), np.arange(last)[None], plain_cache)
    expected, _ = plain.step(tail[:, last:], np.ones((1, last + 1), np.int64), np.array([[last]]), plain_cache)
    np.testing.assert_array_equal(one, expected)
    assert cache.length == last + 1
    draft = CausalLM.load(exported("tiny-gpt2"))
    kw = dict(max_new_tokens=16, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    greedy = lm.generate(ids, **kw)
    for extra_kw in (dict(prompt_lookup_num_tokens=4), dict(assistant_model=draft, num_assistant_tokens=3)):
        drafted = lm.generate(ids, **kw, **extra_kw)
        assert lm.last_assisted_stats["candidates"] > 0  # the target did read several tokens per pass
        np.testing.assert_array_equal(drafted.sequences, greedy.sequences)
        for a, b in zip(drafted.scores, greedy.scores):
            if options:
                # Bit for bit on the hosts of earlier runs; on an AVX2 host onnxruntime's 4-bit
                # kernels still move a verify pass's rows in their last bits (~1e-6): the tokens are exact
                # (above), the scores to float32 rounding.
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
            else:
                np.testing.assert_array_equal(a, b)
    # The second row is dropped: tokens and their count are plain greedy's on a float32 graph, where only
    # last bits move.
    if not options:
        plain = CausalLM.load(folder).generate(ids, **kw)
        np.testing.assert_array_equal(plain.sequences, greedy.sequences)


def test_stable_rows_need_fused_attention_and_change_nothing_on_static_exports(exported, monkeypatch):
    with pytest.raises(UnsupportedError, match="GroupQueryAttention.*--no-fuse"):
        CausalLM.load(exported("tiny-llama", fuse=False), stable_rows=True)
    monkeypatch.setenv("EDGELM_KV_SHARED_BUFFER", "0")  # a copy of the cache per step: refused, with the way out
    with pytest.raises(UnsupportedError, match="EDGELM_KV_SHARED_BUFFER=0.*unset it"):
        CausalLM.load(exported("tiny-llama"), stable_rows=True)
    monkeypatch.delenv("EDGELM_KV_SHARED_BUFFER")
    static = exported("tiny-llama", static_max_length=64)
    expected = CausalLM.load(static).generate(PROMPT, max_new_tokens=8, eos_token_id=None)
    np.testing.assert_array_equal(CausalLM.load(static, stable_rows=True).generate(PROMPT, max_new_tokens=8,
                                                                                   eos_token_id=None), expected)
