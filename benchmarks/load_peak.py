"""Peak memory of loading an export, with and without the load cache, each in a fresh process.

    python benchmarks/load_peak.py EXPORT [--threads 2]

Where the float32 build's peak above genai's comes from (README, Performance, peak memory): each row
is one fresh process that runs ``CausalLM.load`` and reads ``/proc/self/status`` after it, so the peak
(VmHWM) is the load's and nothing else's; then it decodes one token (which touches every weight) and
reads what stays resident (VmRSS, split into anonymous memory and mapped files). Rows: the first load, a plain
one whose background writer then fills a load cache (a temporary one, removed at the end; the writer's own
process is not counted, and the next row waits for it); a load that reads it; a first load that writes the
entry during itself (``EDGELM_LOAD_CACHE=sync``, the previous default); a load with the cache off
(``EDGELM_LOAD_CACHE=0``). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
_CHILD = """
import json, sys
import numpy as np
from edgelm.runtime import CausalLM

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {f: int(fields[f].split()[0]) / 1024 for f in %r}

lm = CausalLM.load(sys.argv[1], threads=int(sys.argv[2]))
peak = status()["VmHWM"]
lm.generate(np.asarray([[1, 2, 3, 4]], np.int64), max_new_tokens=1, do_sample=False)
print(json.dumps({**status(), "VmHWM": peak}))
""" % (FIELDS,)


def measure(export: Path, threads: int, env: dict[str, str]) -> dict[str, float]:
    """MB of each of FIELDS in a fresh process with ``env`` added: VmHWM after the load, the rest after one
    decoded token."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(export), str(threads)], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path, help="an edgelm export folder")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    args = ap.parse_args(argv)
    if not (args.export / "model.onnx").is_file():
        ap.error(f"{args.export} holds no model.onnx: pass an edgelm export folder")
    if not Path("/proc/self/status").is_file():
        ap.error("reads /proc/self/status: Linux only")
    print(f"| load of {args.export} | load peak MB | resident after a token MB | anonymous MB | mapped files MB |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="load_peak_") as cache, \
            tempfile.TemporaryDirectory(prefix="load_peak_sync_") as synced:
        for label, env in (("first load (the entry then written in the background)",
                            {"EDGELM_LOAD_CACHE_DIR": cache, "EDGELM_LOAD_CACHE": "1"}),
                           ("from the load cache", {"EDGELM_LOAD_CACHE_DIR": cache, "EDGELM_LOAD_CACHE": "1"}),
                           ("first load writing the entry (sync)",
                            {"EDGELM_LOAD_CACHE_DIR": synced, "EDGELM_LOAD_CACHE": "sync"}),
                           ("load cache off", {"EDGELM_LOAD_CACHE": "0"})):
            mb = measure(args.export, args.threads, env)
            print(f"| {label} | {' | '.join(f'{mb[f]:.0f}' for f in FIELDS)} |", flush=True)
            _wait_for_writer(args.export, cache)
    return 0


def _wait_for_writer(export: Path, cache: str) -> None:
    """Let the background writer a first load started finish: the next row must read its entry."""
    from edgelm.runtime import cache_writer, load_cache

    saved = os.environ.get(load_cache.DIR_ENV)
    os.environ[load_cache.DIR_ENV] = cache
    try:
        cache_writer.wait(export / "model.onnx")
    finally:
        if saved is None:
            os.environ.pop(load_cache.DIR_ENV)
        else:
            os.environ[load_cache.DIR_ENV] = saved


if __name__ == "__main__":
    raise SystemExit(main())
