"""The load cache (runtime.load_cache): onnxruntime's prepacked graph saved on a first load, read back later.

It may only make loads faster: the same logits to the bit, a fresh entry when the model or the
machine's onnxruntime changes, and a plain load (with a warning) whenever the cache cannot be used.
By default a first load is a plain one and a background process writes the entry (runtime.cache_writer);
``sync`` writes it during the load. These tests run the default unless they say otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgelm.runtime import CausalLM, cache_writer, load_cache
from edgelm.runtime.errors import ProviderError
from edgelm.runtime.session import create_session

PROMPT = np.array([[5, 17, 99, 3, 250, 8, 42, 7, 11, 64]], np.int64)


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(load_cache.DIR_ENV, str(tmp_path / "load-cache"))
    monkeypatch.delenv(load_cache.ENV, raising=False)
    return tmp_path / "load-cache"


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def _written(model: Path) -> None:
    """Wait for the background writer of ``model``'s entry; the entry must then exist."""
    assert cache_writer.wait(model / "model.onnx", timeout=120), "the background writer left no entry"


def _prefill_logits(lm: CausalLM) -> np.ndarray:
    cache = lm.decoder.new_cache(1)
    logits, _ = lm.decoder.step(PROMPT, np.ones_like(PROMPT), np.arange(PROMPT.shape[1])[None], cache)
    return logits


@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}, {"quantize": "int4"}])
def test_cached_graph_gives_the_same_logits_and_tokens(options, exported, cache_root):
    model = exported("tiny-llama", **options)
    plain = CausalLM.load(model, load_cache=False)
    first = CausalLM.load(model, load_cache="sync")
    again = CausalLM.load(model)
    assert [load_cache.status(lm.decoder.session) for lm in (plain, first, again)] == ["off", "written", "hit"]
    (entry,) = _entries(cache_root)
    assert (entry / "model.onnx").is_file() and (entry / "model.onnx.data").stat().st_size > 0
    want = _prefill_logits(plain)
    for lm in (first, again):
        np.testing.assert_array_equal(_prefill_logits(lm), want)
    tokens = plain.generate(PROMPT, max_new_tokens=16, do_sample=False)
    np.testing.assert_array_equal(again.generate(PROMPT, max_new_tokens=16, do_sample=False), tokens)


@pytest.mark.parametrize("options", [{}, {"quantize": "int4"}])
def test_a_first_load_is_plain_and_a_background_process_writes_the_entry(options, exported, cache_root):
    """The default: the first load returns a plain session at once ("writing"), a detached process writes the
    entry, and the next load reads it: the same logits to the bit as a plain load, the lock gone."""
    model = exported("tiny-llama", **options)
    want = _prefill_logits(CausalLM.load(model, load_cache=False))
    first = CausalLM.load(model)
    assert load_cache.status(first.decoder.session) == "writing"
    np.testing.assert_array_equal(_prefill_logits(first), want)
    _written(model)
    (entry,) = _entries(cache_root)
    assert json.loads((entry / "source.json").read_text())["write_s"] > 0
    assert load_cache.written_in(model / "model.onnx") == json.loads((entry / "source.json").read_text())["write_s"]
    assert not any(p.name.startswith((cache_writer.LOCK_PREFIX, cache_writer.FAILED_PREFIX, ".tmp-"))
                   for p in cache_root.iterdir())
    again = CausalLM.load(model)
    assert load_cache.status(again.decoder.session) == "hit"
    np.testing.assert_array_equal(_prefill_logits(again), want)


def test_one_writer_at_a_time_and_a_dead_ones_lock_is_taken_over(exported, cache_root, monkeypatch):
    model = exported("tiny-llama")
    cache_root.mkdir(parents=True)
    lock = cache_writer._marker(cache_writer.LOCK_PREFIX, model / "model.onnx", "all")
    lock.write_text(f"{os.getpid()}\n")  # a live process holds it: a load must not start a second writer

    def no_second_writer(*args, **kwargs):
        raise AssertionError("a second writer was started")

    with monkeypatch.context() as m:
        m.setattr(cache_writer.subprocess, "Popen", no_second_writer)
        assert load_cache.status(CausalLM.load(model).decoder.session) == "writing"
    assert cache_writer.writing(model / "model.onnx") and not _entries(cache_root)
    lock.write_text("")  # a writer being started: its pid not written yet
    assert cache_writer.writing(model / "model.onnx")
    os.utime(lock, (time.time() - 60,) * 2)  # ... for a minute: its starter was killed
    assert not cache_writer.writing(model / "model.onnx")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid}\n")  # what a killed writer leaves
    assert not cache_writer.writing(model / "model.onnx")
    assert load_cache.status(CausalLM.load(model).decoder.session) == "writing"
    _written(model)
    assert load_cache.status(CausalLM.load(model).decoder.session) == "hit"


def test_a_failed_writer_says_why_and_loads_stop_retrying(exported, cache_root, tmp_path):
    """A writer that cannot write leaves the reason; loads in the next hour warn with it and start no writer."""
    model = tmp_path / "model"
    shutil.copytree(exported("tiny-llama"), model)
    cache_root.mkdir(parents=True)
    lock = cache_writer._marker(cache_writer.LOCK_PREFIX, model / "model.onnx", "all")
    failed = cache_writer._marker(cache_writer.FAILED_PREFIX, model / "model.onnx", "all")
    lock.write_text("")
    (model / "model.onnx").rename(model / "moved.onnx")  # the graph is gone when the writer looks for it
    # the writer as loads start it (a process of its own: it lowers its own priority)
    writer = subprocess.run([sys.executable, "-m", "edgelm.runtime.cache_writer", str(model / "model.onnx"), "all",
                             str(lock), "{}"], capture_output=True, text=True, timeout=300)
    assert writer.returncode == 1, writer.stderr
    assert not lock.exists() and failed.is_file() and failed.read_text().strip()
    (model / "moved.onnx").rename(model / "model.onnx")
    with pytest.warns(RuntimeWarning, match="writer failed"):
        lm = CausalLM.load(model)
    assert load_cache.status(lm.decoder.session) == "failed" and not cache_writer.writing(model / "model.onnx")
    os.utime(failed, (0, 0))  # an hour on: try again
    assert load_cache.status(CausalLM.load(model).decoder.session) == "writing"
    _written(model)
    assert not failed.exists()


def test_a_changed_model_gets_a_fresh_entry_and_stale_ones_go(exported, cache_root, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(exported("tiny-llama"), model)
    gone = tmp_path / "gone"
    shutil.copytree(exported("tiny-llama"), gone)
    CausalLM.load(gone, load_cache="sync")
    shutil.rmtree(gone)  # a model deleted since: its entry is swept at the next write
    assert load_cache.status(CausalLM.load(model, load_cache="sync").decoder.session) == "written"
    (old,) = _entries(cache_root)
    st = (model / "model.onnx").stat()
    os.utime(model / "model.onnx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # what a re-export does
    assert load_cache.status(CausalLM.load(model).decoder.session) == "writing"  # the background writer sweeps too
    _written(model)
    (new,) = _entries(cache_root)
    assert new != old and not old.exists()
    assert load_cache.status(CausalLM.load(model).decoder.session) == "hit"


def test_a_write_sweeps_the_markers_kills_left_behind(exported, cache_root):
    """Locks and failure records of background writers (of any model, gone ones too) are removed by the next
    write once stale; young ones stay, since a writer may still be at work."""
    cache_root.mkdir(parents=True)
    stale = [cache_root / f"{cache_writer.LOCK_PREFIX}gone-0123", cache_root / f"{cache_writer.FAILED_PREFIX}gone-0123"]
    young = cache_root / f"{cache_writer.LOCK_PREFIX}other-4567"
    for marker in (*stale, young):
        marker.write_text("12345\n")
    for marker in stale:
        os.utime(marker, (time.time() - 2 * load_cache.STALE_TMP_SECONDS,) * 2)
    CausalLM.load(exported("tiny-llama"), load_cache="sync")
    assert not any(m.exists() for m in stale) and young.exists()


def test_a_damaged_entry_is_written_again(exported, cache_root):
    model = exported("tiny-llama")
    want = _prefill_logits(CausalLM.load(model, load_cache=False))
    CausalLM.load(model, load_cache="sync")
    (entry,) = _entries(cache_root)
    (entry / "model.onnx").write_bytes(b"\x00not a graph")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        lm = CausalLM.load(model)
    assert load_cache.status(lm.decoder.session) == "writing"
    _written(model)
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
    assert load_cache.status(CausalLM.load(model, load_cache=True).decoder.session) == "writing"  # the argument wins
    _written(model)
    shutil.rmtree(cache_root)
    monkeypatch.setenv(load_cache.ENV, "sync")
    assert load_cache.status(CausalLM.load(model).decoder.session) == "written"
    monkeypatch.setenv(load_cache.ENV, "yes")
    with pytest.raises(ProviderError, match=load_cache.ENV):
        CausalLM.load(model)
    with pytest.raises(ProviderError, match="load_cache"):
        CausalLM.load(model, load_cache="later")


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
