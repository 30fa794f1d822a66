#!/usr/bin/env bash
# Reruns the anchor comparison of the performance issue on this machine:
# SmolLM2-135M-Instruct exported by edgelm (fp32, int8, int4) against transformers PyTorch,
# optimum's ORT model and onnxruntime-genai (built by its own builder from the same checkpoint).
#
#   benchmarks/run.sh [RUNS]        (default 5 interleaved runs; results in bench-results/)
#
# onnxruntime-genai's builder needs transformers 5.x, so it gets a venv of its own (.venv-genai),
# made once. Expect ~15 minutes on a 2-core machine with 5 runs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-5}"
OUT=bench-results
MODELS="${EDGELM_BENCH_MODELS:-$OUT/models}"
python3 -m pip install --disable-pip-version-check -q -e '.[export,bench]'
if [ ! -x .venv-genai/bin/python ]; then
    echo "benchmarks: creating .venv-genai (onnxruntime-genai 0.18 + transformers 5.x for its model builder)" >&2
    python3 -m venv .venv-genai
    .venv-genai/bin/pip install --disable-pip-version-check -q torch==2.13.0 'transformers>=5,<6' \
        onnxruntime-genai==0.18.0 onnx onnx-ir psutil
fi
CKPT="$(python3 -m edgelm.cli models fetch smollm2-135m-instruct)"
for q in fp32 int8 int4; do
    dir="$MODELS/smollm2-$q"
    if [ ! -f "$dir/edgelm.json" ]; then
        extra=(); [ "$q" != fp32 ] && extra=(--quantize "$q")
        python3 -m edgelm.cli export "$CKPT" "$dir" --overwrite "${extra[@]}"
    fi
done
common=(--anchors --genai-python .venv-genai/bin/python --runs "$RUNS" --threads 2 --out "$OUT")
python3 -m edgelm.cli bench "$MODELS/smollm2-fp32" "${common[@]}" --strategy greedy --strategy sample \
    --strategy sample_full_vocab --strategy beam4 --lengths 64,512
for q in int8 int4; do
    python3 -m edgelm.cli bench "$MODELS/smollm2-$q" "${common[@]}" --strategy greedy \
        --reference "$MODELS/smollm2-fp32"
done
echo "benchmarks: tables, JSON and plots in $OUT/" >&2
