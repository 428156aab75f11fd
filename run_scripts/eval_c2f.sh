#!/usr/bin/env bash
# Corpus-level (coarse-to-fine) evaluation of a grounder on stage-1 results.
#   bash run_scripts/eval_c2f.sh projects/c2f/qvh_c2f.yaml GROUNDER_CHECKPOINT [KEY=VALUE ...]
#   FUSION=fusion.json bash run_scripts/eval_c2f.sh ...    # a weight chosen by `lavis-c2f tune-fusion`
# Stage-1 ranks: run.stage1_ranks of the YAML ($C2F_STAGE1_RANKS = the folder of infer_stage1.sh's
# <split>_best_ranks.jsonl), or merged annotations. Writes <run.output_dir>/$JOB_ID (default "eval")/result/
# <split>_best_{vcmr.jsonl,candidates.jsonl,gt_preds.jsonl,metrics.json}. Tune the fusion on the
# validation candidates with: lavis-c2f tune-fusion --candidates .../val_best_candidates.jsonl --out fusion.json
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
CFG="${1:?usage: eval_c2f.sh PROJECT_YAML GROUNDER_CHECKPOINT [KEY=VALUE ...]}"
CKPT="${2:?usage: eval_c2f.sh PROJECT_YAML GROUNDER_CHECKPOINT [KEY=VALUE ...]}"; shift 2
[ -f "$CKPT" ] || { echo "eval_c2f.sh: no such checkpoint: $CKPT" >&2; exit 2; }
EXTRA=()
if [ -n "${FUSION:-}" ]; then
  [ -f "$FUSION" ] || { echo "eval_c2f.sh: no such fusion file: $FUSION" >&2; exit 2; }
  EXTRA+=("run.fusion_file=$(cd "$(dirname "$FUSION")" && pwd)/$(basename "$FUSION")")
fi
c2f_launch evaluate.py "$CFG" "run.job_id=${JOB_ID:-eval}" "run.checkpoint=$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")" \
  ${EXTRA[@]+"${EXTRA[@]}"} "$@"
