#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. Extra arguments go to pytest.
#   bash run_scripts/test.sh              # everything that needs no real weights or GPU
#   bash run_scripts/test.sh -m "not slow" # the quick subset (still without weights / gpu tests)
# A -m expression is combined with "not weights and not gpu" unless it names weights or gpu itself
# (e.g. -m weights runs the real-weight tests; see docs/testing.md).
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/run_scripts/setup.sh" --test-tools
VENV="${C2F_VENV:-$ROOT/.venv}"
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}"
DEFAULT_MARKS="not weights and not gpu"
MARKS="$DEFAULT_MARKS"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -m) [ $# -ge 2 ] || { echo "test.sh: -m needs an expression" >&2; exit 2; }
        MARKS="$2"; shift 2 ;;
    -m*) MARKS="${1#-m}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ "$MARKS" != "$DEFAULT_MARKS" ] && ! [[ "$MARKS" =~ (weights|gpu) ]]; then
  MARKS="($MARKS) and $DEFAULT_MARKS"
fi
exec "$VENV/bin/python" -m pytest -m "$MARKS" "${ARGS[@]+"${ARGS[@]}"}"
