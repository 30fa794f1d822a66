#!/usr/bin/env bash
# Sets up everything edgelm's tests need on a fresh machine: the package (editable) with the
# exporter and test extras. torch is pinned to the CPU build (2.13.0) in the export extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --disable-pip-version-check -q -e '.[export,test]'
python3 -c "import edgelm.runtime, edgelm.export; print('edgelm installed')"
# The Android demo's generation core is tested under onnxruntime-node (its CPU binary ships in
# the npm package; ONNXRUNTIME_NODE_INSTALL=skip skips the optional GPU download).
if command -v npm >/dev/null; then
    (cd android_demo && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error)
    echo "android_demo dependencies installed"
else
    echo "setup: npm is missing; the android_demo tests need Node.js >= 20 and npm" >&2
    exit 1
fi
