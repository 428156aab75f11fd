"""The main job's figures do not hang on rounding noise: a reduced quickstart chain (the
``reduced_quickstart`` job of lavis_c2f/configs/expected/demo_results.yaml, measured by
bench/reproducibility.py) run with one and with two torch threads, which changes the order of
torch's reductions as another CPU does, gives every headline figure within :data:`GUARD` times the
bench's target of the two runs' mean (docs/reproducibility.md). The target is the bench's 2 points for the main
job's test split as it was when the target was set (``TARGET_QUERIES``, 203 queries), scaled to the
reduced chain's smaller split (``scaled_target``).

The test holds the headline figures (:data:`HEADLINE`: the columns of the README's main-job
table but the recalls at 10 and 100 videos). On an earlier reduced chain (101 test queries, 150 videos)
VCMR R@10 and R@100 moved by up to 4.5 points between thread counts in one fresh-clone run: a
moment ranked 10th or 100th among all candidates of a small corpus flips in and out with one
query's rounding; the bench reports those figures for the full-size job, where they hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lavis_c2f.pipeline.expected import TARGET_QUERIES, load_expected, scaled_target

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _quickstart(out: Path, threads: int, args) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "",
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                # idle OpenMP threads sleep instead of spinning (as bench/reproducibility.py): on a busy
                # machine a spinning 2-thread run is many times slower; the numbers do not change
                "OMP_WAIT_POLICY": "PASSIVE"})
    proc = subprocess.run([sys.executable, "-m", "lavis_c2f.cli", "quickstart", "--out", str(out), "--threads",
                           str(threads)] + list(args), cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())["trained"]


#: On the main job's recipe (anchors learning, weight average, default kernels, 80 + 8 epochs, the
#: runner's deterministic algorithms) the reduced chain (300 videos of <= 30 clips, 218 test queries)
#: deviated by at most 0.91 points from the pair's mean, under the scaled target of 1.93
#: (docs/reproducibility.md, last section; 4.69 on 150 videos, too few to train). The test guards twice the target:
#: another CPU perturbs differently from a second thread, and one measured pair is not a distribution;
#: the recipes that failed it moved by 5.9 (anchors frozen) to 19.7 points (the first recipe).
GUARD = 2.0

#: the figures the README leads with (stage 1, single-video moments, corpus moments at rank 1)
HEADLINE = ("stage1-R@1", "stage1-R@5", "MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "VCMR-R@1-IoU@0.5",
            "VCMR-R@1-IoU@0.7")


def test_reduced_chain_same_figures_with_one_and_two_threads(tmp_path):
    job = load_expected("reduced_quickstart")
    assert job is not None, "the expected-figures file lacks the reduced_quickstart job"
    tolerance = GUARD * scaled_target(job.settings["test_queries"], TARGET_QUERIES)
    args = job.settings["args"]
    one, two = _quickstart(tmp_path / "t1", 1, args), _quickstart(tmp_path / "t2", 2, args)
    assert set(HEADLINE) <= set(job.figures), sorted(set(HEADLINE) - set(job.figures))
    devs = {key: abs(one[key] - two[key]) / 2 for key in job.figures}
    worst = max(HEADLINE, key=devs.get)
    assert devs[worst] <= tolerance, (
        f"{worst}: {one[worst]} with 1 thread, {two[worst]} with 2 (deviation {devs[worst]:.2f} from their mean > "
        f"{tolerance:.2f}); all deviations: {devs}")
