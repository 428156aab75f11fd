"""Evaluation CLIs: ``python -m lavis_c2f.evaluation.qvh`` end to end, ``lavis-c2f eval``
registration, and the numpy-only import promise of the package."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lavis_c2f.evaluation import cli as eval_cli
from lavis_c2f.evaluation.qvh import main as qvh_main

REPO = Path(__file__).resolve().parents[3]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def lookup(d, path):
    for k in path:
        d = d[k]
    return d


@pytest.mark.slow  # ~8 s, nearly all of it the LAVIS import of the parent package
def test_module_cli_on_golden_file(shared_dir, tmp_path, subprocess_env):
    data = shared_dir / "data"
    out = tmp_path / "sub" / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lavis_c2f.evaluation.qvh",
         "--submission", str(data / "eval_golden" / "sample_val_preds.jsonl"),
         "--gt", str(data / "qvhighlights" / "highlight_val_release.jsonl"), "--out", str(out)],
        cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    golden = json.loads((data / "eval_golden" / "sample_val_preds_metrics_raw.json").read_text())
    written = json.loads(out.read_text())
    mismatches = [(p, v, lookup(written, p)) for p, v in leaves(golden) if lookup(written, p) != v]
    assert not mismatches
    assert list(written["brief"])[0] == "MR-full-R1@0.3"
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary file
    table = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()
             if line.startswith(("MR-", "HL-"))}
    assert table["MR-full-mAP"] == "32.20" and table["HL-min-VeryGood-Hit1"] == "55.55"
    assert table["MR-full-mIoU"] == f"{written['brief']['MR-full-mIoU']:.2f}"


def test_module_main_reports_qid_mismatch(tmp_path, capsys):
    gt = write_jsonl(tmp_path / "gt.jsonl", [{"qid": 1, "relevant_windows": [[0, 2]]},
                                             {"qid": 2, "relevant_windows": [[0, 2]]}])
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"qid": 1, "pred_relevant_windows": [[0, 2, 1]]}])
    out = tmp_path / "m.json"
    assert qvh_main(["--submission", str(pred), "--gt", str(gt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "qid 2" in err and str(pred) in err and f"{gt}:2" in err and "--no-match-number" in err
    assert not out.exists()
    assert qvh_main(["--submission", str(pred), "--gt", str(gt), "--out", str(out),
                     "--no-match-number"]) == 0
    assert json.loads(out.read_text())["brief"]["MR-full-mAP"] == 100.0
    assert "MR-full-mAP" in capsys.readouterr().out


def test_module_main_rejects_options_of_other_protocols(tmp_path, capsys):
    gt = write_jsonl(tmp_path / "gt.jsonl", [{"qid": 1, "relevant_windows": [[0, 2]]}])
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"qid": 1, "pred_relevant_windows": [[0, 2, 1]]}])
    assert qvh_main(["--submission", str(pred), "--gt", str(gt), "--topk", "3"]) == 1
    assert "qvh protocol" in capsys.readouterr().err
    assert qvh_main(["--submission", str(pred), "--gt", str(gt), "--protocol", "r1miou",
                     "--topk", "3", "--iou-thresholds", "0.9"]) == 0
    assert "R3@0.9" in capsys.readouterr().out


def run_eval_subcommand(argv):
    parser = argparse.ArgumentParser(prog="lavis-c2f")
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_subcommand_all_protocols(tmp_path, capsys):
    gt = write_jsonl(tmp_path / "gt.jsonl", [
        {"qid": 1, "vid": "a", "duration": 4, "relevant_windows": [[0, 2]],
         "relevant_clip_ids": [0], "saliency_scores": [[4, 4, 4]]}])
    pred = write_jsonl(tmp_path / "pred.jsonl", [
        {"qid": 1, "pred_relevant_windows": [[0, 2, 1.0]], "pred_saliency_scores": [0.9, 0.1]}])
    moments = write_jsonl(tmp_path / "moments.jsonl", [
        {"qid": 1, "pred_moments": [["b", 0, 2, 0.9], ["a", 0, 2, 0.8]]}])
    out = tmp_path / "qvh.json"
    assert run_eval_subcommand(["eval", "--submission", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    brief = json.loads(out.read_text())["brief"]
    assert brief["MR-full-mAP"] == 100.0 and brief["HL-min-VeryGood-Hit1"] == 100.0
    out = tmp_path / "r1.json"
    run_eval_subcommand(["eval", "--protocol", "r1miou", "--submission", str(pred), "--gt", str(gt),
                         "--out", str(out)])
    assert json.loads(out.read_text())["brief"]["R1@0.7"] == 100.0
    out = tmp_path / "vcmr.json"
    run_eval_subcommand(["eval", "--protocol", "vcmr", "--submission", str(moments), "--gt", str(gt),
                         "--out", str(out), "--topk", "1", "2"])
    assert json.loads(out.read_text())["brief"] == {
        "VCMR-R@1-IoU@0.5": 0.0, "VCMR-R@2-IoU@0.5": 100.0, "VCMR-R@1-IoU@0.7": 0.0,
        "VCMR-R@2-IoU@0.7": 100.0, "VR-R@1": 0.0, "VR-R@2": 100.0}
    assert "VCMR-R@2-IoU@0.7" in capsys.readouterr().out


def test_evaluation_package_needs_only_numpy():
    """Importing the evaluation modules (bypassing the LAVIS-registering parent __init__)
    pulls in neither torch nor LAVIS."""
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('lavis_c2f'); pkg.__path__ = [{str(REPO / 'lavis_c2f')!r}]\n"
        "sys.modules['lavis_c2f'] = pkg\n"
        "import lavis_c2f.evaluation as E\n"
        "import lavis_c2f.evaluation.qvh, lavis_c2f.evaluation.retrieval, lavis_c2f.evaluation.vcmr\n"
        "import lavis_c2f.evaluation.cli\n"
        "assert callable(E.eval_submission) and callable(E.RetrievalAccumulator)\n"
        "print(sorted(m for m in ('torch', 'lavis', 'transformers', 'sklearn') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
