#!/usr/bin/env bash
# Reruns the comparison behind the README's performance and quantization tables on this machine:
# SmolLM2-135M-Instruct exported by edgelm (float32; gguf from its Q4_1 GGUF; int8; int4; int4 with --block-size 64;
# int8-dynamic)
# against transformers PyTorch, optimum's ORT model and onnxruntime-genai (built by its own builder
# from the same checkpoint), every system with the same threads through the setting it reads.
#
#   benchmarks/run.sh [RUNS]        (default 5 interleaved runs; results in bench-results/)
#
# onnxruntime-genai's builder needs transformers 5.x, so it gets a venv of its own (.venv-genai),
# made once. Expect ~40 minutes on a 2-core machine with 5 runs.
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
# edgelm in the genai venv too (no dependencies: it has onnxruntime and tokenizers), for bench_turns below
.venv-genai/bin/pip install --disable-pip-version-check -q --no-deps -e .
# A load cache of this run's own, empty at the start: each export's first load on this machine is measured
# (edgelm bench reports it apart), whether or not the exports below are reused.
export EDGELM_LOAD_CACHE_DIR="$OUT/load-cache"
rm -rf "$EDGELM_LOAD_CACHE_DIR"
CKPT="$(python3 -m edgelm.cli models fetch smollm2-135m-instruct)"
GGUF="$(dirname "$CKPT")/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
. benchmarks/exports.sh  # fresh DIR: an export no exporter change has made stale
for q in fp32 gguf int8 int4 int4-b64 int8-dynamic; do
    dir="$MODELS/smollm2-$q"
    fresh "$dir" && continue
    case "$q" in
        fp32) python3 -m edgelm.cli export "$CKPT" "$dir" --overwrite ;;
        gguf) python3 -m edgelm.cli export "$GGUF" "$dir" --overwrite --quantize gguf ;;
        int4-b64) python3 -m edgelm.cli export "$CKPT" "$dir" --overwrite --quantize int4 --block-size 64 ;;
        *) python3 -m edgelm.cli export "$CKPT" "$dir" --overwrite --quantize "$q" ;;
    esac
done
common=(--anchors --genai-python .venv-genai/bin/python --runs "$RUNS" --threads 2 --out "$OUT" --checkpoint "$CKPT")
python3 -m edgelm.cli bench "$MODELS/smollm2-fp32" "${common[@]}" --strategy greedy --strategy sample \
    --strategy sample_full_vocab --strategy beam4 --lengths 64,512 --prompt-lengths 64,512,1024,2048
for q in gguf int8 int4 int4-b64 int8-dynamic; do
    python3 -m edgelm.cli bench "$MODELS/smollm2-$q" "${common[@]}" --strategy greedy \
        --reference "$MODELS/smollm2-fp32"
done
# The graphs alone, same driver for both runtimes (no generation loop): what each runtime adds around its graph
# is the difference between this table and the ones above. The float32 graph also runs against itself through its
# full float32 head (@full-head): what the greedy head gains a step.
python3 -m edgelm.cli.bench_graph --pairs "$MODELS/smollm2-fp32" genai:fp32 \
    "$MODELS/smollm2-fp32" "$MODELS/smollm2-fp32@full-head" "$MODELS/smollm2-int8" genai:int8 \
    "$MODELS/smollm2-int4" genai:int4 "$MODELS/smollm2-int4-b64" genai:int4 "$MODELS/smollm2-gguf" genai:int4 \
    --checkpoint "$CKPT" --runs "$RUNS" \
    --threads 2 --interleaved --control --profile --out "$OUT/graph-step.json" | tee "$OUT/graph-step.md"
# Both generation loops in one process, taking turns: end to end without the drift between fresh processes
python3 -m edgelm.cli.bench_turns "$MODELS/smollm2-fp32" "$MODELS/smollm2-gguf" "$MODELS/smollm2-int8" \
    "$MODELS/smollm2-int4" "$MODELS/smollm2-int4-b64" --checkpoint "$CKPT" --genai-python .venv-genai/bin/python \
    --runs "$RUNS" --rounds 8 --threads 2 --control --out "$OUT/turns.json" | tee "$OUT/turns.md"
# What the gguf build's per-block offsets cost a step (timing-only surgery; the ceiling of any faster exact form)
python3 benchmarks/graph_ab.py "$MODELS/smollm2-gguf" genai:int4 --checkpoint "$CKPT" --variants nooffsets \
    --repeats "$RUNS" | tee "$OUT/graph-ab-gguf.md"
# The greedy head on SmolLM2's hidden states: candidates per position, the bound's slack, picks against the full head
python3 benchmarks/greedy_head.py "$MODELS/smollm2-fp32" --threads 2 | tee "$OUT/greedy-head.md"
python3 -m edgelm.cli.bench_chat "$MODELS/smollm2-fp32" --turns 10 --threads 2 --out "$OUT/conversation.json" \
    | tee "$OUT/conversation.md"
echo "benchmarks: tables, JSON and plots in $OUT/" >&2
