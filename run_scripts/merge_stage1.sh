#!/usr/bin/env bash
# Stage-1 ranks + a split's annotations -> stage-2 annotations with stage1_result (top-K videos).
#   bash run_scripts/merge_stage1.sh RANKS.jsonl ANNOTATIONS OUT.jsonl [TOP_K] [merge-stage1 options]
#   e.g. bash run_scripts/merge_stage1.sh output/qvh_stage1/infer/result/val_best_ranks.jsonl \
#          data/qvhighlights/highlight_val_release.jsonl output/qvh_merged/val.jsonl 10
# A file operation (no model, one process): it runs `lavis-c2f merge-stage1`, which validates both
# inputs (errors name file, line and field) and writes OUT atomically. Options: --videos FILE
# (corpus video ids), --format, --durations (Charades-STA), --allow-missing.
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
USAGE="usage: merge_stage1.sh RANKS.jsonl ANNOTATIONS OUT.jsonl [TOP_K] [options]"
RANKS="${1:?$USAGE}"; ANN="${2:?$USAGE}"; OUT="${3:?$USAGE}"; shift 3
TOP_K=10
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then TOP_K="$1"; shift; fi
exec "$PY" -m lavis_c2f.cli merge-stage1 --stage1 "$RANKS" --ann "$ANN" --top-k "$TOP_K" --out "$OUT" "$@"
