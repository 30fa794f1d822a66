"""edgelm verify: passes on a correct export, fails naming the case on a wrong one, exit codes as documented."""

from __future__ import annotations

import json
import subprocess
import sys


def _verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm.cli", "verify", *map(str, args)], capture_output=True,
                          text=True, timeout=900)


def test_correct_export_passes_every_strategy(exported):
    proc = _verify(exported("tiny-llama"), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    names = [r["strategy"] for r in result["rows"]]
    assert {"greedy (batch 1)", "greedy (left-padded batch)", "beam search (4 beams, 2 returned)",
            "diverse beam search (4 beams, 2 groups)", "contrastive search",
            "repetition penalty + no-repeat 3-grams"} <= set(names)
    assert any(n.startswith("sampling scores") for n in names)
    assert all(r["passed"] and r["exact"] == r["cases"] for r in result["rows"])


def test_wrong_reference_fails_and_names_the_case(exported, checkpoint):
    """Another model's weights behind the same tokenizer: verify exits 1 and the table says where."""
    proc = _verify(exported("tiny-llama"), "--reference", checkpoint("tiny-mistral"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    greedy = next(line for line in proc.stdout.splitlines() if line.startswith("| greedy (batch 1)"))
    assert "DIFFERS" in greedy and "| 0 |" in greedy  # differs from the first generated token


def test_masked_export_against_the_fill_mask_pipeline(exported):
    proc = _verify(exported("tiny-bert"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fill-mask top-5 candidates | 2 | 2/2" in proc.stdout


def test_usage_errors(exported, tmp_path):
    proc = _verify(exported("tiny-llama"), "--prompts", tmp_path / "none.txt")
    assert proc.returncode == 2 and "one prompt per line" in proc.stderr
    (tmp_path / "p.txt").write_text("Hello there\nGeneral Kenobi\n")
    proc = _verify(exported("tiny-llama"), "--prompts", tmp_path / "p.txt", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["rows"][0]["cases"] == 2
