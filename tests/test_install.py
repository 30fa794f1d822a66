"""``pip install .`` alone (runtime only) works in a fresh virtual environment against models exported here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_runtime_only_install_in_fresh_venv(tmp_path, exported):
    causal, masked = exported("tiny-qwen2"), exported("tiny-roberta")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frozen = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, env=env).stdout.lower()
    for heavy in ("torch", "transformers", "optimum"):
        assert not any(line.startswith(heavy) for line in frozen.splitlines()), frozen
    script = f"""
import json, numpy as np
from edgelm.runtime import CausalLM, MaskedLM
lm = CausalLM.load({str(causal)!r})
out = lm.generate(np.array([[5, 6, 7]]), max_new_tokens=8, eos_token_id=None)
fm = MaskedLM.load({str(masked)!r}).fill_mask('The capital of <mask>.', top_k=3)
print(json.dumps(dict(out=out.tolist(), fm=[c['token'] for c in fm])))
"""
    run = subprocess.run([str(py), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    from edgelm.runtime import CausalLM, MaskedLM
    import numpy as np

    assert got["out"] == CausalLM.load(causal).generate(np.array([[5, 6, 7]]), max_new_tokens=8, eos_token_id=None).tolist()
    assert got["fm"] == [c["token"] for c in MaskedLM.load(masked).fill_mask("The capital of <mask>.", top_k=3)]
    cli = subprocess.run([str(venv / "bin" / "edgelm"), "generate", str(causal), "hi", "--max-new-tokens", "3", "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert cli.returncode == 0, cli.stderr
    export = subprocess.run([str(venv / "bin" / "edgelm"), "export", str(causal), str(tmp_path / "x")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert export.returncode == 2 and "edgelm[export]" in export.stderr


def test_every_package_folder_is_packaged():
    """A subpackage missing from pyproject's explicit list works in an editable install and is absent from a wheel
    (``edgelm.export.quant`` once was): every folder with an ``__init__.py`` must be listed, mapped to itself."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup["package-dir"]
    folders = {str(p.parent.relative_to(ROOT)) for top in ("cli", "export", "runtime", "models")
               for p in (ROOT / top).rglob("__init__.py")}
    listed = {dirs[name] for name in setup["packages"]}
    assert folders == listed, f"unlisted: {sorted(folders - listed)}, stale: {sorted(listed - folders)}"
    for name in setup["packages"]:
        assert dirs[name].replace("/", ".") == name.removeprefix("edgelm."), name
