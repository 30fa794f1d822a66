"""Session config entries edgelm decides: each with its default and an environment variable that flips it."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.runtime import CausalLM
from edgelm.runtime.errors import ProviderError
from edgelm.runtime.session import PARALLEL_PREPACK_ENV, SESSION_ENTRIES, SPINNING_STOP_ENV, read_back_entries


def _entry(lm: CausalLM, key: str) -> str | None:
    try:
        return lm.decoder.session.get_session_options().get_session_config_entry(key)
    except Exception:  # onnxruntime raises when the entry was never set
        return None


@pytest.mark.parametrize("key, env, default", [("session.force_spinning_stop", SPINNING_STOP_ENV, "1"),
                                               ("session.prepack.enable_parallel", PARALLEL_PREPACK_ENV, None)])
def test_each_entry_has_its_default_and_its_variable_flips_it(key, env, default, exported, monkeypatch):
    """Spinning stops after each run (a draft and its target take turns once per drafted token and must not
    busy-wait through each other's runs); parallel prepacking is opt-in (it raises peak memory at load)."""
    short = key.removeprefix("session.")
    assert SESSION_ENTRIES[key][0] == env
    monkeypatch.delenv(env, raising=False)
    lm = CausalLM.load(exported("tiny-llama"))
    assert _entry(lm, key) == default
    assert read_back_entries(lm.decoder.session)[short] == (1 if default else 0)
    flipped = "0" if default else "1"
    monkeypatch.setenv(env, flipped)
    lm = CausalLM.load(exported("tiny-llama"))
    assert _entry(lm, key) == (None if default else "1")
    assert read_back_entries(lm.decoder.session)[short] == int(flipped)
    for other, (_, other_default) in SESSION_ENTRIES.items():  # one variable flips one entry only
        if other != key:
            assert _entry(lm, other) == ("1" if other_default == "1" else None)
    monkeypatch.setenv(env, "yes")
    with pytest.raises(ProviderError, match=env):
        CausalLM.load(exported("tiny-llama"))


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
