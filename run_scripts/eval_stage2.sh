#!/usr/bin/env bash
# Evaluate a stage-2 grounder in the GT videos (official QVHighlights metrics or R1/R5@IoU, mIoU).
#   bash run_scripts/eval_stage2.sh projects/c2f/qvh_stage2.yaml CHECKPOINT [KEY=VALUE ...]
# Writes <run.output_dir>/$JOB_ID (default "eval")/result/<split>_best_{preds.jsonl,metrics.json}.
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
CFG="${1:?usage: eval_stage2.sh PROJECT_YAML CHECKPOINT [KEY=VALUE ...]}"
CKPT="${2:?usage: eval_stage2.sh PROJECT_YAML CHECKPOINT [KEY=VALUE ...]}"; shift 2
[ -f "$CKPT" ] || { echo "eval_stage2.sh: no such checkpoint: $CKPT" >&2; exit 2; }
c2f_launch evaluate.py "$CFG" "run.job_id=${JOB_ID:-eval}" "run.checkpoint=$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")" "$@"
