#!/usr/bin/env bash
# The whole coarse-to-fine chain on the embedded demo corpus, on CPU, in a few minutes:
# set up the environment (idempotent), then `lavis-c2f quickstart`.
#   bash run_scripts/quickstart.sh [--out DIR] [--threads N] [--device cpu|cuda]
# It prints one table (chance, untrained and trained models) and the absolute run directory
# holding every output (corpus, checkpoints, ranks, merged annotations, predictions, metrics).
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run_scripts/setup.sh"
source "$ROOT/run_scripts/_common.sh"
cd "$ROOT"
exec "$PY" -m lavis_c2f.cli quickstart "$@"
