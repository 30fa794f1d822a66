"""The benchmark's workers give every system the requested threads through the setting it really reads.

Each worker runs in a fresh process, as ``edgelm bench`` runs it, and reports what the system
ran with. onnxruntime-genai is not installed here (it lives in benchmarks/run.sh's own venv),
so a stand-in package records what the worker hands to ``og.Config``: genai ignores
OMP_NUM_THREADS and reads only its decoder's session_options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgelm.cli import bench, bench_workers

REQUEST = {"prompt_ids": [5, 17, 99, 3, 250, 8, 42, 7], "new_tokens": 12, "strategy": "greedy"}


def _worker(system: str, model, threads: int, env: dict | None = None, **extra) -> dict:
    req = json.dumps({**REQUEST, "threads": threads, **extra})
    proc = subprocess.run([sys.executable, bench_workers.__file__, system, str(model), req], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_edgelm_worker_times_nothing_beside_the_load_cache_writer(exported, tmp_path):
    """A first load by default leaves the entry to a background writer; the worker reports that load, then waits
    for the writer before it generates, so no timed token shares the CPU with it."""
    from edgelm.runtime import cache_writer, load_cache

    model = exported("tiny-llama")
    env = {load_cache.DIR_ENV: str(tmp_path / "load-cache"), load_cache.ENV: "1"}
    res = _worker("edgelm", model, 2, env)
    assert res["threads_used"]["load_cache"] == "writing"
    os.environ[load_cache.DIR_ENV], saved = env[load_cache.DIR_ENV], os.environ[load_cache.DIR_ENV]
    try:
        assert (load_cache.entry_path(model / "model.onnx", "all") / "model.onnx").is_file()
        assert not cache_writer.writing(model / "model.onnx")
    finally:
        os.environ[load_cache.DIR_ENV] = saved
    assert _worker("edgelm", model, 2, env)["threads_used"]["load_cache"] == "hit"
    # edgelm bench's first-load job: an empty load cache of the worker's own, whatever the machine's holds
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    first = _worker("edgelm", model, 2, {**env, "TMPDIR": str(scratch)}, fresh_load_cache=True)
    assert first["threads_used"]["load_cache"] == "writing" and first["cache_write_s"] > 0
    assert not list(scratch.glob("edgelm-bench-first-load-*"))  # its cache is gone with it


@pytest.mark.parametrize("threads", [1, 2])
def test_edgelm_worker_runs_with_the_requested_threads(threads, exported):
    res = _worker("edgelm", exported("tiny-llama"), threads)
    assert res["threads_used"]["intra_op_num_threads"] == threads
    # the report shows edgelm's departures from onnxruntime's session defaults, read back from the session
    assert res["threads_used"]["force_spinning_stop"] == 1
    assert res["threads_used"]["prepack.enable_parallel"] == 0  # opt-in: it raises peak memory at load
    assert res["threads_used"]["load_cache"] in ("written", "hit")
    assert res["decode_tps"] > 0 and res["tokens"] == REQUEST["new_tokens"]
    # a decode step split into onnxruntime's run and what edgelm adds: both parts of the measured step
    assert 0 < res["ort_step_ms"] < 1000 / res["decode_tps"]
    assert res["python_step_ms"] == pytest.approx(1000 / res["decode_tps"] - res["ort_step_ms"])


def test_torch_worker_runs_with_the_requested_threads(checkpoint):
    res = _worker("torch", checkpoint("tiny-llama"), 1)
    assert res["threads_used"] == {"torch.get_num_threads": 1}


def test_optimum_worker_runs_with_the_requested_threads(checkpoint):
    model = bench._optimum_model(checkpoint("tiny-llama"), log=lambda s: None)
    res = _worker("optimum", model, 1)
    assert res["threads_used"]["intra_op_num_threads"] == 1


FAKE_GENAI = '''
"""Stand-in for onnxruntime_genai: records the config overlays and generates dummy tokens."""
import json, os, time

__version__ = "fake"

class Config:
    def __init__(self, path):
        time.sleep(float(os.environ.get("FAKE_GENAI_CONFIG_SECONDS", "0")))  # reading genai_config.json
        self.overlays = []
    def clear_providers(self):
        pass
    def overlay(self, text):
        self.overlays.append(json.loads(text))

class Model:
    def __init__(self, config):
        with open(os.environ["FAKE_GENAI_LOG"], "w") as f:
            json.dump(config.overlays, f)

class Tokenizer:
    def __init__(self, model):
        pass

class GeneratorParams:
    def __init__(self, model):
        self.opts = {}
    def set_search_options(self, **opts):
        self.opts = opts

class Generator:
    def __init__(self, model, params):
        self.left = params.opts["max_length"]
    def append_tokens(self, tokens):
        self.left -= len(tokens)
    def is_done(self):
        return self.left <= 0
    def generate_next_token(self):
        self.left -= 1
'''


def test_genai_worker_sets_threads_through_the_config_overlay(tmp_path):
    pkg = tmp_path / "fake" / "onnxruntime_genai"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_GENAI))
    log = tmp_path / "overlays.json"
    env = {"PYTHONPATH": str(tmp_path / "fake"), "FAKE_GENAI_LOG": str(log), "OMP_NUM_THREADS": "7"}
    res = _worker("genai", tmp_path, 3, env)
    overlays = json.loads(log.read_text())
    assert overlays, "the worker gave genai no config overlay: genai would run with its default threads"
    options = overlays[-1]["model"]["decoder"]["session_options"]
    assert options["intra_op_num_threads"] == 3
    assert res["threads_used"] == options
    assert "overlay" in res["thread_setting"]


def test_genai_load_time_includes_reading_its_config(tmp_path):
    """edgelm's load time includes reading its folder's configs, so genai's must include og.Config too."""
    pkg = tmp_path / "fake" / "onnxruntime_genai"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_GENAI))
    env = {"PYTHONPATH": str(tmp_path / "fake"), "FAKE_GENAI_LOG": str(tmp_path / "overlays.json"),
           "FAKE_GENAI_CONFIG_SECONDS": "0.3"}
    assert _worker("genai", tmp_path, 2, env)["load_s"] >= 0.3


def _fake_genai(tmp_path) -> dict:
    pkg = tmp_path / "fake" / "onnxruntime_genai"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_GENAI))
    return {"PYTHONPATH": str(tmp_path / "fake"), "FAKE_GENAI_LOG": str(tmp_path / "overlays.json")}


def test_turns_worker_runs_both_loops_in_one_process(exported, tmp_path):
    """The turns worker loads edgelm and genai (a stand-in here) in one process, each with the threads set where it
    reads them, and returns every round's decode rates and their ratio, first player over second."""
    req = json.dumps({**REQUEST, "threads": 2, "rounds": 3, "players": ["edgelm", "genai"],
                      "genai_model": str(tmp_path)})
    proc = subprocess.run([sys.executable, bench_workers.__file__, "turns", str(exported("tiny-llama")), req],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **_fake_genai(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["rates"]) == len(res["ratios"]) == 3
    assert all(r == pytest.approx(a / b) for r, (a, b) in zip(res["ratios"], res["rates"]))
    assert res["threads_used"][0]["intra_op_num_threads"] == 2
    assert res["threads_used"][0]["force_spinning_stop"] == 1  # read back from the session, as the edgelm worker does
    assert res["threads_used"][1] == json.loads((tmp_path / "overlays.json").read_text())[-1]["model"]["decoder"][
        "session_options"]
    assert res["versions"]["onnxruntime_genai"] == "fake"


def test_turns_bench_pools_both_load_orders_and_adds_the_control(exported, tmp_path, monkeypatch, capsys):
    """Each process loads the two in the other order from the last, the rates are put back in the players' order
    before the ratio, and --control adds genai against itself; a missing genai build is named with its command."""
    from edgelm.cli import bench_turns

    export = exported("tiny-llama")
    with pytest.raises(SystemExit, match="edgelm bench .* --anchors"):
        bench_turns._anchor(export, tmp_path / "no-such-checkpoint")
    with pytest.raises(SystemExit, match="bench_turns: .* cannot import onnxruntime_genai"):  # this Python lacks it
        bench_turns._genai_python(sys.executable)
    monkeypatch.setattr(bench_turns, "_anchor", lambda e, c: tmp_path / "genai-int4")
    calls = []

    def process(python, export, anchor, order, req):  # edgelm at 100 tokens/s, genai at 200; first loaded 10% slow
        calls.append(list(order))
        speed = {"edgelm": 100.0, "genai": 200.0}
        rates = [[speed[order[0]] / 1.1, speed[order[1]]]] * req["rounds"]
        return {"rates": rates, "threads_used": [{"p": order[0]}, {"p": order[1]}], "versions": {}}

    monkeypatch.setattr(bench_turns, "_process", process)
    req = {"rounds": 2, "threads": 1, "new_tokens": 4, "prompt": 3}
    rows = bench_turns.measure([export], tmp_path, "python", 4, req, control=True, log=lambda m: None)
    assert calls[:4] == [["edgelm", "genai"], ["genai", "edgelm"]] * 2
    assert [r["players"] for r in rows] == [["edgelm", "genai"], ["genai", "genai"]]
    ratios = rows[0]["ratios"]
    assert len(ratios) == 8 and min(ratios) == pytest.approx(0.5 / 1.1) and max(ratios) == pytest.approx(0.5 * 1.1)
    assert rows[0]["threads_used"] == [{"p": "edgelm"}, {"p": "genai"}]
    control = rows[1]["ratios"]  # genai against itself: the place effect both ways, not always on one side
    assert min(control) == pytest.approx(1 / 1.1) and max(control) == pytest.approx(1.1)
    text = bench_turns.markdown(rows, req, 4)
    median = sorted(ratios)[3:5]
    assert f"| edgelm {export.name} | genai genai-int4 | {sum(median) / 2:.3f}x (" in text
    assert "| genai genai-int4 (control) | genai genai-int4 |" in text


def test_report_prints_what_each_system_ran_with():
    results = {
        "model": "m", "precision": "fp32", "attention": "onnx", "prompt_tokens": 8, "new_tokens": 12,
        "beam_new_tokens": 4, "runs": 1, "threads": 2, "machine": {"cpus": 2, "platform": "p"},
        "results": {"edgelm": {"greedy": {"decode_tps": {"median": 10.0, "min": 10.0, "max": 10.0}}}},
        "ran_with": {"genai": {"setting": "genai_config decoder session_options via og.Config.overlay",
                               "read_back": [{"intra_op_num_threads": 2, "inter_op_num_threads": 1}]}},
    }
    text = bench.markdown(results)
    assert "| genai | genai_config decoder session_options via og.Config.overlay | intra_op_num_threads=2" in text
    results["first_load"] = {"edgelm": {"load_s": 0.91, "load_cache": "written", "write_s": 0.6},
                             "genai": {"load_s": 0.3}}
    assert "edgelm 0.91 s (load cache: written; the entry written during the load in 0.60 s), genai 0.30 s" \
        in bench.markdown(results)
    results["first_load"]["edgelm"] = {"load_s": 0.25, "load_cache": "writing", "write_s": 0.8}
    assert "edgelm 0.25 s (load cache: writing; the entry written by a background process in 0.80 s)" \
        in bench.markdown(results)
    assert "first load on a machine" not in bench.markdown(results)  # no run loaded without an entry

    def med(x: float) -> dict:
        return {"median": x, "min": x, "max": x}

    # the first loads of every run, each with an empty load cache, held to genai's loads (it has no cache)
    results["results"]["edgelm"]["greedy"]["load_s"] = med(0.2)
    results["results"]["edgelm"][bench.FIRST_LOAD] = {"load_s": med(0.6), "cache_write_s": med(1.9),
                                                      "decode_tps": med(3.0)}
    results["results"]["genai"] = {"greedy": {"decode_tps": med(10.0), "load_s": med(0.5)}}
    text = bench.markdown(results)
    assert "| first load on a machine (no load cache entry), edgelm / genai (<= 1.0) | 1.20 | NO |" in text
    assert "| model load time, edgelm / genai (<= 1.0) | 0.40 | yes |" in text
    assert "first load on a machine (an empty load cache each run, the entry then written by a background " \
           "process): 0.60 (0.60-0.60) s; the background write 1.90 (1.90-1.90) s; loads that read the entry: " \
           "0.20 (0.20-0.20) s" in text
    assert f"| edgelm | {bench.FIRST_LOAD}" not in text  # its 2-token generation is no decode figure


def test_speculative_bench_checks_exactness_and_reports_every_configuration(exported, tmp_path):
    """bench_spec on tiny float32 models: every drafted/looked-up configuration reproduces greedy (a float32 target
    must), rows carry rates and acceptance, and the command exits 0."""
    from edgelm.cli import bench_spec
    from edgelm.export.draft import make_draft

    target, draft = exported("tiny-llama"), exported("tiny-gpt2")
    make_draft(draft, tmp_path / "cut", 200, log=lambda s: None)
    loop = [5, 17, 99, 3, 5, 17, 99, 3, 5, 17]  # repeats, so prompt lookup finds drafts
    workloads = {"code completion": [loop, [7, 8, 9]], "input-grounded edit": [loop * 3]}
    res = bench_spec.run(str(target), str(draft), runs=1, new_tokens=12, log=lambda s: None, workloads=workloads,
                         cut_draft_dir=str(tmp_path / "cut"), spinning_ablation=True)
    assert res["target_dtype"] == "float32"
    names = {r["config"] for r in res["rows"]}
    assert {"greedy", "draft, 20 tokens", "draft, heuristic from 5", "prompt lookup, 10", "prompt lookup, 3",
            "cut draft, 8 tokens",
            "draft, 8 tokens, workers spinning"} <= names
    assert res["step_ms"]["cut draft"] and "cut draft" in bench_spec.markdown(res)
    assert len(res["rows"]) == 2 * len(names)  # both workloads
    for r in res["rows"]:
        assert r["exact"] and r["first_difference"] is None, r
        assert r["tokens_per_s"] > 0 and r["whole_call_tokens_per_s"] > 0
    assert set(res["step_ms"]["target"]) == set(bench_spec.STEP_TOKENS) and all(
        ms > 0 for ms in res["step_ms"]["draft"].values())
    assert "| code completion | greedy |" in bench_spec.markdown(res)
    assert "One forward pass of the draft" in bench_spec.markdown(res)


def test_speculative_bench_stable_rows_are_checked_against_their_own_greedy(exported):
    """bench_spec --stable-rows on a tiny int4 target: the stable rows exist for both workloads, reproduce the
    stable load's greedy, and are timed per pass too; the exit code fails a stable row that leaves its greedy
    on any target, and other rows only on a float32 one."""
    from edgelm.cli import bench_spec

    loop = [5, 17, 99, 3, 5, 17, 99, 3, 5, 17]
    res = bench_spec.run(str(exported("tiny-llama", quantize="int4")), str(exported("tiny-gpt2")), runs=1,
                         new_tokens=10, log=lambda s: None, workloads={"code completion": [loop * 2]},
                         stable_rows=True)
    stable = {r["config"]: r for r in res["rows"] if r["config"].endswith("stable rows")}
    assert set(stable) == {"greedy, stable rows", "draft, 5 tokens, stable rows",
                           "prompt lookup, heuristic from 10, stable rows"}
    assert all(r["exact"] for r in stable.values()) and stable["draft, 5 tokens, stable rows"]["acceptance"] is not None
    assert set(res["step_ms"]["target, stable rows"]) == set(bench_spec.STEP_TOKENS)
    assert "One forward pass of the target, stable rows" in bench_spec.markdown(res)
    assert bench_spec.exit_code(res) == 0
    left = {**res, "rows": [{**r, "exact": r["config"] != "greedy"} for r in res["rows"]]}
    assert bench_spec.exit_code(left) == 0  # int4: a plain row may leave greedy
    assert bench_spec.exit_code({**left, "target_dtype": "float32"}) == 1
    assert bench_spec.exit_code({**res, "rows": [{**r, "exact": not r["config"].endswith("stable rows")}
                                                 for r in res["rows"]]}) == 1


def test_quality_report_agrees_with_the_export_and_adds_a_held_out_text(exported):
    """The benchmark's perplexity and KL divergence (its own code, onnxruntime on the graph) equal what the export
    measured on the built-in text (through the runtime's decoder); the held-out text is other tokens, and both
    ratios reach the table."""
    from edgelm.cli import bench_quality

    quantized, reference = exported("tiny-llama", quantize="int4"), exported("tiny-llama")
    q = bench_quality.quality(str(quantized), str(reference), threads=1)
    own = json.loads((quantized / "edgelm.json").read_text())["validation"]["quality"]
    assert q["perplexity_ratio"] == pytest.approx(own["ratio"], rel=1e-3)
    assert own["kl_divergence"] > 0 and q["kl_divergence"] == pytest.approx(own["kl_divergence"], rel=1e-3)
    assert q["heldout_tokens"] == bench_quality.HELDOUT_TOKENS
    assert bench_quality.heldout_ids(reference)[:50] != bench_quality.text_ids(reference)[:50]
    assert q["heldout_perplexity_ratio"] > 1.0 and q["heldout_perplexity_ratio"] != q["perplexity_ratio"]
    table = bench_quality.quality_markdown(q, "int4")
    assert "ratio on held-out text" in table and f"{q['heldout_perplexity_ratio']:.4f}" in table


def test_kl_divergence_is_zero_against_itself_and_matches_torch(exported):
    """graph_scores' divergence and perplexity against an independent computation (torch's kl_div and
    cross_entropy on logits from a session of our own), 0 for a graph against itself, and larger for int4 than for
    int8, all from one pass; the table shows it."""
    import onnxruntime as ort
    import torch

    from edgelm.cli import bench_quality
    from edgelm.export.quant import calibrate

    reference, int8, int4 = exported("tiny-llama"), exported("tiny-llama", quantize="int8"), \
        exported("tiny-llama", quantize="int4")
    ids = bench_quality.text_ids(reference)[:100]  # one window: the tiny model has 256 positions
    assert bench_quality.graph_scores(reference, {"self": reference}, ids, threads=1)["self"]["kl_divergence"] == 0.0
    scores = bench_quality.graph_scores(reference, {"int4": int4, "int8": int8}, ids, threads=1)
    got = scores["int4"]["kl_divergence"]
    logits = []
    for folder in (int4, reference):
        session = ort.InferenceSession(str(folder / "model.onnx"))
        feeds = calibrate.feeds_for(session, np.asarray([ids], np.int64))
        logits.append(torch.from_numpy(session.run(["logits"], feeds)[0][0, :-1].astype(np.float64)))
    want = torch.nn.functional.kl_div(torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1),
                                      log_target=True, reduction="batchmean").item()
    assert got == pytest.approx(want, rel=1e-6) and got > 0
    assert 0 < scores["int8"]["kl_divergence"] < got
    targets = torch.tensor(ids[1:])
    for value, lg in ((scores["int4"]["perplexity"], logits[0]), (scores["perplexity"], logits[1])):
        assert value == pytest.approx(torch.nn.functional.cross_entropy(lg, targets).exp().item(), rel=1e-9)
    assert bench_quality.graph_perplexity(int4, ids, threads=1) == scores["int4"]["perplexity"]
    q = {"reference": str(reference), "text_tokens": 300, "prompts": 1, "new_tokens": 1, "size_mb": 1.0,
         "perplexity": 2.0, "perplexity_ratio": 1.01, "heldout_perplexity_ratio": 1.02, "kl_divergence": got,
         "heldout_kl_divergence": 0.5, "identical_continuations": 1, "token_agreement": 1.0,
         "reference_size_mb": 2.0, "reference_perplexity": 1.9}
    assert f"{got:.4f} / 0.5000" in bench_quality.quality_markdown(q, "int4")


def test_graph_bench_times_each_graph_with_its_cache_written(exported, tmp_path, capsys):
    """bench_graph drives a fused graph on one shared KV buffer and a plain one by concatenation; in both the
    steps' keys reach the cache (the worker checks it and fails the run otherwise), and the table reads back
    the threads each session ran with."""
    from edgelm.cli import bench_graph

    fused, plain = exported("tiny-llama"), exported("tiny-gpt2")
    one = bench_graph.step_times(fused / "model.onnx", threads=1, prompt=3, steps=4)
    assert one["cache"] == "shared buffer" and one["cache_written"] and one["threads"] == 1
    assert bench_graph.step_times(plain / "model.onnx", threads=1, prompt=0, steps=4)["cache"] == "concat"
    out = tmp_path / "graph.json"
    assert bench_graph.main(["--pairs", str(fused), str(plain), str(plain), str(fused), "--runs", "1", "--steps", "4",
                             "--prompt", "3", "--threads", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [g["cache"] for g in res["graphs"]] == ["shared buffer", "concat"]  # each measured once
    assert all(g["intra_op_num_threads"] == 2 and g["step_ms"]["median"] > 0 and g["nodes"] > 0 for g in res["graphs"])
    text = capsys.readouterr().out
    assert "| 2 | shared buffer |" in text
    ms = {g["graph"]: g["step_ms"]["median"] for g in res["graphs"]}
    there = f"| {fused / 'model.onnx'} | {plain / 'model.onnx'} | {ms[str(plain / 'model.onnx')] / ms[str(fused / 'model.onnx')]:.2f}x |"
    assert there in text


def test_graph_bench_profile_counts_each_operator_per_step(exported, tmp_path, capsys, monkeypatch):
    """--profile reads onnxruntime's profiler back per operator type: per step, the fused tiny-llama graph runs one
    GroupQueryAttention per layer, and the profile file is not left behind. The temporary folder is this test's
    own (in this process and the fresh ones main() starts): other runs' leftovers in the machine's /tmp are not
    this run's doing."""
    import onnx

    from edgelm.cli import bench_graph

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    fused = exported("tiny-llama")
    graph = onnx.load(str(fused / "model.onnx"), load_external_data=False).graph
    layers = sum(n.op_type == "GroupQueryAttention" for n in graph.node)
    ops = bench_graph.step_times(fused / "model.onnx", threads=1, prompt=3, steps=4, profile=True)["operators"]
    assert layers > 0 and ops["GroupQueryAttention"]["nodes"] == layers
    assert all(v["us_per_step"] > 0 for v in ops.values())
    out = tmp_path / "graph.json"
    assert bench_graph.main([str(fused), "--runs", "1", "--steps", "4", "--prompt", "3", "--profile",
                             "--out", str(out)]) == 0
    assert json.loads(out.read_text())["operators"][str(fused / "model.onnx")]["GroupQueryAttention"]["nodes"] == layers
    assert "| GroupQueryAttention | " in capsys.readouterr().out
    assert not list(scratch.glob("bench_graph_*"))


def test_graph_bench_interleaved_pairs_both_graphs_in_one_process(exported, tmp_path, capsys, monkeypatch):
    """--interleaved runs each pair in one process, taking turns: every round gives a ratio (anchor's step time over
    the graph's, so above 1 means the graph is faster), pooled over the processes, and the table prints it."""
    from edgelm.cli import bench_graph

    fused, plain = exported("tiny-llama"), exported("tiny-gpt2")
    out = tmp_path / "graph.json"
    assert bench_graph.main(["--pairs", str(fused), str(plain), "--interleaved", "--runs", "2", "--steps", "4",
                             "--prompt", "3", "--threads", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["interleaved"]
    assert row["rounds"] == 2 * bench_graph.INTERLEAVED_ROUNDS
    assert 0 < row["ratio"]["q1"] <= row["ratio"]["median"] <= row["ratio"]["q3"]
    assert f"| {fused / 'model.onnx'} | {plain / 'model.onnx'} | {row['ratio']['median']:.3f}x (" in capsys.readouterr().out
    assert bench_graph.main(["--pairs", str(fused), str(plain), "--interleaved", "--control", "--runs", "2",
                             "--steps", "4", "--prompt", "3", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["interleaved"]
    assert [(r["graph"], r["against"]) for r in rows] == [(str(fused / "model.onnx"), str(plain / "model.onnx")),
                                                         (str(plain / "model.onnx"), str(plain / "model.onnx"))]
    assert f"| {plain / 'model.onnx'} | {plain / 'model.onnx'} (control) | " in capsys.readouterr().out

    class Fixed:  # a graph whose steps take a known time: the ratio's direction, without timing anything
        def __init__(self, path, *a, **k):
            self.seconds = 2.0 if Path(path).name == "slow" else 1.0

        def step(self):
            return self.seconds

        def cache_written(self):
            return True

    monkeypatch.setattr(bench_graph, "_Graph", Fixed)
    assert set(bench_graph.interleaved_ratios(Path("slow"), Path("fast"), 1, 0)["ratios"]) == {0.5}

    calls = []

    def biased(first, second, threads, prompt):  # the graph loaded first runs 10% slow: a place effect
        calls.append((first.name, second.name))
        seconds = {"slow": 2.0, "fast": 1.0}
        return [seconds[second.name] / (1.1 * seconds[first.name])] * 3

    monkeypatch.setattr(bench_graph, "_pair_process", biased)
    (row,) = bench_graph.interleaved([(Path("slow"), Path("fast"))], 4, 1, 0)
    assert calls == [("slow", "fast"), ("fast", "slow")] * 2  # the places swap from one process to the next
    assert row["rounds"] == 12 and row["ratio"]["q1"] == pytest.approx(0.5 / 1.1)
    assert row["ratio"]["q3"] == pytest.approx(0.5 * 1.1)  # both places pooled: the effect shows as spread,
    assert 0.5 / 1.1 < row["ratio"]["median"] < 0.5 * 1.1  # and the median sits between them, not at one end
    with pytest.raises(SystemExit):  # argparse's error: interleaving compares pairs
        bench_graph.main([str(fused), "--interleaved"])


def test_graph_bench_names_what_is_wrong_with_its_arguments(tmp_path):
    from edgelm.cli import bench_graph

    with pytest.raises(SystemExit, match="neither an export folder"):
        bench_graph.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        bench_graph.main(["genai:int4"])
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(SystemExit):  # argparse's error: an odd number of graphs cannot be paired
        bench_graph.main(["--pairs", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse's error: a control is an interleaved pair
        bench_graph.main(["--pairs", str(tmp_path), str(tmp_path), "--control"])


def _script(name):
    """A script of benchmarks/ as a module (scripts are not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _graph_ab():
    return _script("graph_ab")


def test_graph_ab_variants_take_out_only_what_they_name(exported, tmp_path):
    """benchmarks/graph_ab.py's surgeries: without zero points no quantized operator reads any; without the
    attention bias, and with gate and up as two products, one unpadded row decodes the same tokens as the
    export (those two are timing variants of the same model, so their figures compare like with like)."""
    import numpy as np
    import onnx

    from edgelm.runtime import CausalLM

    graph_ab = _graph_ab()
    src = exported("tiny-llama", quantize="int4")

    def ops(model_path):
        return onnx.load(str(model_path), load_external_data=False).graph.node

    nozp = graph_ab.make_variant(src, tmp_path / "nozp", ["nozp"])
    quantized = [n for n in ops(nozp) if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    assert quantized and all(len(n.input) <= 3 for n in quantized)
    assert any(len(n.input) > 3 for n in ops(src / "model.onnx") if n.op_type == "MatMulNBits")

    ids = [[5, 17, 42, 9, 33]]
    want = CausalLM.load(src).generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for name in ("nobias", "unfuse"):
        variant = graph_ab.make_variant(src, tmp_path / name, [name])
        before = sum(n.op_type == "MatMulNBits" for n in ops(src / "model.onnx"))
        after = sum(n.op_type == "MatMulNBits" for n in ops(variant))
        assert (after > before) == (name == "unfuse")
        biased = [len(n.input) > 10 for g in (src / "model.onnx", variant) for n in ops(g)
                  if n.op_type == "GroupQueryAttention"]
        assert biased[0] and (biased[-1] == (name != "nobias"))  # input 10: the attention bias
        got = CausalLM.load(variant.parent).generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        np.testing.assert_array_equal(got, want)


def test_graph_ab_nooffsets_takes_out_the_offsets_path_only():
    """``nooffsets`` rewires each product's readers to the MatMulNBits output and drops the offsets' operators,
    while an Add of a product and something else (a residual) stays, as does an offsets Add that is a graph
    output (there is nothing to rewire it to)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgelm.export.graph import prune_unused

    graph_ab = _graph_ab()
    rng = np.random.default_rng(0)
    k, n = 32, 16
    codes = rng.integers(0, 256, (n, 1, 16), dtype=np.uint8)  # 4-bit codes, one block of 32 per row
    inits = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(np.full(n, 0.1, np.float32), "S"),
             numpy_helper.from_array(np.ones((k, 1), np.float32), "J"),
             numpy_helper.from_array(rng.standard_normal((1, n)).astype(np.float32), "M")]
    nodes = []
    for i in range(2):  # product i: MatMulNBits + block sums + offsets product + Add
        nodes += [helper.make_node("MatMulNBits", ["x", "B", "S"], [f"main{i}"], domain="com.microsoft",
                                   K=k, N=n, bits=4, block_size=32, accuracy_level=0),
                  helper.make_node("MatMul", ["x", "J"], [f"sums{i}"]),
                  helper.make_node("MatMul", [f"sums{i}", "M"], [f"off{i}"]),
                  helper.make_node("Add", [f"main{i}", f"off{i}"], [f"y{i}"])]
    nodes += [helper.make_node("Add", ["y0", "x16"], ["residual"]), helper.make_node("Relu", ["residual"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
                                           helper.make_tensor_value_info("x16", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feeds = {"x": rng.standard_normal((1, k)).astype(np.float32), "x16": rng.standard_normal((1, n)).astype(np.float32)}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    before = run(model)
    graph_ab.SURGERIES["nooffsets"](model.graph)
    prune_unused(model.graph)
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Add") == 2 and ops.count("MatMul") == 2, ops
    after = run(model)
    main0 = ort.InferenceSession(helper.make_model(helper.make_graph(
        nodes[:1], "m", graph.input[:1], [helper.make_tensor_value_info("main0", TensorProto.FLOAT, None)], inits),
        opset_imports=model.opset_import).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": feeds["x"]})[0]
    np.testing.assert_allclose(after[0], np.maximum(main0 + feeds["x16"], 0), rtol=1e-6)
    assert not np.allclose(after[0], before[0])  # the offsets mattered, and are gone
    np.testing.assert_array_equal(after[1], before[1])  # the graph output's offsets path stays


def test_block_swap_takes_exactly_the_named_matrices(exported, tmp_path):
    """benchmarks/block_swap.py: the tiny llama's products fall one per role per layer and one head; a mix
    takes the named ones' blocks and weights from the donor and keeps the rest; taking all of them gives
    the donor's logits to the bit."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgelm.runtime import CausalLM

    block_swap = _script("block_swap")
    base, donor = exported("tiny-llama", quantize="int4", block_size=128), exported("tiny-llama", quantize="int4")

    def load(folder):
        return onnx.load(str(folder / "model.onnx"))

    def blocks(model):
        return {n.name: {a.name: a.i for a in n.attribute}["block_size"] for n in model.graph.node
                if n.op_type == "MatMulNBits"}

    def weights(model):
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    base_m, donor_m = load(base), load(donor)
    roles = [block_swap.role_of(n) for n in base_m.graph.node if n.op_type == "MatMulNBits"]
    layers = sorted({layer for layer, _ in roles if layer is not None})
    assert sorted(r for _, r in roles) == sorted(["qkv", "o", "gate_up", "down"] * len(layers) + ["head"])

    assert block_swap.swap(base, donor, tmp_path / "down", block_swap.parse_take("all:down")) == len(layers)
    mix = load(tmp_path / "down")
    roles_by_name = {n.name: block_swap.role_of(n)[1] for n in base_m.graph.node if n.op_type == "MatMulNBits"}
    want = {name: (blocks(donor_m) if roles_by_name[name] == "down" else blocks(base_m))[name]
            for name in roles_by_name}
    assert blocks(mix) == want and blocks(mix) != blocks(base_m)
    mixed_w, base_w, donor_w = weights(mix), weights(base_m), weights(donor_m)
    producer = {o: n for n in mix.graph.node for o in n.output}
    for n in mix.graph.node:
        if n.op_type == "MatMulNBits" and roles_by_name[n.name] in ("down", "qkv"):
            src = donor_w if roles_by_name[n.name] == "down" else base_w
            for name in block_swap._weights_read(n, producer, set(mixed_w)):
                np.testing.assert_array_equal(mixed_w[name], src[name])

    block_swap.swap(base, donor, tmp_path / "all", block_swap.parse_take("all:all"))
    ids = np.asarray([[5, 17, 42, 9, 33]], np.int64)
    a = CausalLM.load(tmp_path / "all").generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                                 output_scores=True, return_dict_in_generate=True)
    b = CausalLM.load(donor).generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                      output_scores=True, return_dict_in_generate=True)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        np.testing.assert_array_equal(sa, sb)

    with pytest.raises(SystemExit, match="unknown role"):
        block_swap.parse_take("0:mlp")
    with pytest.raises(SystemExit, match="LAYERS:ROLES"):
        block_swap.parse_take("down")
    singles = block_swap.single_swaps(base_m)
    assert len(singles) == len(roles)
    for spec, single in singles:  # each sweep row's label, given to --take, takes that one matrix
        assert [single(*lr) for lr in roles] == [block_swap.parse_take(spec)(*lr) for lr in roles]
        assert sum(single(*lr) for lr in roles) == 1
    take = block_swap.parse_take("0-1,3:qkv+2:down")
    assert take(1, "qkv") and take(3, "qkv") and take(2, "down") and not take(2, "qkv") and not take(None, "qkv")


@pytest.mark.parametrize("bits,block,zero_points", [(4, 32, False), (4, 32, True), (4, 64, False), (8, 32, False)])
def test_matmulnbits_rows_times_the_product_its_label_names(bits, block, zero_points):
    """benchmarks/matmulnbits_rows.py: the node it times multiplies by the weights its format row names (as
    ``BlockQuant.dequantize`` reads them, which the GGUF tests hold to the gguf package), up to the int8
    rounding of the activations that accuracy_level 4 does; ``--chain`` runs its pairs of products in
    order, each with weights of its own."""
    import numpy as np

    rows = _script("matmulnbits_rows")
    k, n = 128, 64
    a = np.random.default_rng(3).standard_normal((3, k)).astype(np.float32)

    (one,) = rows.matrices(k, n, bits, block, zero_points)
    attrs = {at.name: at.i for at in rows.model([one]).graph.node[0].attribute}
    assert (attrs["accuracy_level"], attrs["bits"], attrs["block_size"]) == (4, bits, block)
    assert (one.zero_points is not None) == zero_points
    want = a @ one.dequantize().T
    got = rows.session([one], threads=1).run(None, {"A": a})[0]
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()

    chained = rows.matrices(k, n, bits, block, zero_points, chain=2)
    assert [m.shape for m in chained] == [(n, k), (k, n)] * 2
    assert [nd.op_type for nd in rows.model(chained).graph.node] == ["MatMulNBits"] * 4
    want = a
    for m in chained:
        want = want @ m.dequantize().T
    assert not np.array_equal(chained[0].q, chained[2].q)  # weights of its own: nothing shared in the cache
    got = rows.session(chained, threads=1).run(None, {"A": a})[0]
    assert got.shape == (3, k)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_matmulnbits_rows_prints_a_row_per_shape_and_format(capsys):
    rows = _script("matmulnbits_rows")
    assert rows.main(["--shapes", "64x32", "96x32", "--rows", "1", "2", "--repeats", "2", "--threads", "1"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 64 x") or ln.startswith("| 96 x")]
    # 64 takes every block size; 96 is no multiple of 64, so its blocks-of-64 row is left out
    assert len([ln for ln in lines if ln.startswith("| 64 x")]) == 4
    assert len([ln for ln in lines if ln.startswith("| 96 x")]) == 3
    assert all(float(ln.rstrip(" |").split("|")[-1]) > 0 for ln in lines)
    assert rows.main(["--shapes", "64x32", "--chain", "2", "--rows", "1", "2", "--repeats", "2", "--threads", "1"]) == 0
    chained = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 2 x (64 x 32, 32 x 64)")]
    assert len(chained) == 3  # 32 outputs cannot be the input of a product in blocks of 64
    with pytest.raises(SystemExit):  # every figure is read against one row
        rows.main(["--rows", "2", "4"])
    with pytest.raises(SystemExit):
        rows.main(["--shapes", "64by32"])
    with pytest.raises(SystemExit):
        rows.main(["--chain", "-1"])


def test_load_peak_measures_each_load_in_a_fresh_process_with_its_cache_setting(exported, tmp_path, capsys):
    """benchmarks/load_peak.py: a row's process loads with the cache setting it names (the cache it points
    to gets written, or stays empty with the cache off), and its figures are memory of that process."""
    load_peak = _script("load_peak")
    folder = exported("tiny-llama")
    on, off = tmp_path / "on", tmp_path / "off"
    mb = load_peak.measure(folder, 1, {"EDGELM_LOAD_CACHE_DIR": str(on)})
    assert on.is_dir() and any(on.rglob("*"))
    load_peak.measure(folder, 1, {"EDGELM_LOAD_CACHE_DIR": str(off), "EDGELM_LOAD_CACHE": "0"})
    assert not off.exists() or not any(off.rglob("*"))
    assert set(mb) == set(load_peak.FIELDS)
    assert mb["VmHWM"] >= mb["RssAnon"] > 0 and abs(mb["VmRSS"] - mb["RssAnon"] - mb["RssFile"]) < 64
    assert load_peak.main([str(folder), "--threads", "1"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "MB" not in ln]
    assert [ln.split(" | ")[0] for ln in rows] == ["| first load (the entry then written in the background)",
                                                 "| from the load cache", "| first load writing the entry (sync)",
                                                 "| load cache off"]
    with pytest.raises(SystemExit):
        load_peak.main([str(tmp_path)])


@pytest.mark.parametrize("options", [{}, {"quantize": "int4"}])
def test_verify_rows_finds_no_row_dependence_before_attention_and_none_with_stable_rows(exported, options, capsys):
    """benchmarks/verify_rows.py: in edgelm's graphs every operator up to the first attention computes a token's
    row the same whether the pass feeds it alone or among others (the README's account of why drafted runs
    can leave greedy on quantized targets rests on this); what differs starts at GroupQueryAttention, whose
    probabilities x V product takes MLAS's one-row kernel in a one-token pass, or, on CPUs where MatMulNBits has
    a one-row kernel of its own (AVX2), at MatMulNBits, in the last bits. stable_rows removes both."""
    verify_rows = _script("verify_rows")
    folder = exported("tiny-llama", **options)
    result = verify_rows.node_diffs(folder, tokens=3, prompt_tokens=8, threads=1)
    ops = [op for _, op, _ in result["nodes"]]
    assert "GroupQueryAttention" in ops and ("MatMulNBits" if options else "MatMul") in ops
    before = ops.index("GroupQueryAttention")
    if options:  # MLAS's one-row MatMulNBits kernel sums in its own order on some CPUs (AVX2: ~1e-6), not on others
        assert before >= 2 and all(diff <= 1e-5 for _, _, diff in result["nodes"][:before])
        assert result["first"] is None or result["first"][1] in ("GroupQueryAttention", "MatMulNBits")
    else:
        assert before >= 2 and all(diff == 0.0 for _, _, diff in result["nodes"][:before])
        assert result["first"] is None or result["first"][1] == "GroupQueryAttention"
    assert len(result["logits"]) == 3
    if not options:  # float32: a last-bit difference stays in the last bits
        assert all(r["max_diff"] < 1e-4 and r["same_pick"] for r in result["logits"])
    stable = verify_rows.node_diffs(folder, tokens=3, prompt_tokens=8, threads=1, stable_rows=True)
    assert stable["first"] is None and len(stable["nodes"]) == len(result["nodes"])  # as CausalLM(stable_rows=True)
    assert all(r["max_diff"] == 0.0 for r in stable["logits"])
    gemm = verify_rows.gemm_rows(t=40, h=16)
    assert gemm["2 vs 4 rows"] == 0.0 and gemm["1 vs 4 rows"] < 1e-5
    assert verify_rows.main([str(folder), "--tokens", "2", "--prompt-tokens", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| fed token |" in out and out.count("\n| 0 |") == 1 and "\n| 1 |" in out
    assert not list(folder.glob("*.probe.onnx"))  # the probed copy does not stay beside the export
    with pytest.raises(SystemExit):
        verify_rows.main([str(folder), "--tokens", "1"])
    with pytest.raises(SystemExit):
        verify_rows.main([str(folder.parent)])


def test_greedy_head_script_reads_the_heads_bound_and_picks(exported, capsys):
    """benchmarks/greedy_head.py: on a real prefill the bound holds for every token (error below bound), the full
    head's argmax is among each position's candidates, the picks are the full head's, and the exit code turns
    on exactly those; a graph without the head is refused by name, and no probed copy stays behind."""
    script = _script("greedy_head")
    folder = exported("tiny-llama")
    res = script.measure(folder, positions=40, threads=1)
    assert res["positions"] == 40 and res["vocab"] > 40
    assert 0 < res["err_over_bound"]["max"] < 1
    assert res["argmax_among_candidates"] == 40 and res["same_pick"] == 40 and res["differing"] == []
    assert 1 <= res["candidates"]["median"] <= res["candidates"]["max"] <= res["vocab"]
    assert script.failures(res) == []
    broken = {**res, "err_over_bound": {"max": 1.2, "median": 0.1}, "argmax_among_candidates": 39,
              "differing": [{"position": 3, "greedy_head": 1, "full_head": 2, "margin": 1.0}]}
    assert len(script.failures(broken)) == 3
    near_tie = {**res, "differing": [{"position": 3, "greedy_head": 1, "full_head": 2, "margin": 0.0}]}
    assert script.failures(near_tie) == []
    assert script.main([str(folder), "--positions", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "candidates per position: median" in out and "same pick as the full head at 16" in out
    assert not list(folder.glob("*.probe.onnx"))
    with pytest.raises(SystemExit, match="no greedy head"):
        script.main([str(exported("tiny-llama", quantize="int8"))])


def test_loop_overhead_splits_each_step_and_checks_both_loops_agree(exported, capsys, monkeypatch):
    """benchmarks/loop_overhead.py: generate and the bare decoder loop feed the same tokens (they are compared,
    and a loop that parts from generate voids the run), and every step's time is split into onnxruntime's run
    and the rest."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "loop_overhead.py"
    spec = importlib.util.spec_from_file_location("loop_overhead", path)
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    folder = exported("tiny-llama")
    assert loop.main([str(folder), "--new-tokens", "6", "--repeats", "1", "--threads", "1"]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): [float(v) for v in line.strip(" |").split(" | ")[1:]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line}
    names = ("generate", "generate, EOS banned", "decoder loop", "per call")
    assert set(rows) == set(names)
    # One onnxruntime run per new token in every loop (the prompt's prefill is the first), one for a call of one.
    assert [rows[name][3] for name in names] == [6, 6, 6, 1]
    for ort_ms, outside_ms, total_ms, _ in rows.values():
        assert ort_ms > 0 and outside_ms > 0 and total_ms > ort_ms
    from edgelm.runtime import CausalLM

    lm = CausalLM.load(folder, threads=1)
    ids = np.asarray([lm.tokenizer.encode(loop.PROMPT)[:64]], np.int64)
    want = lm.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
    assert loop.decoder_loop(lm, ids, 6) == [int(t) for t in want]
    monkeypatch.setattr(loop, "decoder_loop", lambda lm, ids, n: [0] * n)
    with pytest.raises(SystemExit, match="differ"):
        loop.main([str(folder), "--new-tokens", "6", "--repeats", "1", "--threads", "1"])
