"""Evaluate a lavis-c2f model, LAVIS style (``run.checkpoint`` names the weights).

    python evaluate.py --cfg-path projects/c2f/qvh_stage2.yaml --options run.checkpoint=/abs/ckpt.pth
    python -m torch.distributed.run --nproc_per_node=2 evaluate.py --cfg-path ...
"""
import sys

from lavis_c2f.launch import evaluate_main  # imports lavis_c2f (registration) first

if __name__ == "__main__":
    sys.exit(evaluate_main())
