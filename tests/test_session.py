"""edgelm's departures from onnxruntime's session defaults: set on every session, each turned off by its variable."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.runtime import CausalLM
from edgelm.runtime.session import PARALLEL_PREPACK_ENV, SESSION_DEFAULTS, SPINNING_STOP_ENV, read_back_entries


def _entry(lm: CausalLM, key: str) -> str | None:
    try:
        return lm.decoder.session.get_session_options().get_session_config_entry(key)
    except Exception:  # onnxruntime raises when the entry was never set
        return None


@pytest.mark.parametrize("key, env", [("session.force_spinning_stop", SPINNING_STOP_ENV),
                                      ("session.prepack.enable_parallel", PARALLEL_PREPACK_ENV)])
def test_each_default_is_set_and_its_variable_turns_it_off(key, env, exported, monkeypatch):
    """Spinning stops after each run so that a draft and its target, which take turns once per drafted token, do not
    busy-wait through each other's runs; weights prepack on the session's threads (faster loads)."""
    assert SESSION_DEFAULTS[key] == env
    monkeypatch.delenv(env, raising=False)
    lm = CausalLM.load(exported("tiny-llama"))
    assert _entry(lm, key) == "1"
    assert read_back_entries(lm.decoder.session)[key.removeprefix("session.")] == 1
    monkeypatch.setenv(env, "0")
    lm = CausalLM.load(exported("tiny-llama"))
    assert _entry(lm, key) is None
    assert read_back_entries(lm.decoder.session)[key.removeprefix("session.")] == 0
    others = [k for k in SESSION_DEFAULTS if k != key]
    assert all(_entry(lm, k) == "1" for k in others)  # one variable turns off one default only


@pytest.mark.parametrize("quantize", ["int4", "int8", None])
def test_parallel_prepacking_gives_the_serial_outputs(quantize, exported, monkeypatch):
    """Prepacking on the thread pool must pack the same bytes: scores of a greedy run equal to the last bit."""
    folder = exported("tiny-llama", quantize=quantize) if quantize else exported("tiny-llama")
    runs = []
    for value in ("1", "0"):
        monkeypatch.setenv(PARALLEL_PREPACK_ENV, value)
        lm = CausalLM.load(folder, threads=2)
        assert _entry(lm, "session.prepack.enable_parallel") == ("1" if value == "1" else None)
        out = lm.generate(np.array([[5, 17, 42, 99, 3]], np.int64), max_new_tokens=12, do_sample=False,
                          output_scores=True, return_dict_in_generate=True)
        runs.append((out.sequences, np.stack(out.scores)))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert np.array_equal(runs[0][1], runs[1][1])
