#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra arguments go to pytest.
#   bash run_scripts/test.sh              # everything that needs no real weights or GPU
#   bash run_scripts/test.sh -m "not slow" # the quick subset
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run_scripts/setup.sh" --test-tools
VENV="${C2F_VENV:-$ROOT/.venv}"
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}"
exec "$VENV/bin/python" -m pytest -m "not weights and not gpu" "$@"
