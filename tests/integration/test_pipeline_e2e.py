"""End to end on a tiny demo corpus, through the run scripts and the CLI, in a temporary folder:

make-demo-corpus -> train_stage1.sh -> infer_stage1.sh (1 and 2 processes: equal) ->
merge_stage1.sh -> train_stage2.sh (c2f task, hard negatives) -> tune-fusion ->
eval_c2f.sh (1 and 2 processes: equal) -> eval_stage2.sh; plus an interrupted training
(SIGKILL after the first checkpoint) resumed to the same result as an uninterrupted run, and
an interrupted evaluation that leaves no result files behind.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "run_scripts"
PROJECTS = REPO / "projects" / "c2f"

pytestmark = pytest.mark.slow

DIM = 24
CORPUS_PARAMS = ["--n-videos", "30", "--video-dim", str(DIM), "--text-dim", str(DIM), "--param", "latent_dim=8",
                 "--param", "min_clips=8", "--param", "max_clips=16", "--param", "min_window_clips=1",
                 "--param", "max_window_clips=4"]
S1_MODEL = [f"model.text_input_dim={DIM}", f"model.video_input_dim={DIM}", "model.embed_dim=16", "model.num_frames=4",
            "model.num_trials=2", "run.batch_size_train=16"]
S2_MODEL = [f"model.txt_dim={DIM}", f"model.vid_dim={DIM + 2}", "model.hidden_dim=16", "model.nheads=2",
            "model.dim_feedforward=32", "model.enc_layers=1", "model.dec_layers=1", "model.num_queries=4",
            "run.batch_size_train=8"]


def _env(**extra):
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""})
    env.pop("OPTIONS", None)
    env.pop("NPROC", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd, env=None, timeout=900, ok=True):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env or _env(), timeout=timeout,
                          cwd=str(REPO))
    if ok:
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _descendants(pid: int):
    """Process ids below ``pid`` (Linux /proc): torch.distributed.run starts each worker in a
    session of its own, so killing the launcher's process group does not reach the workers."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="utf-8") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher, its workers and everything below them (a crash, not a shutdown)."""
    for pid in _descendants(proc.pid)[::-1]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus"
    _run([sys.executable, "-m", "lavis_c2f.cli", "make-demo-corpus", corpus, *CORPUS_PARAMS])
    assert (corpus / "corpus.json").is_file()
    return root


def _common(work: Path, job: str):
    return [f"datasets.c2f_demo.data_root={work / 'corpus'}", f"run.output_dir={work / 'runs'}", "run.device=cpu",
            "run.progress=false"]


@pytest.fixture(scope="module")
def stage1(work):
    """Train stage 1, infer all splits with 1 and 2 processes."""
    opts = _common(work, "s1") + S1_MODEL + ["run.max_epoch=2"]
    _run(["bash", SCRIPTS / "train_stage1.sh", PROJECTS / "demo_stage1.yaml", *opts], env=_env(JOB_ID="s1"))
    ckpt = work / "runs" / "s1" / "checkpoint_best.pth"
    assert ckpt.is_file()
    _run(["bash", SCRIPTS / "infer_stage1.sh", PROJECTS / "demo_stage1.yaml", ckpt, *opts],
         env=_env(JOB_ID="infer1"))
    _run(["bash", SCRIPTS / "infer_stage1.sh", PROJECTS / "demo_stage1.yaml", ckpt, *opts],
         env=_env(JOB_ID="infer2", NPROC=2))
    return work / "runs" / "infer1" / "result", work / "runs" / "infer2" / "result"


def test_stage1_distributed_inference_equals_single_process(stage1):
    one, two = stage1
    for split in ("train", "val", "test"):
        a, b = _jsonl(one / f"{split}_best_ranks.jsonl"), _jsonl(two / f"{split}_best_ranks.jsonl")
        assert [r["qid"] for r in a] == [r["qid"] for r in b] and len(a) > 0
        for ra, rb in zip(a, b):
            assert [v for v, _ in ra["ranked_vids"]] == [v for v, _ in rb["ranked_vids"]]
            assert all(abs(x[1] - y[1]) < 1e-5 for x, y in zip(ra["ranked_vids"], rb["ranked_vids"]))
        ma = json.loads((one / f"{split}_best_metrics.json").read_text())
        mb = json.loads((two / f"{split}_best_metrics.json").read_text())
        assert ma["model"] == mb["model"] and ma["baseline_mean_pooling"] == mb["baseline_mean_pooling"]


@pytest.fixture(scope="module")
def merged(work, stage1):
    one, _ = stage1
    out = {}
    for split in ("train", "val", "test"):
        out[split] = work / "merged" / f"{split}.jsonl"
        _run(["bash", SCRIPTS / "merge_stage1.sh", one / f"{split}_best_ranks.jsonl",
              work / "corpus" / "annotations" / f"{split}.jsonl", out[split], "5"])
        rows = _jsonl(out[split])
        assert all(len(r["stage1_result"]) <= 5 for r in rows) and rows
    # bad input: a stage-1 file of another split -> exit 1 naming the file and line
    proc = _run(["bash", SCRIPTS / "merge_stage1.sh", one / "val_best_ranks.jsonl",
                 work / "corpus" / "annotations" / "test.jsonl", work / "bad.jsonl"], ok=False)
    assert proc.returncode == 1 and "val_best_ranks.jsonl:1" in proc.stderr
    assert not (work / "bad.jsonl").exists()
    return out


def _c2f_opts(work, merged, max_epoch=2):
    ann = [f"datasets.c2f_demo.annotations.{s}.path={p}" for s, p in merged.items()]
    return _common(work, "c2f") + S2_MODEL + ann + ["run.stage1_ranks=null", f"run.max_epoch={max_epoch}",
                                                    "run.val_interval=1", "run.stage1_top_k=4"]


@pytest.fixture(scope="module")
def stage2(work, merged):
    _run(["bash", SCRIPTS / "train_stage2.sh", PROJECTS / "demo_c2f.yaml", *_c2f_opts(work, merged, 3)],
         env=_env(JOB_ID="c2f_full"))
    out = work / "runs" / "c2f_full"
    assert (out / "checkpoint_best.pth").is_file()
    return out


def test_tune_fusion_and_distributed_c2f_eval(work, merged, stage2):
    summary = json.loads((stage2 / "summary.json").read_text())
    cand = stage2 / "result" / f"val_{summary['best_epoch']}_candidates.jsonl"
    fusion = work / "fusion.json"
    _run([sys.executable, "-m", "lavis_c2f.cli", "tune-fusion", "--candidates", cand, "--out", fusion,
          "--weights", "0,1,4"])
    choice = json.loads(fusion.read_text())
    assert choice["weight"] in (0.0, 1.0, 4.0) and len(choice["grid"]) == 3
    # evaluation from stage-1 ranks files (no merged annotations), 1 and 2 processes
    opts = _common(work, "ev") + S2_MODEL + ["run.stage1_top_k=4", "run.test_splits=[val,test]"]
    ranks_dir = work / "runs" / "infer1" / "result"
    for job, nproc in (("ev1", 1), ("ev2", 2)):
        _run(["bash", SCRIPTS / "eval_c2f.sh", PROJECTS / "demo_c2f.yaml", stage2 / "checkpoint_best.pth", *opts],
             env=_env(JOB_ID=job, NPROC=nproc, FUSION=fusion, C2F_STAGE1_RANKS=ranks_dir))
    for split in ("val", "test"):
        r1 = work / "runs" / "ev1" / "result"
        r2 = work / "runs" / "ev2" / "result"
        m1 = json.loads((r1 / f"{split}_best_metrics.json").read_text())
        m2 = json.loads((r2 / f"{split}_best_metrics.json").read_text())
        assert m1["metrics"] == m2["metrics"] and m1["fusion"]["weight"] == choice["weight"]
        v1, v2 = _jsonl(r1 / f"{split}_best_vcmr.jsonl"), _jsonl(r2 / f"{split}_best_vcmr.jsonl")
        assert [r["qid"] for r in v1] == [r["qid"] for r in v2]
        for a, b in zip(v1, v2):
            assert [m[:3] for m in a["pred_moments"]] == [m[:3] for m in b["pred_moments"]]
        for key in ("VCMR-R@1-IoU@0.5", "oracle-VCMR-R@1-IoU@0.5", "stage1-R@1", "MR-full-R1@0.5"):
            assert key in m1["metrics"]
    # the best epoch's validation during training (merged annotations, default fusion) and this
    # evaluation (ranks files, tuned fusion) agree on what does not depend on the fusion
    during = json.loads((stage2 / "result" / f"val_{summary['best_epoch']}_metrics.json").read_text())["metrics"]
    after = json.loads((work / "runs" / "ev1" / "result" / "val_best_metrics.json").read_text())["metrics"]
    for key in ("stage1-R@1", "stage1-R@5", "MR-full-R1@0.5", "MR-full-mAP"):
        assert during[key] == after[key], key


def test_single_video_stage2_eval(work, stage2):
    opts = _common(work, "sv") + S2_MODEL + ["run.test_splits=[val]"]
    _run(["bash", SCRIPTS / "eval_stage2.sh", PROJECTS / "demo_stage2.yaml", stage2 / "checkpoint_best.pth", *opts],
         env=_env(JOB_ID="sv"))
    metrics = json.loads((work / "runs" / "sv" / "result" / "val_best_metrics.json").read_text())
    assert "MR-full-mAP" in metrics["brief"]


def test_killed_training_resumes_to_the_same_result(work, merged, stage2):
    opts = _c2f_opts(work, merged, 3)
    cmd = ["bash", str(SCRIPTS / "train_stage2.sh"), str(PROJECTS / "demo_c2f.yaml"), *opts]
    out = work / "runs" / "c2f_killed"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(JOB_ID="c2f_killed"),
                            cwd=str(REPO), start_new_session=True)
    latest = out / "checkpoint_latest.pth"
    deadline = time.time() + 600
    try:
        while not latest.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert latest.exists(), "no checkpoint_latest.pth before the deadline"
    finally:
        if proc.poll() is None:
            _kill_hard(proc)
        proc.wait()
    import torch

    epoch = torch.load(latest, map_location="cpu", weights_only=False)["epoch"]
    assert epoch < 2, "training finished before it could be interrupted"
    time.sleep(1.0)
    assert not (out / "summary.json").exists(), "the killed training went on (a worker survived the kill)"
    assert torch.load(latest, map_location="cpu", weights_only=False)["epoch"] == epoch
    _run(["bash", SCRIPTS / "train_stage2.sh", PROJECTS / "demo_c2f.yaml", *opts, f"run.resume_ckpt_path={latest}"],
         env=_env(JOB_ID="c2f_resumed"))
    full = json.loads((stage2 / "summary.json").read_text())
    resumed = json.loads((work / "runs" / "c2f_resumed" / "summary.json").read_text())
    assert full["best_epoch"] == resumed["best_epoch"]
    assert full["best_agg_metric"] == resumed["best_agg_metric"]
    a = torch.load(stage2 / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["model"]
    b = torch.load(work / "runs" / "c2f_resumed" / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = _jsonl(stage2 / "result" / "val_2_vcmr.jsonl")
    rb = _jsonl(work / "runs" / "c2f_resumed" / "result" / "val_2_vcmr.jsonl")
    assert ra == rb


def test_killed_evaluation_leaves_no_result_files(work, merged, stage2):
    """SIGKILL in the middle of the grounding phase: no result file, not even a temporary one.

    The kill is timed by the run's own progress lines (one per pair batch with
    ``C2F_PROGRESS_INTERVAL=0``), not by a sleep: the first line with a finished batch of the
    grounding bar proves the evaluation is inside the phase that writes results at its end, on a
    fast machine as on a slow one (579 pair batches here)."""
    opts = _common(work, "kill") + S2_MODEL + [f"datasets.c2f_demo.annotations.train.path={merged['train']}",
                                               "run.stage1_ranks=null", "run.stage1_top_k=5", "run.pair_batch_size=1",
                                               "run.test_splits=[train]", "run.progress=true"]
    cmd = ["bash", str(SCRIPTS / "eval_c2f.sh"), str(PROJECTS / "demo_c2f.yaml"), str(stage2 / "checkpoint_best.pth"),
           *opts]
    out = work / "runs" / "ev_killed"
    log = work / "ev_killed.log"
    grounding = re.compile(r"eval train:.*\b([1-9][0-9]*)/([0-9]+) \[")
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True,
                                env=_env(JOB_ID="ev_killed", C2F_PROGRESS_INTERVAL=0))
        try:
            deadline = time.time() + 300
            seen = None
            while seen is None and proc.poll() is None and time.time() < deadline:
                seen = grounding.search(log.read_text(encoding="utf-8", errors="replace"))
                time.sleep(0.05)
            alive = proc.poll() is None
        finally:
            if proc.poll() is None:
                _kill_hard(proc)
            proc.wait()
    tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    assert seen is not None, f"no grounding progress line within 300 s:\n{tail}"
    assert alive and int(seen.group(1)) < int(seen.group(2)), f"the evaluation ended before it could be interrupted:\n{tail}"
    result = out / "result"
    assert result.is_dir()
    assert sorted(p.name for p in result.iterdir()) == [], tail   # nothing written, not even temporary files


def test_quickstart_command_small(tmp_path):
    """`lavis-c2f quickstart` end to end on a small corpus with one epoch per stage."""
    out = tmp_path / "qs"
    proc = _run([sys.executable, "-m", "lavis_c2f.cli", "quickstart", "--out", out, "--n-videos", "40",
                 "--stage1-epochs", "1", "--stage2-epochs", "1", "--threads", "1"])
    assert f"all outputs in {out}" in proc.stdout
    text = (out / "table.txt").read_text()
    for label in ("chance (random)", "untrained models", "trained (this run)"):
        assert label in text and label in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for row in ("chance", "untrained", "trained"):
        assert "VCMR-R@1-IoU@0.5" in summary[row] and "stage1-R@1" in summary[row]
    assert summary["trained"]["oracle-VCMR-R@1-IoU@0.5"] >= summary["trained"]["VCMR-R@1-IoU@0.5"]
    for rel in ("corpus/corpus.json", "fusion.json", "quickstart.log", "merged/train.jsonl",
                "runs/stage1/checkpoint_best.pth", "runs/stage2/checkpoint_best.pth",
                "runs/c2f_test/result/test_best_vcmr.jsonl", "runs/stage1_infer/result/val_best_ranks.jsonl"):
        assert (out / rel).is_file(), rel
