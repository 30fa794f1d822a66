"""The exporter: every architecture exports and validates, the I/O contract holds, bad input fails cleanly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import CAUSAL, MASKED
from edgelm.runtime.errors import ExportError


def _names(folder: Path) -> tuple[list[str], list[str]]:
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]


@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_export_validates_with_optimum_names(arch, exported):
    folder = exported(f"tiny-{arch}")
    man = json.loads((folder / "edgelm.json").read_text())
    assert man["task"] == "causal-lm"
    assert man["validation"]["passed"] is True
    assert man["validation"]["max_abs_diff_logits"] < 1e-3
    assert man["validation"]["steps"] == ["prefill", "decode0", "decode1", "decode2", "chunk",
                                          "prefill, last position's logits only", "prefill through the greedy head"]
    inputs, outputs = _names(folder)
    n = man["num_layers"]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert outputs == ["logits", "last_hidden_state"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")
                                                         ] + ["greedy_ids", "greedy_logits"]
    for f in ("tokenizer.json", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (folder / f).is_file(), f


def test_tokenizer_json_is_written_compact_with_the_same_content(exported, checkpoint, tmp_path):
    """tokenizer.json (and vocab.json) lose their indentation, not their content: the same JSON as transformers
    saves, and the same ids from the tokenizers library."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = exported("tiny-llama")
    AutoTokenizer.from_pretrained(checkpoint("tiny-llama")).save_pretrained(tmp_path)
    ours, theirs = (folder / "tokenizer.json").read_text(), (tmp_path / "tokenizer.json").read_text()
    assert "\n" not in ours and len(ours) < len(theirs)
    assert json.loads(ours) == json.loads(theirs)
    text = "hello world, héllo 世界"
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids == \
        Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids


@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_graph_shapes_are_dynamic(arch, exported):
    """Empty past, batch 3, a chunk of 4 on a past of 5: shapes follow the inputs."""
    folder = exported(f"tiny-{arch}")
    man = json.loads((folder / "edgelm.json").read_text())
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    h, d, n = man["num_key_value_heads"], man["head_dim"], man["num_layers"]
    for batch, past, new in ((3, 0, 6), (1, 5, 4), (2, 7, 1)):
        feeds = {"input_ids": np.full((batch, new), 5, np.int64),
                 "attention_mask": np.ones((batch, past + new), np.int64),
                 "position_ids": np.tile(np.arange(past, past + new), (batch, 1)).astype(np.int64)}
        for i in range(n):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = np.zeros((batch, h, past, d), np.float32)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        assert outs["logits"].shape == (batch, new, man["vocab_size"])
        assert outs["last_hidden_state"].shape == (batch, new, man["hidden_size"])
        assert outs["present.0.key"].shape == (batch, h, past + new, d)
        for keep in (1, 2, new + 3, 0):  # the last k positions; 0 (the default) and k > new give them all
            kept = dict(zip([o.name for o in sess.get_outputs()],
                            sess.run(None, {**feeds, "logits_to_keep": np.array([keep], np.int64)})))
            want = outs["logits"][:, -keep:] if keep else outs["logits"]
            assert kept["logits"].shape == want.shape
            np.testing.assert_allclose(kept["logits"], want, atol=1e-5)
            assert kept["last_hidden_state"].shape == (batch, new, man["hidden_size"])  # contrastive reads it whole


@pytest.mark.parametrize("arch", CAUSAL)
def test_logits_to_keep_is_optional_and_used_by_the_prefill(arch, exported, monkeypatch):
    """``logits_to_keep`` is an input with a default: callers feeding optimum's inputs never see it, while the
    runtime's prefill asks for the last position only and gets the logits a full run gives there."""
    from edgelm.runtime import CausalLM
    from edgelm.runtime.decoder import Decoder

    folder = exported(f"tiny-{arch}")
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "logits_to_keep" not in [i.name for i in sess.get_inputs()]
    assert [i.name for i in sess.get_overridable_initializers()] == ["logits_to_keep", "greedy_head"]
    assert "logits_to_keep" in json.loads((folder / "edgelm.json").read_text())["inputs"]
    lm = CausalLM.load(folder)
    assert lm.decoder.keeps_logits
    asked, rows = [], []
    run = Decoder._run

    def spy(self, feeds, cache, want_hidden, new, keep=None, greedy=False, reuse=None):
        out = run(self, feeds, cache, want_hidden, new, keep, greedy=greedy, reuse=reuse)
        asked.append((new, keep))
        rows.append((out[2][1] if greedy else out[0]).shape[1])  # greedy search reads the greedy head's logits
        return out

    monkeypatch.setattr(Decoder, "_run", spy)
    prompt = np.array([[5, 9, 3, 7, 11, 2]], np.int64)
    out = lm.generate(prompt, max_new_tokens=3, do_sample=False)
    assert asked[0] == (6, 1) and rows[0] == 1 and all(k == 1 for _, k in asked)
    cache = lm.decoder.new_cache(1)
    full, _ = lm.decoder.step(prompt, np.ones_like(prompt), np.arange(6)[None], cache)
    assert full.shape[1] == 6 and asked[-1] == (6, 0)
    assert out[0, 6] == int(full[0, -1].argmax())


@pytest.mark.parametrize("arch", MASKED)
def test_masked_export_validates(arch, exported):
    folder = exported(f"tiny-{arch}")
    man = json.loads((folder / "edgelm.json").read_text())
    assert man["task"] == "masked-lm" and man["validation"]["passed"]
    inputs, outputs = _names(folder)
    assert outputs == ["logits"]
    want = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    assert inputs == want


def test_last_hidden_state_feeds_lm_head(exported, hf_model):
    """last_hidden_state is the final-norm state: the LM head applied to it gives the logits."""
    folder = exported("tiny-llama")
    model, _ = hf_model("tiny-llama")
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    man = json.loads((folder / "edgelm.json").read_text())
    feeds = {"input_ids": np.array([[3, 4, 5]], np.int64), "attention_mask": np.ones((1, 3), np.int64),
             "position_ids": np.arange(3)[None].astype(np.int64)}
    for i in range(man["num_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, man["num_key_value_heads"], 0, man["head_dim"]), np.float32)
    logits, hidden = sess.run(["logits", "last_hidden_state"], feeds)
    w = model.lm_head.weight.detach().numpy()
    np.testing.assert_allclose(hidden @ w.T, logits, atol=1e-4)


@pytest.mark.real
def test_smollm2_export(exported):
    folder = exported("smollm2-135m-instruct")
    man = json.loads((folder / "edgelm.json").read_text())
    assert man["validation"]["passed"] and man["validation"]["max_abs_diff_logits"] < 1e-3
    assert man["num_layers"] == 30 and man["num_key_value_heads"] == 3 and man["head_dim"] == 64
    assert man["eos_token_id"] == [2] and man["vocab_size"] == 49152
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (folder / "tokenizer_config.json").read_text())


@pytest.mark.real
def test_antiberty_export(exported):
    folder = exported("antiberty")
    man = json.loads((folder / "edgelm.json").read_text())
    assert man["validation"]["passed"] and man["vocab_size"] == 25
    assert man["architecture"] == "BertForMaskedLM"


@pytest.mark.real
def test_export_from_gguf(tmp_path):
    """A .gguf file exports to float32 (dequantized by transformers, --quantize none) and validates."""
    from edgelm.export import export_model
    from edgelm.models.real import smollm2_gguf

    man = export_model(smollm2_gguf(log=lambda s: None), tmp_path / "out", quantize="none", log=lambda s: None)
    assert man.validation["passed"] and man.num_layers == 30
    assert (tmp_path / "out" / "model.onnx").is_file()


# --- bad input ---------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm.cli", *args], capture_output=True, text=True, timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = [l for l in proc.stderr.splitlines() if l.startswith("edgelm: error:")]
    assert len(err) == 1, proc.stderr
    for needle in needles:
        assert needle in err[0], err[0]


def test_missing_source(tmp_path):
    _one_line_error(_cli("export", str(tmp_path / "nope"), str(tmp_path / "out")), "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "src").mkdir()
    _one_line_error(_cli("export", str(tmp_path / "src"), str(tmp_path / "out")), "no config.json")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    _one_line_error(_cli("export", str(bad), str(tmp_path / "out")), "not a valid GGUF")
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 20)
    _one_line_error(_cli("export", str(truncated), str(tmp_path / "out2")), "GGUF")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPTNeoXConfig

    GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  vocab_size=100, architectures=["GPTNeoXForCausalLM"]).save_pretrained(tmp_path / "src")
    _one_line_error(_cli("export", str(tmp_path / "src"), str(tmp_path / "out")), "gpt_neox", "Llama", "BERT")


def test_existing_output_refused_unless_overwrite(tmp_path, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(_cli("export", str(checkpoint("tiny-gpt2")), str(out)), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    proc = _cli("export", str(checkpoint("tiny-gpt2")), str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "edgelm.json").is_file() and not (out / "keep.txt").exists()


def test_failed_validation_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    """A graph that disagrees with PyTorch fails the export and writes no folder (nor temporary leftovers)."""
    from edgelm.export import api, validate

    monkeypatch.setattr(validate, "LOGITS_ATOL", -1.0)
    monkeypatch.setattr(validate, "LOGITS_RTOL", -1.0)
    with pytest.raises(ExportError, match="validation failed"):
        api.export_model(checkpoint("tiny-llama"), tmp_path / "out", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_broken_rotary_fails_validation(tmp_path, checkpoint, monkeypatch):
    """The tolerance grows with the logits' spread, but a wrong graph (rotary tables one position off) still fails,
    on the values and on top-1 agreement; a correct export reports how much of the limit it used."""
    import torch

    from edgelm.export import api, fused

    ok = api.export_model(checkpoint("tiny-llama"), tmp_path / "ok", log=lambda s: None).validation
    assert ok["passed"] and ok["top1_agreement"] == 1.0 and ok["top1_positions"] > 0
    assert 0 <= ok["logits_margin_used"] < 0.5 and ok["logits_atol"] >= 1e-3
    real = fused.rotary_tables

    def shifted(model):
        cos, sin = real(model)
        return torch.roll(cos, 1, dims=0), torch.roll(sin, 1, dims=0)

    monkeypatch.setattr(fused, "rotary_tables", shifted)
    with pytest.raises(ExportError, match="validation failed.*top-1 agreement"):
        api.export_model(checkpoint("tiny-llama"), tmp_path / "bad", log=lambda s: None)
    assert not (tmp_path / "bad").exists()


def test_export_help_explains_options():
    proc = _cli("export", "--help")
    assert proc.returncode == 0
    for opt in ("--task", "--overwrite", "--opset", "SOURCE".lower()):
        assert opt in proc.stdout.lower()
    assert "gguf" in proc.stdout.lower()


def test_optimum_export_folder_loads_and_matches(tmp_path, checkpoint, exported):
    """A folder from optimum's exporter loads; greedy tokens match ours; contrastive search says why it cannot run."""
    from optimum.exporters.onnx import main_export

    from edgelm.runtime import CausalLM
    from edgelm.runtime.errors import UnsupportedError

    out = tmp_path / "optimum"
    main_export(str(checkpoint("tiny-llama")), str(out), task="text-generation-with-past")
    theirs = CausalLM.load(out)
    ours = CausalLM.load(exported("tiny-llama"))
    prompt = np.array([[5, 17, 99, 3]], np.int64)
    np.testing.assert_array_equal(theirs.generate(prompt, max_new_tokens=12), ours.generate(prompt, max_new_tokens=12))
    assert not theirs.decoder.has_hidden
    with pytest.raises(UnsupportedError, match="last_hidden_state"):
        theirs.decoder.step(prompt, np.ones_like(prompt), np.arange(4)[None], theirs.decoder.new_cache(1), want_hidden=True)


def test_int8_export_runs_and_mostly_agrees(tmp_path, checkpoint, exported):
    """--quantize int8 gives a smaller graph with the same I/O (less the greedy head, a float32 export's) that the
    runtime drives unchanged."""
    from edgelm.export import export_model
    from edgelm.runtime import CausalLM

    man = export_model(checkpoint("tiny-llama"), tmp_path / "q8", quantize="int8", log=lambda s: None)
    fp32 = exported("tiny-llama")
    fp32_bytes = sum(p.stat().st_size for p in fp32.glob("model.onnx*"))
    assert 0 < man.validation["quantization"]["weight_bytes"] < 0.6 * fp32_bytes
    inputs, outputs = _names(fp32)
    assert _names(tmp_path / "q8") == (inputs, [o for o in outputs if not o.startswith("greedy_")])
    ids = np.array([[5, 17, 99, 3]], np.int64)
    q = CausalLM.load(tmp_path / "q8").generate(ids, max_new_tokens=8, eos_token_id=None)
    f = CausalLM.load(fp32).generate(ids, max_new_tokens=8, eos_token_id=None)
    assert q.shape == f.shape and q[0, 4] == f[0, 4]  # the first token survives 8-bit weights on this model
