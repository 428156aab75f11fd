"""CUDA (marker ``gpu``; skipped without a CUDA device, deselected by the README command).

* the official QD-DETR reference fixture (``../shared/fixtures/qd_detr_reference``) on CUDA
  within 1e-4, TF32 off;
* one training step of the tiny grounder and of the tiny retriever on CUDA: same losses and
  gradients as on CPU from the same weights and batch, then a finite optimiser step;
* a grounder trained on CPU predicts the same on CUDA (raw outputs within 1e-4, rows alike);
* ``train.py`` with ``run.device=cuda`` on a generated demo corpus for one epoch, finite
  metrics; its checkpoint evaluated on CPU and on CUDA gives the same metrics.

    .venv/bin/python -m pytest -m gpu tests/gpu
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
for _helpers in ("grounder", "retriever"):   # tiny configs and synthetic batches of the unit tests
    _p = str(REPO / "tests" / "unit" / _helpers)
    if _p not in sys.path:
        sys.path.insert(0, _p)

from grounder_helpers import make_batch, tiny_qd_config  # noqa: E402
from retriever_helpers import random_batch, tiny_model  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="CUDA is not available (torch.cuda.is_available() is False): the gpu tests need "
                              "an NVIDIA GPU and a CUDA build of torch"),
]

CUDA = torch.device("cuda")
ATOL = 1e-4


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 matmuls/convolutions (TF32 would cost ~1e-3), restored afterwards."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# =========================================================================== QD-DETR parity


def test_qd_detr_reference_fixture_on_cuda(shared_dir):
    from lavis_c2f.models.grounder import load_qd_detr_checkpoint

    ref_dir = shared_dir / "fixtures" / "qd_detr_reference"
    fx_path, ckpt = ref_dir / "qd_detr_clip_reference.pt", ref_dir / "qd_detr_clip_model_best.ckpt"
    if not (fx_path.is_file() and ckpt.is_file()):
        pytest.skip(f"reference fixture missing under {ref_dir}")
    fx = torch.load(fx_path, map_location="cpu", weights_only=True)
    model = load_qd_detr_checkpoint(str(ckpt)).to(CUDA)
    assert next(model.parameters()).device.type == "cuda"
    x = {k: fx["inputs"][k].to(CUDA) for k in ("src_txt", "src_txt_mask", "src_vid", "src_vid_mask")}
    with torch.no_grad():
        out = model(**x, compute_neg=True)
    ref = fx["outputs"]
    valid = fx["inputs"]["src_vid_mask"].bool()
    for key in ("pred_logits", "pred_spans"):
        assert out[key].device.type == "cuda"
        torch.testing.assert_close(out[key].cpu(), ref[key], atol=ATOL, rtol=0)
    for key in ("saliency_scores", "saliency_scores_neg"):
        torch.testing.assert_close(out[key].cpu()[valid], ref[key][valid], atol=ATOL, rtol=0)
    for a, b in zip(out["aux_outputs"], ref["aux_outputs"]):
        for key in ("pred_logits", "pred_spans"):
            torch.testing.assert_close(a[key].cpu(), b[key], atol=ATOL, rtol=0)


# =========================================================================== training steps


def _grads(model) -> dict:
    return {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}


def grounder_step_matches(device) -> None:
    """Tiny QD-DETR (no dropout): the training losses and gradients on ``device`` equal the CPU
    ones from the same weights and batch; then one AdamW step on ``device`` is finite and
    moves the weights."""
    from lavis_c2f.models.grounder import C2FQDDETR

    torch.manual_seed(0)
    cpu = C2FQDDETR.from_config(tiny_qd_config(dropout=0.0, input_dropout=0.0))
    dev = copy.deepcopy(cpu).to(device)
    batch = make_batch([10, 7, 12], [5, 3, 6], [[[4.0, 10.0]], [[0.0, 4.0], [8.0, 12.0]], [[10.0, 20.0]]])
    cpu.train(), dev.train()
    out_c, out_d = cpu(batch), dev(batch)
    assert out_d["loss"].device.type == torch.device(device).type
    loss_keys = [k for k in out_c if k.startswith("loss")]
    assert "loss_span" in loss_keys and "loss_saliency" in loss_keys
    for k in loss_keys:
        torch.testing.assert_close(out_d[k].detach().cpu(), out_c[k].detach(), rtol=1e-4, atol=1e-5, msg=k)
    out_c["loss"].backward()
    out_d["loss"].backward()
    gc, gd = _grads(cpu), _grads(dev)
    assert gc.keys() == gd.keys() and len(gc) > 10
    for n in gc:
        torch.testing.assert_close(gd[n], gc[n], rtol=1e-3, atol=1e-4, msg=n)
    before = {n: p.detach().cpu().clone() for n, p in dev.named_parameters()}
    opt = torch.optim.AdamW([p for p in dev.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    after = dict(dev.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n].detach().cpu(), before[n]) for n in before)


def retriever_step_matches(device) -> None:
    """Tiny T-MASS retriever: eval embeddings and scores on ``device`` equal the CPU ones; one
    training step on ``device`` (stochastic text trials, so not compared) is finite and moves
    the weights."""
    cpu = tiny_model(seed=0)
    dev = copy.deepcopy(cpu).to(device)
    batch = random_batch(b=6, seed=1)
    with torch.no_grad():
        tc = cpu.encode_text(batch["src_txt"], batch["src_txt_mask"], batch["txt_pooled"])
        vc = cpu.encode_video(batch["src_vid"], batch["src_vid_mask"])
        td = dev.encode_text(batch["src_txt"], batch["src_txt_mask"], batch["txt_pooled"])
        vd = dev.encode_video(batch["src_vid"], batch["src_vid_mask"])
        sc, sd = cpu.score(tc, vc), dev.score(td, vd)
    assert sd.device.type == torch.device(device).type
    torch.testing.assert_close(sd.cpu(), sc, rtol=1e-4, atol=ATOL)
    dev.train()
    torch.manual_seed(0)
    out = dev(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    before = {n: p.detach().cpu().clone() for n, p in dev.named_parameters()}
    opt = torch.optim.AdamW([p for p in dev.parameters() if p.requires_grad], lr=1e-3)
    opt.zero_grad()
    out["loss"].backward()
    grads = [p.grad for p in dev.parameters() if p.grad is not None]
    assert grads and all(g.device.type == torch.device(device).type and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert any(not torch.equal(p.detach().cpu(), before[n]) for n, p in dev.named_parameters())


def test_grounder_training_step_on_cuda():
    grounder_step_matches(CUDA)


def test_retriever_training_step_on_cuda():
    retriever_step_matches(CUDA)


# =========================================================================== CPU vs CUDA predictions


def trained_grounder_predicts_alike(device) -> None:
    """A tiny grounder trained 30 steps on CPU, copied to ``device``: raw outputs within 1e-4,
    and the official rows (windows snapped to clips) alike."""
    from lavis_c2f.models.grounder import C2FQDDETR

    torch.manual_seed(0)
    model = C2FQDDETR.from_config(tiny_qd_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(30):
        b = make_batch([12, 9, 15, 10], [5, 4, 6, 3], [[[2.0, 8.0]], [[4.0, 10.0]], [[10.0, 20.0]], [[0.0, 6.0]]],
                       seed=step)
        loss = model(b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    dev = copy.deepcopy(model).to(device).eval()
    batch = make_batch([15, 8, 12], [6, 3, 5], [[[4.0, 12.0]], [[2.0, 6.0]], [[8.0, 16.0]]], seed=99)
    x = {k: batch[k] for k in ("src_txt", "src_txt_mask", "src_vid", "src_vid_mask")}
    with torch.no_grad():
        oc = model.detr(**x)
        od = dev.detr(**{k: v.to(device) for k, v in x.items()})
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        torch.testing.assert_close(od[key].cpu(), oc[key], atol=ATOL, rtol=0, msg=key)
    rows_c, rows_d = model.predict_batch(batch), dev.predict_batch(batch)
    clip = float(batch["clip_length"][0])
    for rc, rd in zip(rows_c, rows_d):
        assert (rc["qid"], rc["vid"]) == (rd["qid"], rd["vid"])
        assert len(rc["pred_saliency_scores"]) == len(rd["pred_saliency_scores"])
        assert max(abs(a - b) for a, b in zip(rc["pred_saliency_scores"], rd["pred_saliency_scores"])) < 1e-3
        wc, wd = rc["pred_relevant_windows"], rd["pred_relevant_windows"]
        assert len(wc) == len(wd)
        for st, ed, s in wc:   # every CPU window has a CUDA twin (a boundary may snap one clip away)
            assert any(abs(s - s2) <= 1e-3 and abs(st - st2) <= clip and abs(ed - ed2) <= clip
                       for st2, ed2, s2 in wd), (rc, rd)


def test_trained_grounder_predicts_the_same_on_cpu_and_cuda():
    trained_grounder_predicts_alike(CUDA)


# =========================================================================== runner


def _run(args, env, cwd=REPO, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=str(cwd),
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _metrics(summary_path: Path) -> dict:
    return json.loads(summary_path.read_text())["test"]["test"]


def runner_on_demo_corpus(work: Path, device: str) -> None:
    """``train.py projects/c2f/demo_stage2.yaml`` for one epoch with ``run.device=device`` on a
    generated demo corpus; then ``evaluate.py`` of its checkpoint on CPU and on ``device``."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"})
    corpus = work / "corpus"
    _run([sys.executable, "-m", "lavis_c2f.cli", "make-demo-corpus", corpus, "--n-videos", "60"], env)
    common = [f"datasets.c2f_demo.data_root={corpus}", f"run.output_dir={work / 'runs'}", "run.progress=false"]
    proc = _run([sys.executable, "train.py", "--cfg-path", "projects/c2f/demo_stage2.yaml", "--options", *common,
                 f"run.device={device}", "run.job_id=train", "run.max_epoch=1", "run.val_interval=1"], env)
    assert "CUDA is not available" not in proc.stdout + proc.stderr
    out = work / "runs" / "train"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == 0
    metrics = summary["test"]["test"]
    assert metrics["n_predictions"] > 0
    for key in ("MR-full-R1@0.5", "MR-full-mAP", "MR-full-mIoU", "HL-min-VeryGood-mAP"):
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), (key, metrics[key])
    rows = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert len(train_rows) == 1 and math.isfinite(float(train_rows[0]["loss"]))

    ckpt = out / "checkpoint_best.pth"
    evals = {}
    for name, dev in (("cpu", "cpu"), ("dev", device)):
        _run([sys.executable, "evaluate.py", "--cfg-path", "projects/c2f/demo_stage2.yaml", "--options", *common,
              f"run.device={dev}", f"run.job_id=eval_{name}", f"run.checkpoint={ckpt}"], env)
        evals[name] = _metrics(work / "runs" / f"eval_{name}" / "summary.json")
    assert evals["dev"] == pytest.approx(metrics, abs=1e-6)   # same device, same checkpoint: same metrics
    n = metrics["n_predictions"]
    for key, value in evals["cpu"].items():
        other = evals["dev"][key]
        if value is None or other is None:
            assert value is other, key
        else:   # allow one query to flip at a rounding boundary
            assert abs(value - other) <= 100.0 / n + 0.02, (key, value, other)


def test_runner_trains_demo_stage2_on_cuda(tmp_path):
    runner_on_demo_corpus(tmp_path, "cuda")
