"""Train a lavis-c2f model, LAVIS style.

    python train.py --cfg-path projects/c2f/demo_stage2.yaml
    python -m torch.distributed.run --nproc_per_node=2 train.py --cfg-path projects/c2f/qvh_stage2.yaml
"""
import sys

from lavis_c2f.launch import train_main  # imports lavis_c2f (registration) first

if __name__ == "__main__":
    sys.exit(train_main())
