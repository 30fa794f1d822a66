"""The CLI: generate and fill-mask end to end, JSON output, useful --help."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgelm.runtime import CausalLM


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_json_matches_api(exported):
    folder = exported("tiny-llama")
    proc = _cli("generate", str(folder), "The capital of France", "--max-new-tokens", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    lm = CausalLM.load(folder)
    ids = np.array([out["prompt_ids"]])
    assert out["sequences"] == lm.generate(ids, max_new_tokens=10).tolist()


def test_generate_streams_text(exported):
    folder = exported("tiny-llama")
    proc = _cli("generate", str(folder), "The capital of France", "--max-new-tokens", "10", "--chat",
                "--do-sample", "--top-p", "0.9", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.parametrize("how", ["1", "sync"])
def test_generate_says_when_it_writes_the_load_cache(exported, tmp_path, monkeypatch, how):
    """The first load says on stderr that it saves onnxruntime's prepacked graph, and how (a background writer
    by default, during the load with sync); once the entry is there, loads are quiet, and stdout holds only
    the output either way."""
    import os

    from edgelm.runtime import cache_writer

    monkeypatch.setenv("EDGELM_LOAD_CACHE_DIR", str(tmp_path / "load-cache"))  # the writer's and wait()'s too
    env = {**os.environ, "EDGELM_LOAD_CACHE": how}
    model = exported("tiny-llama")
    cmd = [sys.executable, "-m", "edgelm.cli", "generate", str(model), "hi", "--max-new-tokens", "3", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert cache_writer.wait(model / "model.onnx", timeout=120)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "first load" in first.stderr and "load cache" in first.stderr
    assert ("background" in first.stderr) == (how == "1") and ("during this load" in first.stderr) == (how == "sync")
    assert "first load" not in again.stderr
    assert json.loads(first.stdout)["sequences"] == json.loads(again.stdout)["sequences"]


def test_generate_passes_the_draft_schedule(exported):
    """--num-assistant-tokens(-schedule) reach generate(): the run equals the API's with the same settings, and a
    schedule transformers does not know is refused by the parser."""
    from edgelm.cli.main import _generation_kwargs, build_parser

    args = build_parser().parse_args(["generate", "m", "p", "--prompt-lookup-num-tokens", "6",
                                      "--num-assistant-tokens", "4", "--num-assistant-tokens-schedule", "heuristic"])
    kw = _generation_kwargs(args)
    assert kw["num_assistant_tokens_schedule"] == "heuristic" and kw["num_assistant_tokens"] == 4
    folder = exported("tiny-llama")
    proc = _cli("generate", str(folder), "one two three one two three one two", "--max-new-tokens", "8", "--json",
                "--prompt-lookup-num-tokens", "6", "--num-assistant-tokens-schedule", "heuristic")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sequences"] == CausalLM.load(folder).generate(np.array([out["prompt_ids"]]), max_new_tokens=8).tolist()
    bad = _cli("generate", str(folder), "hi", "--num-assistant-tokens-schedule", "fast")
    assert bad.returncode == 2 and "invalid choice: 'fast'" in bad.stderr


def test_generate_bad_settings_one_line(exported):
    proc = _cli("generate", str(exported("tiny-llama")), "hi", "--do-sample", "--temperature", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "temperature" in proc.stderr


def test_fill_mask_cli(exported):
    proc = _cli("fill-mask", str(exported("tiny-bert")), "the capital of [MASK]", "--top-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 3


def test_help_of_every_command():
    for cmd in ([], ["export"], ["generate"], ["fill-mask"], ["models"], ["models", "fetch"]):
        proc = _cli(*cmd, "--help")
        assert proc.returncode == 0 and "usage" in proc.stdout
    assert "--max-new-tokens" in _cli("generate", "--help").stdout
    # every environment variable that changes how models load or run is listed, with its values
    from edgelm.runtime import load_cache, session

    top = _cli("--help").stdout
    for name in ("EDGELM_CACHE", load_cache.ENV, load_cache.DIR_ENV, session.SPINNING_STOP_ENV,
                 session.PARALLEL_PREPACK_ENV, "EDGELM_KV_SHARED_BUFFER", "EDGELM_GENAI_PYTHON"):
        assert f"\n  {name} " in top, name
    assert "sync" in top


def test_models_list_and_fetch_uses_cache(checkpoint):
    checkpoint("tiny-gpt2")
    proc = _cli("models", "list")
    assert "smollm2-135m-instruct" in proc.stdout and "antiberty" in proc.stdout
    proc = _cli("models", "fetch", "tiny-gpt2")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("tiny-gpt2")
    assert "building" not in proc.stderr  # second call: cached
    bad = _cli("models", "fetch", "no-such-model")
    assert bad.returncode == 2 and "known models" in bad.stderr


def test_generate_stable_rows_reach_the_load(exported):
    """--stable-rows loads the model with stable_rows: prompt lookup then gives that load's greedy output, and a
    graph without fused attention is refused with the reason, not a traceback."""
    folder = exported("tiny-llama")
    proc = _cli("generate", str(folder), "one two three one two three one two", "--max-new-tokens", "8", "--json",
                "--prompt-lookup-num-tokens", "3", "--stable-rows")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    lm = CausalLM.load(folder, stable_rows=True)
    assert out["sequences"] == lm.generate(np.array([out["prompt_ids"]]), max_new_tokens=8).tolist()
    refused = _cli("generate", str(exported("tiny-llama", fuse=False)), "hi", "--max-new-tokens", "2", "--stable-rows")
    assert refused.returncode != 0 and "GroupQueryAttention" in refused.stderr and "Traceback" not in refused.stderr
