#!/usr/bin/env bash
# Stage-1 inference: rank every video of each split for each query with a trained retriever.
#   bash run_scripts/infer_stage1.sh projects/c2f/qvh_stage1.yaml CHECKPOINT [KEY=VALUE ...]
# Splits: $SPLITS (e.g. "[train,val]"), default all splits of the YAML (train + valid + test).
# Writes <run.output_dir>/$JOB_ID (default "infer")/result/<split>_best_ranks.jsonl (qid, query,
# ranked_vids: the run.stage1_top_k best [vid, score]) and <split>_best_metrics.json; the c2f
# YAMLs read the ranks from there by default.
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
CFG="${1:?usage: infer_stage1.sh PROJECT_YAML CHECKPOINT [KEY=VALUE ...]}"
CKPT="${2:?usage: infer_stage1.sh PROJECT_YAML CHECKPOINT [KEY=VALUE ...]}"; shift 2
[ -f "$CKPT" ] || { echo "infer_stage1.sh: no such checkpoint: $CKPT" >&2; exit 2; }
SPLITS="${SPLITS:-$(c2f_all_splits "$CFG")}"
c2f_launch evaluate.py "$CFG" "run.job_id=${JOB_ID:-infer}" "run.checkpoint=$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")" \
  "run.test_splits=$SPLITS" "$@"
