#!/usr/bin/env bash
# Reruns the README's speculative-decoding table: Qwen2.5-Coder-1.5B-Instruct (target, its GGUF's own
# blocks: `--quantize gguf`) with Qwen2.5-Coder-0.5B-Instruct as the draft (int4 from its GGUF), against
# plain greedy on the same target; the same draft with its LM head cut to frequent tokens (`edgelm draft`);
# the pair loaded with onnxruntime's default thread spinning (what stopping it gives); prompt lookup with
# 10 (transformers' default), 5 and 3 tokens, and with the heuristic schedule from 10; greedy, the draft and
# lookup again on the target loaded with stable_rows (drafted runs then give that load's greedy exactly). Both
# models come from PyPI wheels (edgelm models fetch).
#
#   benchmarks/speculative.sh [RUNS]     (default 3; results in bench-results/speculative.{md,json})
#
# Expect ~25 minutes for the two exports (once) and ~35 for the runs on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
OUT=bench-results
MODELS="${EDGELM_BENCH_MODELS:-$OUT/models}"
python3 -m pip install --disable-pip-version-check -q -e '.[export]'
TARGET_GGUF="$(python3 -m edgelm.cli models fetch qwen2.5-coder-1.5b-instruct)"
DRAFT_GGUF="$(python3 -m edgelm.cli models fetch qwen2.5-coder-0.5b-instruct)"
. benchmarks/exports.sh  # fresh DIR: an export no exporter change has made stale
fresh "$MODELS/qwen1.5b-gguf" || python3 -m edgelm.cli export "$TARGET_GGUF" "$MODELS/qwen1.5b-gguf" --overwrite --quantize gguf
fresh "$MODELS/qwen0.5b-int4" || python3 -m edgelm.cli export "$DRAFT_GGUF" "$MODELS/qwen0.5b-int4" --overwrite --quantize int4
# The draft with its LM head cut to the 32,768 lowest token ids (+ special ones): seconds, from the int4 export.
python3 -m edgelm.cli draft "$MODELS/qwen0.5b-int4" "$MODELS/qwen0.5b-int4-cut32k" --keep 32768 --overwrite
python3 -m edgelm.cli.bench_spec "$MODELS/qwen1.5b-gguf" --draft "$MODELS/qwen0.5b-int4" \
    --cut-draft "$MODELS/qwen0.5b-int4-cut32k" --spinning-ablation --stable-rows --runs "$RUNS" \
    --new-tokens 128 --threads 2 --out "$OUT/speculative.json" | tee "$OUT/speculative.md"
