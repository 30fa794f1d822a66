"""The Android demo's generation core (TypeScript, onnxruntime-common) against the real SmolLM2 model.ort.

It runs under onnxruntime-node here; the same code runs in the app on onnxruntime-react-native.
References come from Python: `tokenizers` for ids, edgelm's runtime for greedy tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgelm.runtime import CausalLM

DEMO = Path(__file__).resolve().parent.parent / "android_demo"
STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "naïve café, crème brûlée, Ångström, São Paulo",
    "emoji: 🙂🚀👩‍💻 and flags 🇫🇷",
    "中文字符和日本語のテキスト, 한국어",
    "whitespace   runs\t\ttabs\n\n\nnewlines    ",
    "   leading and trailing   ",
    "<|im_start|>user\nhi<|im_end|>",
    "code: def f(x):\n    return x ** 2  # square",
    "",
]
PROMPTS = [
    {"prompt": "The capital of France is", "max_new_tokens": 32},
    {"prompt": "def fibonacci(n):", "max_new_tokens": 32},
    {"prompt": "What is the boiling point of water?", "chat": True, "max_new_tokens": 32},
    {"prompt": "Write a haiku about autumn leaves.", "chat": True, "max_new_tokens": 32},
]


def _npx() -> str:
    npx = shutil.which("npx")
    if npx is None or not (DEMO / "node_modules" / "onnxruntime-node").is_dir():
        pytest.fail("android_demo's npm dependencies are missing: run ./scripts/setup.sh (needs Node.js and npm)")
    return npx


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    proc = subprocess.run([_npx(), *args], cwd=DEMO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _core(model_dir: Path, cases: dict, tmp_path: Path, *extra: str) -> dict:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    proc = _run("tsx", "tools/core-cli.ts", str(model_dir), str(path), "--threads", "2", *extra)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("config", ["tsconfig.json", "tsconfig.node.json"])
def test_demo_typechecks(config):
    """The app (React Native types) and the core/tools (Node types) compile with tsc --strict."""
    _run("tsc", "--noEmit", "-p", config)


def test_demo_unit_tests():
    _run("node", "--import", "tsx", "--test", "test/sampling.test.ts")


def test_demo_android_bundle_builds(tmp_path):
    """Metro bundles the app for Android exactly as the Gradle build's bundling step does."""
    out = tmp_path / "index.android.bundle"
    _run("react-native", "bundle", "--platform", "android", "--dev", "false", "--entry-file", "index.js",
         "--bundle-output", str(out), "--assets-dest", str(tmp_path / "res"))
    text = out.read_text()
    assert "EdgeLMDemo" in text and "past_key_values." in text and len(text) > 100_000


@pytest.fixture(scope="module")
def smollm2_mobile(exported):
    return exported("smollm2-135m-instruct", mobile=True)


def test_demo_tokenizer_matches_tokenizers(smollm2_mobile, tmp_path):
    out = _core(smollm2_mobile, {"tokenize": STRINGS}, tmp_path)
    tok = Tokenizer.from_file(str(smollm2_mobile / "tokenizer.json"))
    for text, ids, decoded in zip(STRINGS, out["tokenize"], out["decode"]):
        want = tok.encode(text).ids
        assert ids == want, text
        assert decoded == tok.decode(want, skip_special_tokens=False), text


def test_demo_greedy_matches_python_runtime(smollm2_mobile, tmp_path):
    # The core feeds logits_to_keep=1 to a prefill when the export lists it: onnxruntime-node must take it.
    assert "logits_to_keep" in json.loads((smollm2_mobile / "edgelm.json").read_text())["inputs"]
    out = _core(smollm2_mobile, {"generate": PROMPTS}, tmp_path)
    lm = CausalLM.load(smollm2_mobile, model_file="model.ort")
    for case, got in zip(PROMPTS, out["generate"]):
        enc = lm.encode_prompts(case["prompt"], chat=case.get("chat", False))
        assert got["prompt_ids"] == enc["input_ids"][0].tolist(), case
        ref = lm.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=case["max_new_tokens"], do_sample=False)
        want = ref[0, enc["input_ids"].shape[1]:].tolist()
        assert got["ids"] == want, case
        assert got["text"] == lm.tokenizer.decode(want, skip_special_tokens=True)
        assert got["stats"]["newTokens"] == len(want) and got["stats"]["decodeTokensPerSecond"] > 0


def test_demo_drives_static_shape_models(exported, tmp_path):
    """A --static-shapes --mobile export (what NNAPI needs) gives the demo the dynamic model's greedy tokens."""
    static = exported("tiny-llama", static_max_length=64, mobile=True)
    cases = {"generate": [{"prompt": "hello world", "max_new_tokens": 30}, {"prompt": "the cat sat", "max_new_tokens": 30}]}
    out = _core(static, cases, tmp_path)
    lm = CausalLM.load(exported("tiny-llama"))
    for case, got in zip(cases["generate"], out["generate"]):
        ids = np.asarray(lm.tokenizer(case["prompt"])["input_ids"]).reshape(1, -1)
        want = lm.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:].tolist()
        assert got["ids"] == want


def test_demo_sampling_runs_and_reproduces(smollm2_mobile, tmp_path):
    case = {"prompt": "Once upon a time", "max_new_tokens": 24, "do_sample": True, "temperature": 0.8, "top_p": 0.9,
            "seed": 3}
    a, b = (_core(smollm2_mobile, {"generate": [case]}, tmp_path)["generate"][0] for _ in range(2))
    assert a["ids"] == b["ids"] and len(a["ids"]) > 0
    c = _core(smollm2_mobile, {"generate": [{**case, "seed": 4}]}, tmp_path)["generate"][0]
    assert c["ids"] != a["ids"]


def test_demo_reports_bad_model_folders(tmp_path):
    proc = subprocess.run([_npx(), "tsx", "tools/core-cli.ts", str(tmp_path), str(tmp_path / "none.json")],
                          cwd=DEMO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    (tmp_path / "none.json").write_text("{}")
    proc = subprocess.run([_npx(), "tsx", "tools/core-cli.ts", str(tmp_path), str(tmp_path / "none.json")],
                          cwd=DEMO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "edgelm.json is missing" in proc.stderr and "--mobile" in proc.stderr
