"""The runtime never imports torch, transformers or optimum."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
                raise ImportError('blocked in this test: ' + name)
            return None
    sys.meta_path.insert(0, Block())
""")


def test_runtime_works_where_heavy_imports_fail(exported):
    causal, masked = exported("tiny-llama"), exported("tiny-bert")
    script = BLOCKER + textwrap.dedent(f"""
        import json, numpy as np
        try:
            import torch
            raise SystemExit('the blocker did not block torch')
        except ImportError:
            pass
        from edgelm.runtime import CausalLM, MaskedLM
        lm = CausalLM.load({str(causal)!r})
        greedy = lm.generate(np.array([[5, 6, 7]]), max_new_tokens=6, eos_token_id=None).tolist()
        sampled = lm.generate(np.array([[5, 6, 7]]), do_sample=True, top_p=0.9, seed=0, max_new_tokens=6).tolist()
        text = lm.generate_text('hello', chat=True, max_new_tokens=4)
        fm = MaskedLM.load({str(masked)!r}).fill_mask('the capital of [MASK]', top_k=2)
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum'))
        print(json.dumps(dict(greedy=greedy, sampled=sampled, text=text, fm=len(fm), heavy=heavy)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert len(out["greedy"][0]) == 9 and out["fm"] == 2


def test_cli_generate_works_where_heavy_imports_fail(exported):
    folder = exported("tiny-llama")
    script = BLOCKER + textwrap.dedent(f"""
        from edgelm.cli.main import main
        raise SystemExit(main(['generate', {str(folder)!r}, 'hello', '--max-new-tokens', '5', '--json']))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["new_ids"][0]) <= 5
