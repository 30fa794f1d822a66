"""The load cache (runtime.load_cache): onnxruntime's prepacked graph saved on a first load, read back later.

It may only make loads faster: the same logits to the bit, a fresh entry when the model or the
machine's onnxruntime changes, and a plain load (with a warning) whenever the cache cannot be used.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgelm.runtime import CausalLM, load_cache
from edgelm.runtime.errors import ProviderError
from edgelm.runtime.session import create_session

PROMPT = np.array([[5, 17, 99, 3, 250, 8, 42, 7, 11, 64]], np.int64)


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(load_cache.DIR_ENV, str(tmp_path / "load-cache"))
    monkeypatch.delenv(load_cache.ENV, raising=False)
    return tmp_path / "load-cache"


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith(".tmp-")) if root.is_dir() else []


def _prefill_logits(lm: CausalLM) -> np.ndarray:
    cache = lm.decoder.new_cache(1)
    logits, _ = lm.decoder.step(PROMPT, np.ones_like(PROMPT), np.arange(PROMPT.shape[1])[None], cache)
    return logits


@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}, {"quantize": "int4"}])
def test_cached_graph_gives_the_same_logits_and_tokens(options, exported, cache_root):
    model = exported("tiny-llama", **options)
    plain = CausalLM.load(model, load_cache=False)
    first = CausalLM.load(model)
    again = CausalLM.load(model)
    assert [load_cache.status(lm.decoder.session) for lm in (plain, first, again)] == ["off", "written", "hit"]
    (entry,) = _entries(cache_root)
    assert (entry / "model.onnx").is_file() and (entry / "model.onnx.data").stat().st_size > 0
    want = _prefill_logits(plain)
    for lm in (first, again):
        np.testing.assert_array_equal(_prefill_logits(lm), want)
    tokens = plain.generate(PROMPT, max_new_tokens=16, do_sample=False)
    np.testing.assert_array_equal(again.generate(PROMPT, max_new_tokens=16, do_sample=False), tokens)


def test_a_changed_model_gets_a_fresh_entry_and_stale_ones_go(exported, cache_root, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(exported("tiny-llama"), model)
    gone = tmp_path / "gone"
    shutil.copytree(exported("tiny-llama"), gone)
    CausalLM.load(gone)
    shutil.rmtree(gone)  # a model deleted since: its entry is swept at the next write
    assert load_cache.status(CausalLM.load(model).decoder.session) == "written"
    (old,) = _entries(cache_root)
    st = (model / "model.onnx").stat()
    os.utime(model / "model.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # what a re-export does
    assert load_cache.status(CausalLM.load(model).decoder.session) == "written"
    (new,) = _entries(cache_root)
    assert new != old and not old.exists()
    assert load_cache.status(CausalLM.load(model).decoder.session) == "hit"


def test_a_damaged_entry_is_written_again(exported, cache_root):
    model = exported("tiny-llama")
    want = _prefill_logits(CausalLM.load(model, load_cache=False))
    CausalLM.load(model)
    (entry,) = _entries(cache_root)
    (entry / "model.onnx").write_bytes(b"\x00not a graph")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        lm = CausalLM.load(model)
    assert load_cache.status(lm.decoder.session) == "written"
    np.testing.assert_array_equal(_prefill_logits(lm), want)
    assert load_cache.status(CausalLM.load(model).decoder.session) == "hit"


def test_an_unwritable_cache_loads_without_it(exported, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache root cannot be made under a file")
    monkeypatch.setenv(load_cache.DIR_ENV, str(blocker / "load-cache"))
    model = exported("tiny-llama")
    with pytest.warns(RuntimeWarning, match="load cache"):
        lm = CausalLM.load(model)
    assert load_cache.status(lm.decoder.session) == "failed"
    np.testing.assert_array_equal(_prefill_logits(lm), _prefill_logits(CausalLM.load(model, load_cache=False)))


def test_the_variable_turns_it_off_and_a_bad_value_is_refused(exported, cache_root, monkeypatch):
    model = exported("tiny-llama")
    monkeypatch.setenv(load_cache.ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_cache.status(CausalLM.load(model).decoder.session) == "off"
    assert not _entries(cache_root)
    assert load_cache.status(CausalLM.load(model, load_cache=True).decoder.session) == "written"  # the argument wins
    monkeypatch.setenv(load_cache.ENV, "yes")
    with pytest.raises(ProviderError, match=load_cache.ENV):
        CausalLM.load(model)


def test_the_cache_lives_in_edgelms_cache_unless_moved(tmp_path, monkeypatch):
    monkeypatch.delenv(load_cache.DIR_ENV, raising=False)
    monkeypatch.setenv("EDGELM_CACHE", str(tmp_path / "edgelm"))
    assert load_cache.root() == tmp_path / "edgelm" / "load-cache"
    monkeypatch.setenv(load_cache.DIR_ENV, str(tmp_path / "elsewhere"))
    assert load_cache.root() == tmp_path / "elsewhere"


def test_sessions_outside_a_loaded_model_do_not_use_it(exported, cache_root):
    """An export measures its quality on a graph in its temporary folder: that must not leave an entry."""
    sess = create_session(exported("tiny-llama") / "model.onnx")
    assert load_cache.status(sess) == "off" and not _entries(cache_root)
