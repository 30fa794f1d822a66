#!/usr/bin/env bash
# Sets up everything edgelm's tests need on a fresh machine: the package (editable) with the
# exporter and test extras. torch is pinned to the CPU build (2.13.0) in the export extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --disable-pip-version-check -q -e '.[export,test]'
python3 -c "import edgelm.runtime, edgelm.export; print('edgelm installed')"
