"""Logits processors and warpers: the same scores as transformers' on the same inputs, and sound sampling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers.generation import logits_process as hf

from edgelm.runtime import processors as ours
from edgelm.runtime.config import GenerationConfig
from edgelm.runtime.processors import build_processors

VOCAB = 300
EOS = [2, 7]


def _inputs(seed: int, rows: int = 3, length: int = 12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(rows, length)).astype(np.int64)
    ids[:, -3:] = ids[:, 2:5]  # a repeated trigram, so n-gram bans and bad-word prefixes trigger
    scores = (rng.standard_normal((rows, VOCAB)) * 3).astype(np.float32)
    return ids, scores


def _logsm(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def assert_same_scores(mine: np.ndarray, theirs: np.ndarray) -> None:
    assert not np.isnan(mine).any()
    # Where transformers produces NaN (-inf + inf in ExponentialDecayLengthPenalty on a banned EOS) we keep -inf.
    theirs = np.where(np.isnan(theirs), -np.inf, theirs)
    np.testing.assert_array_equal(np.isneginf(mine), np.isneginf(theirs))
    finite = np.isfinite(theirs)
    assert np.abs(_logsm(mine)[finite] - _logsm(theirs)[finite]).max() < 1e-5
    assert np.abs(mine[finite] - theirs[finite]).max() < 1e-4


PAIRS = [
    ("temperature", lambda: ours.TemperatureLogitsWarper(0.7), lambda: hf.TemperatureLogitsWarper(0.7)),
    ("top_k", lambda: ours.TopKLogitsWarper(10), lambda: hf.TopKLogitsWarper(10)),
    ("top_k_keep", lambda: ours.TopKLogitsWarper(1, 3), lambda: hf.TopKLogitsWarper(1, min_tokens_to_keep=3)),
    ("top_p", lambda: ours.TopPLogitsWarper(0.8), lambda: hf.TopPLogitsWarper(0.8)),
    ("top_p_small", lambda: ours.TopPLogitsWarper(0.05, 2), lambda: hf.TopPLogitsWarper(0.05, min_tokens_to_keep=2)),
    ("top_p_wide", lambda: ours.TopPLogitsWarper(0.999), lambda: hf.TopPLogitsWarper(0.999)),
    ("min_p", lambda: ours.MinPLogitsWarper(0.1), lambda: hf.MinPLogitsWarper(0.1)),
    ("typical_p", lambda: ours.TypicalLogitsWarper(0.9), lambda: hf.TypicalLogitsWarper(0.9)),
    ("epsilon", lambda: ours.EpsilonLogitsWarper(3e-3), lambda: hf.EpsilonLogitsWarper(3e-3)),
    ("eta", lambda: ours.EtaLogitsWarper(3e-3), lambda: hf.EtaLogitsWarper(3e-3)),
    ("repetition", lambda: ours.RepetitionPenaltyLogitsProcessor(1.3), lambda: hf.RepetitionPenaltyLogitsProcessor(1.3)),
    ("no_repeat_ngram", lambda: ours.NoRepeatNGramLogitsProcessor(3), lambda: hf.NoRepeatNGramLogitsProcessor(3)),
    ("min_length", lambda: ours.MinLengthLogitsProcessor(20, EOS), lambda: hf.MinLengthLogitsProcessor(20, EOS)),
    ("min_new_tokens", lambda: ours.MinNewTokensLengthLogitsProcessor(8, 10, EOS),
     lambda: hf.MinNewTokensLengthLogitsProcessor(8, 10, EOS)),
    ("suppress", lambda: ours.SuppressTokensLogitsProcessor([1, 5, 9]), lambda: hf.SuppressTokensLogitsProcessor([1, 5, 9])),
    ("begin_suppress", lambda: ours.SuppressTokensAtBeginLogitsProcessor([4, 6], 12),
     lambda: hf.SuppressTokensAtBeginLogitsProcessor([4, 6], 12)),
    ("forced_bos_inactive", lambda: ours.ForcedBOSTokenLogitsProcessor(3), lambda: hf.ForcedBOSTokenLogitsProcessor(3)),
    ("forced_eos", lambda: ours.ForcedEOSTokenLogitsProcessor(13, EOS), lambda: hf.ForcedEOSTokenLogitsProcessor(13, EOS)),
    ("exp_decay", lambda: ours.ExponentialDecayLengthPenalty((2, 1.5), EOS, 8),
     lambda: hf.ExponentialDecayLengthPenalty((2, 1.5), EOS, 8)),
    ("renormalize", lambda: ours.LogitNormalization(), lambda: hf.LogitNormalization()),
]


@pytest.mark.parametrize("name,make_ours,make_theirs", PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processor_matches_transformers(name, make_ours, make_theirs, seed):
    ids, scores = _inputs(seed)
    mine = make_ours()(ids, scores.copy())
    theirs = make_theirs()(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()
    assert_same_scores(mine, theirs)


def test_forced_bos_at_first_position():
    ids = np.array([[0]], np.int64)
    scores = np.zeros((1, 10), np.float32)
    out = ours.ForcedBOSTokenLogitsProcessor(4)(ids, scores)
    assert out[0, 4] == 0 and np.isneginf(np.delete(out[0], 4)).all()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers_at_every_size_and_length(n):
    """The bans come from one array comparison over every n-gram start: from lengths where no n-gram is complete
    yet, through the first complete one, to sequences over a small vocabulary where n-grams repeat often,
    they equal transformers' loop. Some case must ban, so the comparison is not of two untouched rows."""
    rng = np.random.default_rng(n)
    banned_any = False
    for length in range(0, 3 * n + 6):
        ids = rng.integers(0, 4, size=(3, length)).astype(np.int64)  # 4 tokens: repeats everywhere
        scores = rng.standard_normal((3, VOCAB)).astype(np.float32)
        mine = ours.NoRepeatNGramLogitsProcessor(n)(ids, scores.copy())
        theirs = hf.NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(ids), torch.from_numpy(scores.copy())).numpy()
        assert_same_scores(mine, theirs)
        banned_any |= bool(np.isneginf(mine).any())
    assert banned_any


@pytest.mark.parametrize("seed", [0, 1])
def test_bad_words_match_transformers(seed):
    ids, scores = _inputs(seed)
    bad = [[11], [int(ids[0, 3]), int(ids[0, 4])], [int(ids[1, -2]), int(ids[1, -1]), 13], [7]]
    mine = ours.NoBadWordsLogitsProcessor(bad, EOS)(ids, scores)
    theirs = hf.NoBadWordsLogitsProcessor(bad, EOS)(torch.from_numpy(ids), torch.from_numpy(scores)).numpy()
    assert_same_scores(mine, theirs)
    assert np.isneginf(mine[:, 11]).all() and not np.isneginf(mine[:, 7]).any()  # eos is never banned alone


BANS = [  # (processor, input length at which it bans): every ban-only processor; the length-bound ones stop a step later
    ("no_repeat_ngram", lambda: ours.NoRepeatNGramLogitsProcessor(3), 12),
    ("bad_words", lambda: ours.NoBadWordsLogitsProcessor([[11], [5, 5], [0, 0, 13]], EOS, VOCAB), 12),
    ("min_length", lambda: ours.MinLengthLogitsProcessor(13, EOS), 12),  # bans at 12 tokens, not at 13
    ("min_new_tokens", lambda: ours.MinNewTokensLengthLogitsProcessor(8, 5, EOS), 12),
    ("suppress", lambda: ours.SuppressTokensLogitsProcessor([1, 5, 9]), 12),
    ("begin_suppress", lambda: ours.SuppressTokensAtBeginLogitsProcessor([4, 6], 12), 12),
    ("forced_bos", lambda: ours.ForcedBOSTokenLogitsProcessor(3), 1),
    ("forced_eos", lambda: ours.ForcedEOSTokenLogitsProcessor(13, EOS), 12),
]


@pytest.mark.parametrize("name,make,length", BANS, ids=[b[0] for b in BANS])
def test_banned_answers_what_the_processor_bans(name, make, length):
    """``banned`` (what greedy search asks about its pick) agrees with the processor's own scores for every token
    of the vocabulary, in a state where it bans and one step later; the scores themselves are checked against
    transformers above."""
    proc = make()
    assert proc.bans_only
    ids, scores = _inputs(4)
    ids = np.ascontiguousarray(ids[:, :length])
    ids[1, -2:] = 5  # row 1 ends with a bad word's prefix ([5, 5] bans 5), row 2 with another's ([0, 0, 13])
    ids[2, -2:] = 0
    bit = False
    for state in (ids, np.concatenate([ids, ids[:, -1:]], axis=1)):
        banned_scores = np.isneginf(proc(state, scores.copy()))
        bit |= banned_scores.any()
        rows = np.arange(state.shape[0])
        for token in range(VOCAB):
            tokens = np.full(state.shape[0], token, np.int64)
            np.testing.assert_array_equal(proc.banned(state, tokens, VOCAB), banned_scores[rows, token],
                                          err_msg=f"{name}, token {token}, length {state.shape[1]}")
    assert bit, name  # the state was one where the processor bans


def test_banned_falls_back_to_the_processors_scores():
    """A ban-only processor with no rule of its own is asked through its scores on a row of zeros."""

    class BanOdd(ours.LogitsProcessor):
        bans_only = True

        def __call__(self, input_ids, scores):
            out = scores.copy()
            out[:, 1::2] = ours.NEG_INF
            return out

    lst = ours.LogitsProcessorList([ours.SuppressTokensLogitsProcessor([4]), BanOdd()])
    assert lst.bans_only and not ours.LogitsProcessorList([ours.TemperatureLogitsWarper(0.5)]).bans_only
    ids = np.zeros((3, 5), np.int64)
    np.testing.assert_array_equal(lst.banned(ids, np.array([3, 4, 6]), VOCAB), [True, True, False])


SETTINGS = [
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    dict(do_sample=True, top_k=0, min_p=0.05, repetition_penalty=1.2, no_repeat_ngram_size=2),
    dict(do_sample=True, typical_p=0.8, epsilon_cutoff=1e-3, min_new_tokens=6, suppress_tokens=[3, 4]),
    dict(do_sample=True, eta_cutoff=2e-3, temperature=1.3, renormalize_logits=True, bad_words_ids=[[9], [10, 11]]),
    dict(do_sample=False, repetition_penalty=1.5, min_length=15, forced_eos_token_id=2, max_length=13,
         exponential_decay_length_penalty=(1, 1.1), begin_suppress_tokens=[8]),
    dict(do_sample=True, num_beams=3, top_k=4, top_p=0.95),  # beam sampling keeps len(eos)+1 tokens
]


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(i) for i in range(len(SETTINGS))])
def test_combined_list_matches_transformers(settings):
    """Our config -> processor list equals transformers' ``_get_logits_processor`` on the same settings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=VOCAB))
    hf_cfg = HFGenerationConfig(eos_token_id=EOS, pad_token_id=0, **settings)
    hf_cfg._eos_token_tensor = torch.tensor(EOS)
    ids, scores = _inputs(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_list = model._get_logits_processor(hf_cfg, input_ids_seq_length=8, encoder_input_ids=torch.from_numpy(ids),
                                              device="cpu")
        cfg = GenerationConfig(eos_token_id=EOS, pad_token_id=0).updated(**settings)
    mine_list = build_processors(cfg, prompt_length=8, vocab_size=VOCAB)
    assert [type(p).__name__ for p in mine_list] == [type(p).__name__ for p in hf_list]
    for step in range(3):
        step_ids = np.concatenate([ids, np.full((ids.shape[0], step), 5, np.int64)], axis=1)
        mine = mine_list(step_ids, scores.copy())
        theirs = hf_list(torch.from_numpy(step_ids), torch.from_numpy(scores.copy())).numpy()
        assert_same_scores(mine, theirs)


def test_sampling_frequencies_follow_processed_distribution():
    """Chi-square: 20000 draws from the sampler match the warped distribution (fixed seed, p > 0.001)."""
    from scipy import stats

    from edgelm.runtime.processors import softmax
    from edgelm.runtime.strategies.sampling import sample_token

    rng = np.random.default_rng(123)
    scores = rng.standard_normal((1, 50)).astype(np.float32) * 2
    warped = ours.TopKLogitsWarper(12)(None, ours.TemperatureLogitsWarper(0.8)(None, scores))
    probs = softmax(warped)[0]
    draws = sample_token(np.repeat(probs[None], 20000, axis=0), np.random.default_rng(7))
    counts = np.bincount(draws, minlength=50)
    assert counts[probs == 0].sum() == 0
    support = probs > 0
    expected = probs[support].astype(np.float64) / probs[support].sum(dtype=np.float64) * counts.sum()
    _, p = stats.chisquare(counts[support], expected)
    assert p > 1e-3, p


def test_seeded_sampling_reproduces(exported):
    from edgelm.runtime import CausalLM

    lm = CausalLM.load(exported("tiny-llama"))
    ids = np.array([[5, 17, 99]], np.int64)
    kw = dict(do_sample=True, top_p=0.9, temperature=0.8, max_new_tokens=20, eos_token_id=None)
    a = lm.generate(ids, seed=11, **kw)
    b = lm.generate(ids, seed=11, **kw)
    c = lm.generate(ids, generator=np.random.default_rng(11), **kw)
    d = lm.generate(ids, seed=12, **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, d)


def test_sampled_tokens_come_from_the_processed_scores(exported):
    """Every sampled token had a finite processed score at its step (top_k=3 leaves 3 candidates)."""
    from edgelm.runtime import CausalLM

    lm = CausalLM.load(exported("tiny-qwen2"))
    ids = np.array([[5, 17, 99], [4, 4, 4]], np.int64)
    out = lm.generate(ids, do_sample=True, top_k=3, max_new_tokens=15, seed=0, eos_token_id=None,
                      return_dict_in_generate=True, output_scores=True, num_return_sequences=2)
    assert out.sequences.shape == (4, 18)
    for step, scores in enumerate(out.scores):
        assert (np.isfinite(scores).sum(-1) == 3).all()
        tok = out.sequences[:, 3 + step]
        assert np.isfinite(scores[np.arange(4), tok]).all()


@pytest.mark.parametrize("rows", [1, 3])
def test_stopping_criteria_answer_as_transformers(rows):
    """The built-in criteria answer per row what transformers' do, whether a criterion answers with one bool (the
    length limit, EOS on one row: no array per step) or an array; ``stops`` folds a uniform answer into one
    bool, and a caller's criterion may answer either way (``generate``'s ``stopping_criteria``)."""
    from transformers.generation import stopping_criteria as hf_stop

    from edgelm.runtime import stopping

    rng = np.random.default_rng(rows)
    for length, max_length in ((6, 9), (9, 9), (10, 9)):
        ids = rng.integers(0, VOCAB, size=(rows, length)).astype(np.int64)
        ids[0, -1] = EOS[1]  # row 0 ends with an end of sequence
        theirs = hf_stop.StoppingCriteriaList([hf_stop.MaxLengthCriteria(max_length),
                                               hf_stop.EosTokenCriteria(EOS)])(torch.from_numpy(ids), None).numpy()
        mine = stopping.StoppingCriteriaList([stopping.MaxLengthCriteria(max_length), stopping.EosTokenCriteria(EOS)])
        got = mine(ids, None)
        assert isinstance(got, np.ndarray) and got.dtype == bool and got.shape == (rows,)
        np.testing.assert_array_equal(got, theirs)
        folded = mine.stops(ids, None)
        if theirs.all() or not theirs.any():
            assert folded is bool(theirs.all())
        else:
            np.testing.assert_array_equal(folded, theirs)
    ids = rng.integers(3, VOCAB, size=(rows, 4)).astype(np.int64)
    picky = np.arange(rows) == rows - 1  # a caller's criterion stopping the last row only
    for extra, want in ((lambda i, s: picky, picky), (lambda i, s: np.bool_(True), np.ones(rows, bool)),
                        (lambda i, s: False, np.zeros(rows, bool))):
        lst = stopping.StoppingCriteriaList([stopping.MaxLengthCriteria(50), extra])
        np.testing.assert_array_equal(lst(ids, None), want)
