"""Fuzzing the public surfaces: every input either works or raises one of edgelm's documented errors.

"Works" is checked, not assumed: returned ids are in the vocabulary, each row starts with its
prompt, lengths respect the limits asked for. Anything else (a numpy or onnxruntime exception
leaking out, a crash, a hang past the deadline) fails the test. The counts of inputs tried are
the ``max_examples`` below (CI runs them all).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgelm.runtime import CausalLM, MaskedLM
from edgelm.runtime.errors import EdgeLMError

def fuzz(examples: int):
    return settings(max_examples=examples, deadline=10_000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VOCAB = 400  # the tiny models' vocabulary


@pytest.fixture(scope="module")
def lm(exported):
    return CausalLM.load(exported("tiny-llama"))


@pytest.fixture(scope="module")
def mlm(exported):
    return MaskedLM.load(exported("tiny-bert"))


def _documented(exc: BaseException) -> None:
    event(f"raised {type(exc).__name__}")
    assert isinstance(exc, EdgeLMError), f"{type(exc).__name__} leaked out: {exc}"
    assert len(str(exc)) > 15, f"an error must say what is wrong and how to fix it: {exc!r}"


floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.floats(-3, 3)
small_ints = st.integers(-3, 12)
token = st.integers(-5, VOCAB + 5)
SETTINGS = {
    "max_new_tokens": small_ints | st.none(),
    "max_length": st.integers(-2, 40),
    "min_new_tokens": small_ints,
    "min_length": small_ints,
    "do_sample": st.booleans(),
    "temperature": floats,
    "top_k": st.integers(-5, 500),
    "top_p": floats,
    "min_p": floats,
    "typical_p": floats,
    "epsilon_cutoff": floats,
    "eta_cutoff": floats,
    "repetition_penalty": floats,
    "encoder_repetition_penalty": floats,
    "no_repeat_ngram_size": st.integers(-1, 5),
    "num_beams": st.integers(-1, 5),
    "num_beam_groups": st.integers(-1, 4),
    "diversity_penalty": floats,
    "length_penalty": floats,
    "early_stopping": st.sampled_from([True, False, "never", "maybe", None]),
    "penalty_alpha": floats,
    "num_return_sequences": st.integers(-1, 4),
    "prompt_lookup_num_tokens": st.integers(-1, 5),
    "eos_token_id": st.none() | token | st.lists(token, max_size=3),
    "pad_token_id": st.none() | token,
    "bad_words_ids": st.lists(st.lists(token, max_size=3), max_size=3),
    "suppress_tokens": st.lists(token, max_size=4),
    "begin_suppress_tokens": st.lists(token, max_size=4),
    "forced_eos_token_id": st.none() | token,
    "forced_bos_token_id": st.none() | token,
    "exponential_decay_length_penalty": st.tuples(small_ints, floats),
    "sequence_bias": st.dictionaries(st.tuples(token), floats, max_size=2),
    "renormalize_logits": st.booleans(),
    "stop_strings": st.lists(st.text(max_size=4), max_size=2),
    "max_time": st.floats(0, 0.5),
    "seed": st.integers(-2, 2**33),
    "output_scores": st.booleans(),
    "return_dict_in_generate": st.booleans(),
    "no_such_setting": st.integers(),
}


@fuzz(400)
@given(kw=st.sets(st.sampled_from(sorted(SETTINGS)), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: SETTINGS[k] for k in sorted(keys)})))
def test_fuzz_generation_settings(lm, kw):
    ids = np.array([[5, 17, 99, 3], [0, 0, 42, 7]], np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], np.int64)
    kw = dict(kw)
    if kw.get("max_new_tokens") is None and "max_length" not in kw:
        kw["max_new_tokens"] = 8  # keep runs short; max_new_tokens=None alone means the model's default
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = lm.generate(ids, mask, **kw)
    except Exception as exc:  # noqa: BLE001 - the assertion is on the type
        _documented(exc)
        return
    event("worked")
    seqs = out.sequences if hasattr(out, "sequences") else out
    assert isinstance(seqs, np.ndarray) and seqs.dtype == np.int64 and seqs.ndim == 2
    assert seqs.shape[0] % 2 == 0 and seqs.shape[1] >= ids.shape[1]
    assert seqs.min() >= 0 and seqs.max() < VOCAB
    per_prompt = seqs.shape[0] // 2
    for row in range(seqs.shape[0]):
        np.testing.assert_array_equal(seqs[row, : ids.shape[1]], ids[row // per_prompt])


@fuzz(200)
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape"))
       | st.sampled_from(["", " ", "\n\n\t", "\x00", "\ud800", "a" * 5000, "🙂" * 300, "<|im_start|>" * 50]),
       chat=st.booleans())
def test_fuzz_prompts(lm, text, chat):
    try:
        out = lm.generate_text(text, chat=chat, max_new_tokens=3)
    except Exception as exc:  # noqa: BLE001
        _documented(exc)
        return
    event("worked")
    assert isinstance(out, str)


dtypes = st.sampled_from([np.int64] * 4 + [np.int32] * 2 + [np.int8, np.int16, np.uint8, np.uint64, np.float32,
                                                                np.float64, bool, object, str])
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple) | st.tuples(st.integers(1, 3), st.integers(1, 6))


@fuzz(300)
@given(dtype=dtypes, shape=shapes, lo=st.integers(-10, VOCAB) | st.integers(0, 50), span=st.integers(0, 2 * VOCAB),
       mask_kind=st.sampled_from(["none", "ones", "random", "wrong_shape", "floats", "zeros"]))
def test_fuzz_token_arrays(lm, dtype, shape, lo, span, mask_kind):
    rng = np.random.default_rng(abs(hash((shape, lo, span))) % 2**32)
    raw = rng.integers(lo, lo + span + 1, size=shape)
    try:
        ids = raw.astype(dtype)
    except (ValueError, TypeError):
        ids = raw.astype(object)
    masks = {
        "none": None,
        "ones": np.ones(shape, np.int64),
        "random": rng.integers(0, 2, size=shape),
        "wrong_shape": np.ones((len(shape) + 1,), np.int64),
        "floats": np.full(shape, 0.5),
        "zeros": np.zeros(shape, np.int64),
    }
    try:
        out = lm.generate(ids, masks[mask_kind], max_new_tokens=2)
    except Exception as exc:  # noqa: BLE001
        _documented(exc)
        return
    event("worked")
    arr = np.asarray(ids)
    assert arr.dtype.kind in "iu", f"{arr.dtype} ids were accepted"
    rows = (arr if arr.ndim == 2 else arr.reshape(1, -1)).astype(np.int64)
    assert out.shape == (rows.shape[0], rows.shape[1] + 2)
    np.testing.assert_array_equal(out[:, : rows.shape[1]], rows)
    assert out.min() >= 0 and out.max() < VOCAB


@fuzz(200)
@given(text=st.text(max_size=80), masks=st.integers(0, 3), top_k=st.integers(-2, 600) | st.just(True),
       batch=st.booleans())
def test_fuzz_fill_mask(mlm, text, masks, top_k, batch):
    mask = mlm.tokenizer.mask_token
    words = text.split(" ")
    for i in range(masks):
        words.insert((i * 7) % (len(words) + 1), mask)
    full = " ".join(words)
    try:
        out = mlm.fill_mask([full, full] if batch else full, top_k=top_k)
    except Exception as exc:  # noqa: BLE001
        _documented(exc)
        return
    event("worked")
    groups = out[0] if batch else out
    groups = [groups] if groups and isinstance(groups[0], dict) else groups
    for group in groups:
        assert 1 <= len(group) <= top_k
        scores = [c["score"] for c in group]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
