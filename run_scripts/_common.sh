# Shared by the run scripts (sourced, not run). Defines PY and c2f_launch.
#
# c2f_launch SCRIPT CFG [KEY=VALUE ...] runs
#   python -m torch.distributed.run --nproc_per_node=$NPROC ... SCRIPT --cfg-path CFG --options ... $OPTIONS
# Environment:
#   NPROC          processes on this machine (default 1; one per GPU, or 1-2 on a CPU)
#   NNODES         machines (default 1); with more than one, set RDZV_ENDPOINT=host:port (same on
#                  every machine) and optionally RDZV_ID (default c2f); see docs/scaling.md
#   OPTIONS        extra --options, space separated (e.g. "run.max_epoch=3 run.device=cpu")
#   C2F_VENV       virtual environment (default: .venv of the checkout)
#   C2F_OUTPUT     base of the projects' output_dir (default: ./output)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${C2F_VENV:-$ROOT/.venv}"
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY="${PYTHON:-python3}"; fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning}"

c2f_launch() {
  local script="$1" cfg="$2"
  shift 2
  [ -f "$cfg" ] || { echo "$(basename "$0"): no such project YAML: $cfg" >&2; exit 2; }
  local dist=(--nproc_per_node="${NPROC:-1}")
  if [ "${NNODES:-1}" != "1" ] || [ -n "${RDZV_ENDPOINT:-}" ]; then
    [ -n "${RDZV_ENDPOINT:-}" ] || { echo "$(basename "$0"): NNODES=${NNODES} needs RDZV_ENDPOINT=host:port" >&2; exit 2; }
    dist+=(--nnodes="${NNODES:-1}" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-c2f}")
  else
    dist+=(--standalone)
  fi
  # shellcheck disable=SC2086  # OPTIONS is a space-separated list on purpose
  exec "$PY" -m torch.distributed.run "${dist[@]}" "$ROOT/$script" --cfg-path "$cfg" --options "$@" ${OPTIONS:-}
}

# The splits of a project YAML: train + valid_splits + test_splits, as "[a,b,c]".
c2f_all_splits() {
  "$PY" - "$1" <<'PY'
import sys
from omegaconf import OmegaConf
run = OmegaConf.load(sys.argv[1]).get("run", {})
seen = []
for key in ("train_splits", "valid_splits", "test_splits"):
    for s in list(run.get(key) or []):
        if s not in seen:
            seen.append(s)
print("[" + ",".join(seen) + "]")
PY
}
