#!/usr/bin/env bash
# Corpus-level (coarse-to-fine) evaluation of a grounder on stage-1 results.
#   bash run_scripts/eval_c2f.sh projects/c2f/qvh_c2f.yaml GROUNDER_CHECKPOINT [KEY=VALUE ...]
#   FUSION=fusion.json bash run_scripts/eval_c2f.sh ...    # a weight chosen by `lavis-c2f tune-fusion`
#   REFINE=1 bash run_scripts/eval_c2f.sh ...              # stage 3 on (the caption refiner of the YAML's
#                                                          # run.refine block); same as run.refine.enabled=true
#   REFINE=refiner.yaml bash run_scripts/eval_c2f.sh ...   # stage 3 on with this refiner config
#                                                          # (CaptionRefiner.from_config keys, optionally under refiner:)
# With REFINE the default JOB_ID is "eval_refine", so refined results do not overwrite stage-2 ones.
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
JOB="${JOB_ID:-eval}"
case "${REFINE:-}" in
  ""|0|false|off|no) ;;
  1|true|on|yes)
    EXTRA+=("run.refine.enabled=true"); JOB="${JOB_ID:-eval_refine}" ;;
  *)
    [ -f "$REFINE" ] || { echo "eval_c2f.sh: no such refiner config: $REFINE (REFINE=1 uses the YAML's run.refine)" >&2; exit 2; }
    EXTRA+=("run.refine.enabled=true" "run.refine.config=$(cd "$(dirname "$REFINE")" && pwd)/$(basename "$REFINE")")
    JOB="${JOB_ID:-eval_refine}" ;;
esac
c2f_launch evaluate.py "$CFG" "run.job_id=$JOB" "run.checkpoint=$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")" \
  ${EXTRA[@]+"${EXTRA[@]}"} "$@"
