#!/usr/bin/env bash
# Train the stage-1 retriever (c2f_video_retrieval) of a project YAML.
#   bash run_scripts/train_stage1.sh projects/c2f/qvh_stage1.yaml [KEY=VALUE ...]
#   NPROC=4 bash run_scripts/train_stage1.sh ...              # 4 GPUs (or 2 CPU processes)
# Outputs in <run.output_dir>/$JOB_ID (default "train"): checkpoint_{best,latest}.pth,
# result/<split>_<epoch>_ranks.jsonl and _metrics.json, log.txt, summary.json.
# Resume: ... run.resume_ckpt_path=<output_dir>/train/checkpoint_latest.pth
# Runs under bash; `sh script.sh` re-executes it with bash.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
CFG="${1:?usage: train_stage1.sh PROJECT_YAML [KEY=VALUE ...]}"; shift
c2f_launch train.py "$CFG" "run.job_id=${JOB_ID:-train}" "$@"
