# Sourced by the benchmark scripts (run from the repository root).
# fresh DIR: DIR holds an export that no exporter source has changed since it was written; anything else is
# re-exported, so that the tables never measure what an older exporter made.
fresh() { [ -f "$1/edgelm.json" ] && [ -z "$(find export -name '*.py' -newer "$1/edgelm.json" -print -quit)" ]; }
