"""The runtime tokenizer gives transformers' ids and texts; streamers emit exactly the decoded text."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edgelm.runtime import TextIteratorStreamer, TextStreamer, Tokenizer

STRINGS = ["Hello world", "  leading and  double  spaces ", "Café naïve résumé", "emoji 😀🚀 and 👩‍👩‍👧",
           "中文字符和日本語のテキスト", "tabs\tand\nnewlines\n\n", "", "<|im_start|>user\nhi<|im_end|>",
           "Numbers 1234567 and symbols #$%^&*()"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "tiny-roberta"])
def test_tiny_tokenizers_match_transformers(name, exported, hf_model):
    ours = Tokenizer.load(exported(name))
    _, theirs = hf_model(name)
    for s in STRINGS:
        assert ours.encode(s) == theirs(s)["input_ids"], s
        ids = theirs(s)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), s


@pytest.mark.real
def test_smollm2_tokenizer_matches_transformers(exported, hf_model):
    ours = Tokenizer.load(exported("smollm2-135m-instruct"))
    _, theirs = hf_model("smollm2-135m-instruct")
    for s in STRINGS:
        assert ours.encode(s) == theirs(s)["input_ids"], s
        assert ours.decode(theirs(s)["input_ids"]) == theirs.decode(theirs(s)["input_ids"])
    assert ours.eos_token_id == 2 and ours.bos_token_id == theirs.bos_token_id


@pytest.mark.parametrize("added", [0, 3])
def test_vocab_size_is_transformers_len(added, exported, hf_model, tmp_path):
    """``vocab_size`` counts the tokens added past the model's vocabulary, as ``len(tokenizer)`` does."""
    _, theirs = hf_model("tiny-llama")
    folder = exported("tiny-llama")
    if added:
        theirs = copy.deepcopy(theirs)
        theirs.add_tokens([f"<extra_{i}>" for i in range(added)])
        theirs.save_pretrained(tmp_path)
        folder = tmp_path
    ours = Tokenizer.load(folder)
    assert ours.vocab_size == len(theirs) == 400 + added
    if added:
        assert ours.encode("a <extra_2> b") == theirs("a <extra_2> b")["input_ids"]


def test_batch_is_left_padded(exported):
    tok = Tokenizer.load(exported("tiny-llama"))
    enc = tok(["a long prompt with several words", "short"])
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][1, -1] == 1
    assert enc["input_ids"][1, -len(tok.encode("short")):].tolist() == tok.encode("short")


@pytest.mark.parametrize("text", ["Café naïve 😀 中文 and more words here", "a\nb\nc", "日本語のテキストです"])
def test_streamer_text_equals_full_decode(text, exported):
    """Token by token, multi-byte characters split across tokens never leak as U+FFFD and nothing is lost."""
    tok = Tokenizer.load(exported("tiny-llama"))
    ids = tok.encode(text)
    pieces: list[str] = []
    streamer = TextStreamer(tok, on_text=lambda t, end: pieces.append(t))
    for i in ids:
        streamer.put(np.array([i]))
    streamer.end()
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_iterator_streamer_with_generate(exported):
    import threading

    from edgelm.runtime import CausalLM

    lm = CausalLM.load(exported("tiny-llama"))
    enc = lm.tokenizer("The weather today")
    streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "out", lm.generate(enc["input_ids"], streamer=streamer, max_new_tokens=20, eos_token_id=None)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == lm.tokenizer.decode(result["out"][0, enc["input_ids"].shape[1]:])
