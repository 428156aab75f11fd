#!/usr/bin/env bash
# Train a stage-2 grounder: single-video (*_stage2.yaml, *_stage2_mesm.yaml) or on retrieved
# videos with corpus-level validation (*_c2f.yaml).
#   bash run_scripts/train_stage2.sh projects/c2f/qvh_stage2.yaml [KEY=VALUE ...]
#   NPROC=8 bash run_scripts/train_stage2.sh projects/c2f/qvh_c2f.yaml
# Outputs in <run.output_dir>/$JOB_ID (default "train"). Resume with
# run.resume_ckpt_path=<output_dir>/train/checkpoint_latest.pth.
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
CFG="${1:?usage: train_stage2.sh PROJECT_YAML [KEY=VALUE ...]}"; shift
c2f_launch train.py "$CFG" "run.job_id=${JOB_ID:-train}" "$@"
