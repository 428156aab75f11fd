"""``lavis-c2f quickstart``: the whole coarse-to-fine chain on the embedded demo corpus.

Steps (all in this process, through the same entry points as ``train.py`` / ``evaluate.py``:
:func:`lavis_c2f.launch.build` and the ``c2f_runner``; each step re-builds its config, seeds
and registry paths from its YAML):

1. make the demo corpus (:func:`lavis_c2f.data.demo_corpus.make_demo_corpus`);
2. train stage 1 (``projects/c2f/demo_stage1.yaml``, T-MASS retriever);
3. stage-1 inference on train/val/test with the best checkpoint (ranks files);
4. ``merge-stage1`` of each split (top-K retrieved videos into the annotations);
5. train stage 2 on retrieved videos (``projects/c2f/demo_c2f.yaml``: QD-DETR with hard
   negatives, validated at corpus level);
6. ``tune-fusion`` on the validation candidates;
7. corpus-level evaluation on test with the tuned fusion;
8. the same chain with untrained models (random initialisation, same seeds) on test;
9. chance: a random predictor scored by the same metric code (random video ranking and 5
   random clip-aligned windows with random scores per video; mean of 5 draws).

It prints one table (stage-1 video recall, single-video moment retrieval in the GT video,
video-corpus moment retrieval, and its bound with a perfect stage 1) and writes everything
under one absolute run directory: ``corpus/``, ``runs/<step>/`` (configs, logs, checkpoints,
results), ``merged/``, ``fusion.json``, ``progress.json``, ``quickstart.log``, ``summary.json``,
``table.txt`` (:class:`~lavis_c2f.pipeline.quickstart_run.QuickstartRun`, the one reader and
writer of that layout).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from lavis_c2f import launch
from lavis_c2f.common.io import read_json, write_json
from lavis_c2f.data.cfg import yaml_defaults
from lavis_c2f.data.demo_corpus import make_demo_corpus
from lavis_c2f.data.readers import read_annotations
from lavis_c2f.evaluation._rows import load_rows
from lavis_c2f.paths import PROJECT_ROOT
from lavis_c2f.pipeline.expected import expected_path, load_expected
from lavis_c2f.pipeline.fusion import FusionConfig, evaluate_candidates, tune_fusion
from lavis_c2f.pipeline.merge import merge_stage1
from lavis_c2f.pipeline.quickstart_run import QuickstartRun

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CHANCE_DRAWS = 5
CHANCE_WINDOWS = 5
#: the main job's corpus (DemoCorpusParams overrides): lavis_c2f/configs/pipeline/quickstart.yaml
QUICKSTART_CORPUS = yaml_defaults("pipeline/quickstart.yaml", "corpus")

# table columns: (header, metric key)
COLUMNS = [
    ("VR R@1", "stage1-R@1"), ("VR R@5", "stage1-R@5"), ("VR R@10", "stage1-R@10"),
    ("MR R1@.5", "MR-full-R1@0.5"), ("MR R1@.7", "MR-full-R1@0.7"), ("MR mAP", "MR-full-mAP"),
    ("VCMR R1@.5", "VCMR-R@1-IoU@0.5"), ("R10@.5", "VCMR-R@10-IoU@0.5"), ("R100@.5", "VCMR-R@100-IoU@0.5"),
    ("R1@.7", "VCMR-R@1-IoU@0.7"), ("R1@.5", "oracle-VCMR-R@1-IoU@0.5"),
]


def project_yaml(name: str) -> str:
    """Absolute path of ``projects/c2f/<name>`` in the checkout (the quickstart runs from it)."""
    path = PROJECT_ROOT / "projects" / "c2f" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the quickstart runs from a checkout of lavis-c2f "
                                "(pip install -e .)")
    return str(path)


class _Steps:
    """Step banners with elapsed times; each step is also recorded in the run's
    ``progress.json`` (:meth:`QuickstartRun.write_progress`, read by the web demo)."""

    def __init__(self, total: int, run: Optional[QuickstartRun] = None):
        self.total, self.i, self.t0 = total, 0, time.perf_counter()
        self.run = run
        self.times: Dict[str, float] = {}
        self._start = None
        self._name = None

    def start(self, name: str) -> None:
        self.end()
        self.i += 1
        self._name, self._start = name, time.perf_counter()
        if self.run is not None:
            self.run.write_progress(self.i, self.total, name)
        print(f"[{self.i}/{self.total}] {name} ...", flush=True)

    def end(self) -> None:
        if self._name is not None:
            dt = time.perf_counter() - self._start
            self.times[self._name] = round(dt, 1)
            print(f"      done in {dt:.1f} s", flush=True)
            self._name = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _file_logging(log_file: Path) -> None:
    """Send the runner's INFO logs to the run's log file (the console keeps progress bars)."""
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def run_step(cfg_path: str, options: Sequence[str], log_file: Path, evaluate: bool = False) -> Dict[str, Any]:
    """Train (or evaluate) one project YAML in this process, like ``train.py`` / ``evaluate.py``.

    Returns the run's summary (also written to ``<output_dir>/<job_id>/summary.json``)."""
    args = argparse.Namespace(cfg_path=cfg_path, options=list(options))
    cfg, task, datasets, model, runner_cls = launch.build(args)
    _file_logging(log_file)
    runner = runner_cls(cfg=cfg, task=task, model=model, datasets=datasets, job_id=None)
    if not evaluate:
        return runner.train()
    ckpt = cfg.run_cfg.get("checkpoint", None)
    if ckpt:
        runner.load_weights(ckpt)
    logs = runner.evaluate(cur_epoch="best", skip_reload=True)
    summary = {"job_id": runner.job_id, "output_dir": str(runner.output_dir), "checkpoint": ckpt, "test": logs}
    write_json(summary, runner.output_dir / "summary.json")
    return summary


def chance_rows(records: Sequence[Any], vids: Sequence[str], durations: Dict[str, float], clip_length: float,
                k: int, rng: np.random.Generator, n_windows: int = CHANCE_WINDOWS) -> List[Dict[str, Any]]:
    """Candidate rows (:mod:`lavis_c2f.pipeline.fusion`) of a random predictor: a random
    ranking of ``vids`` and, per grounded video, ``n_windows`` clip-aligned windows (start clip
    uniform, end clip uniform after it) with random scores (no saliency: the table has no highlight
    metrics)."""
    def windows(vid: str) -> List[List[float]]:
        n = max(1, int(round(durations[vid] / clip_length)))
        st = rng.integers(0, n, size=n_windows)                       # start clip, uniform
        ed = st + 1 + (rng.random(n_windows) * (n - st)).astype(np.int64)   # end, uniform after it
        score = rng.random(n_windows)
        order = np.argsort(-score, kind="stable")
        return [[float(st[i] * clip_length), float(min(ed[i] * clip_length, durations[vid])), float(score[i])]
                for i in order]

    rows = []
    for rec in records:
        order = rng.permutation(len(vids))
        scores = np.sort(rng.random(len(vids)))[::-1]
        stage1 = [[vids[j], float(s)] for j, s in zip(order, scores)]
        cands = [[v, s, windows(v)] for v, s in stage1[:k]]
        gt_w = next((c[2] for c in cands if c[0] == rec.vid), None) or windows(rec.vid)
        rows.append({"qid": rec.qid, "query": rec.query, "gt_vid": rec.vid, "duration": rec.duration,
                     "relevant_windows": [[float(s), float(e)] for s, e in rec.relevant_windows],
                     "relevant_clip_ids": rec.relevant_clip_ids, "saliency_scores": rec.saliency_scores,
                     "stage1": stage1, "candidates": cands, "gt_windows": gt_w,
                     "gt_saliency": None})
    return rows


def chance_metrics(ann_path: str, clip_length: float, k: int, draws: int = CHANCE_DRAWS, seed: int = 0
                   ) -> Dict[str, float]:
    """Mean metrics of :func:`chance_rows` over ``draws`` seeded draws (default fusion)."""
    records = read_annotations(ann_path, fmt="qvh")
    durations: Dict[str, float] = {}
    for r in records:
        durations.setdefault(r.vid, float(r.duration))
    vids = list(durations)
    acc: Dict[str, List[float]] = {}
    for d in range(draws):
        rng = np.random.default_rng([seed, d])
        flat, _, _ = evaluate_candidates(chance_rows(records, vids, durations, clip_length, k, rng), FusionConfig(),
                                         protocol="qvh", clip_length=clip_length)
        for key, v in flat.items():
            acc.setdefault(key, []).append(float(v))
    return {key: round(float(np.mean(v)), 2) for key, v in acc.items()}


def format_table(rows: Sequence[tuple]) -> str:
    """``rows`` of (label, metrics dict) -> a fixed-width text table of :data:`COLUMNS`."""
    label_w = max(len(r[0]) for r in rows) + 2
    widths = [max(len(h), 6) + 2 for h, _ in COLUMNS]
    groups = [("stage 1: text->video", 3), ("stage 2: in GT video", 3), ("coarse-to-fine: VCMR", 4),
              ("bound", 1)]
    line1, col = " " * label_w, 0
    for name, n in groups:
        w = sum(widths[col:col + n])
        line1 += name[: w - 1].center(w)
        col += n
    line2 = " " * label_w + "".join(h.rjust(w) for (h, _), w in zip(COLUMNS, widths))
    out = [line1, line2, "-" * len(line2)]
    for label, m in rows:
        cells = []
        for (_, key), w in zip(COLUMNS, widths):
            v = m.get(key)
            cells.append(("-" if v is None else f"{float(v):.1f}").rjust(w))
        out.append(label.ljust(label_w) + "".join(cells))
    return "\n".join(out)


def epoch_options(cfg_path: str, epochs: Optional[int]) -> List[str]:
    """``--options`` that train ``cfg_path`` for ``epochs`` epochs with the same lr schedule shape:
    ``run.max_epoch`` and, when the YAML has ``run.lr_milestones``, each milestone scaled by
    ``epochs / max_epoch`` (rounded, at least 1). None: no options."""
    if not epochs:
        return []
    run = OmegaConf.load(cfg_path).run
    opts = [f"run.max_epoch={int(epochs)}"]
    milestones = list(run.get("lr_milestones") or [])
    if milestones:
        scale = int(epochs) / int(run.max_epoch)
        opts.append("run.lr_milestones=[" + ",".join(str(max(1, round(int(m) * scale))) for m in milestones) + "]")
    return opts


def expected_lines(trained: Dict[str, Any], applies: bool) -> tuple:
    """Table rows and note lines comparing ``trained`` with the README's expected range
    (:mod:`lavis_c2f.pipeline.expected`, job ``quickstart``).

    Returns ``(rows, lines, checks)``: two table rows (low and high end of the range), the
    note lines, and ``{key: {value, lo, hi, inside}}`` for ``summary.json``; no rows and one
    line when the range does not apply (non-default corpus size or epochs) or is missing."""
    if not applies:
        return [], ["expected range (README): not shown, it holds for the default corpus and epochs only."], {}
    exp = load_expected("quickstart") if os.path.isfile(expected_path()) else None
    if exp is None or not exp.figures:
        return [], ["expected range (README): none recorded (run bench/reproducibility.py --write-expected)."], {}
    checks = exp.check(trained)
    rows = [("expected low (README)", {k: st.lo for k, st in exp.figures.items()}),
            ("expected high (README)", {k: st.hi for k, st in exp.figures.items()})]
    names = {key: header for header, key in COLUMNS}
    outside = [f"{names.get(k, k)} {v:.1f} (expected {st.lo:.1f}-{st.hi:.1f})" for k, v, st, ok in checks if not ok]
    m = exp.measured
    source = (f"mean -/+ max(2 sd, 1) of {len(exp.runs)} runs of bench/reproducibility.py"
              + (f", {m['date']}" if m.get("date") else "") + (f", {m['machine']}" if m.get("machine") else ""))
    if outside:
        lines = [f"OUTSIDE the README's expected range ({source}): " + "; ".join(outside) + "."]
    else:
        lines = [f"every trained figure ({len(checks)}) is inside the README's expected range ({source})."]
    return rows, lines, {k: {"value": v, "lo": st.lo, "hi": st.hi, "inside": ok} for k, v, st, ok in checks}


def corpus_overrides(n_videos: Optional[int] = None,
                     corpus_params: Optional[Dict[str, Any]] = None) -> "tuple[Dict[str, Any], bool]":
    """The DemoCorpusParams overrides of a quickstart run and whether they are the user's.

    No ``n_videos`` and no ``corpus_params``: the main job's corpus, :data:`QUICKSTART_CORPUS`
    (``False``). Otherwise the generator's defaults with ``corpus_params`` and ``n_videos``
    (``True``): they replace the main job's corpus rather than add to it, so a reduced corpus
    (``--n-videos 150``) keeps the default split fractions."""
    if not (n_videos or corpus_params):
        return dict(QUICKSTART_CORPUS), False
    return {**dict(corpus_params or {}), **({"n_videos": int(n_videos)} if n_videos else {})}, True


def run_quickstart(out: Optional[str] = None, device: str = "cpu", threads: Optional[int] = 1,
                   stage1_epochs: Optional[int] = None, stage2_epochs: Optional[int] = None,
                   n_videos: Optional[int] = None, include_untrained: bool = True,
                   seed: Optional[int] = None, corpus_params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run the quickstart (module docstring); returns the summary written to ``summary.json``.

    ``threads``: torch CPU threads (None or 0: torch's default). ``seed``: ``run.seed`` of
    both stages (None: the YAMLs' seed). ``stage1_epochs`` / ``stage2_epochs``: override the
    YAMLs' epochs, lr milestones scaled alike (:func:`epoch_options`). The corpus is
    :data:`QUICKSTART_CORPUS` (``configs/pipeline/quickstart.yaml``) unless ``n_videos`` or
    ``corpus_params`` are given: then it is the generator's defaults
    (:class:`~lavis_c2f.data.demo_corpus.DemoCorpusParams`) with those changes."""
    cpu0 = time.process_time()
    if threads:
        torch.set_num_threads(int(threads))
    run = QuickstartRun.new(out)
    run_dir = run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run.log
    _file_logging(log_file)
    runs = run.runs
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    steps = _Steps(9 if include_untrained else 8, run)
    print(f"lavis-c2f quickstart: run directory {run_dir} (device {device}, {torch.get_num_threads()} CPU threads"
          + (f", load {load0:.1f}" if load0 is not None else "") + ")", flush=True)

    s1_yaml, c2f_yaml = project_yaml("demo_stage1.yaml"), project_yaml("demo_c2f.yaml")
    corpus = run.corpus
    common = [f"datasets.c2f_demo.data_root={corpus}", f"run.output_dir={runs}", f"run.device={device}"]
    if seed is not None:
        common.append(f"run.seed={int(seed)}")

    steps.start("make the demo corpus")
    corpus_kw, custom_corpus = corpus_overrides(n_videos, corpus_params)
    meta = make_demo_corpus(str(corpus), **corpus_kw)
    sizes = {s: (len(meta["splits"][s]["vids"]), meta["splits"][s]["n_queries"]) for s in SPLITS}
    print("      " + ", ".join(f"{s}: {v} videos / {q} queries" for s, (v, q) in sizes.items()), flush=True)

    steps.start("train stage 1 (T-MASS retriever)")
    s1_opts = common + ["run.job_id=stage1", "run.test_splits=[]"]
    s1_opts += epoch_options(s1_yaml, stage1_epochs)
    s1 = run_step(s1_yaml, s1_opts, log_file)
    s1_ckpt = Path(s1["output_dir"]) / "checkpoint_best.pth"

    steps.start("stage-1 inference on train / val / test")
    inf = run_step(s1_yaml, common + ["run.job_id=stage1_infer", f"run.checkpoint={s1_ckpt}",
                                      "run.test_splits=[train,val,test]"], log_file, evaluate=True)
    ranks = {s: Path(inf["output_dir"]) / "result" / f"{s}_best_ranks.jsonl" for s in SPLITS}

    steps.start("merge stage-1 results into stage-2 annotations")

    c2f_run = OmegaConf.load(c2f_yaml).run
    k = int(max(c2f_run.stage1_top_k, c2f_run.hard_negative_top_k))
    merged = {s: run.merged / f"{s}.jsonl" for s in SPLITS}
    for s in SPLITS:
        m = merge_stage1(str(ranks[s]), str(corpus / "annotations" / f"{s}.jsonl"), k, str(merged[s]))
        print(f"      {s}: GT video in the top-{k} for {m['gt_in_top_k']}% of {m['num_queries']} queries", flush=True)
    ann_opts = [f"datasets.c2f_demo.annotations.{s}.path={merged[s]}" for s in SPLITS] + ["run.stage1_ranks=null"]

    steps.start("train stage 2 (QD-DETR) on retrieved videos")
    s2_opts = common + ann_opts + ["run.job_id=stage2", "run.test_splits=[]"]
    s2_opts += epoch_options(c2f_yaml, stage2_epochs)
    s2 = run_step(c2f_yaml, s2_opts, log_file)
    s2_ckpt = Path(s2["output_dir"]) / "checkpoint_best.pth"

    steps.start("tune the fusion weight on val")
    cand = Path(s2["output_dir"]) / "result" / f"val_{s2['best_epoch']}_candidates.jsonl"
    choice = tune_fusion(load_rows(str(cand)), form="product")
    choice["candidates"] = str(cand)
    write_json(choice, run.fusion)
    print(f"      weight {choice['weight']:g} (val {choice['metric']} = {choice['value']})", flush=True)

    steps.start("corpus-level evaluation on test")
    ev = run_step(c2f_yaml, common + ann_opts + ["run.job_id=c2f_test", f"run.checkpoint={s2_ckpt}",
                                                  f"run.fusion_file={run.fusion}", "run.test_splits=[test]"],
                  log_file, evaluate=True)
    trained = ev["test"]["test"]

    untrained = None
    if include_untrained:
        steps.start("the same chain with untrained models (test)")
        u1 = run_step(s1_yaml, common + ["run.job_id=stage1_untrained", "run.test_splits=[test]"], log_file,
                      evaluate=True)
        u_merged = run_dir / "merged_untrained" / "test.jsonl"
        merge_stage1(str(Path(u1["output_dir"]) / "result" / "test_best_ranks.jsonl"),
                     str(corpus / "annotations" / "test.jsonl"), k, str(u_merged))
        u2 = run_step(c2f_yaml, common + [f"datasets.c2f_demo.annotations.test.path={u_merged}",
                                          "run.stage1_ranks=null", "run.job_id=c2f_untrained",
                                          "run.test_splits=[test]"], log_file, evaluate=True)
        untrained = u2["test"]["test"]

    steps.start(f"chance level (random predictor, {CHANCE_DRAWS} draws)")
    clip_length = float(meta["params"]["clip_length"])
    chance = chance_metrics(str(corpus / "annotations" / "test.jsonl"), clip_length, k=int(c2f_run.stage1_top_k))
    steps.end()

    s1_test = read_json(Path(inf["output_dir"]) / "result" / "test_best_metrics.json")
    baseline = (s1_test.get("baseline_mean_pooling") or {}).get("t2v", {})
    rows = [("chance (random)", chance)]
    if untrained is not None:
        rows.append(("untrained models", untrained))
    rows.append(("trained (this run)", trained))
    exp_rows, exp_lines, exp_checks = expected_lines(trained, applies=not (custom_corpus or stage1_epochs or stage2_epochs))
    table = format_table(rows + exp_rows)
    n_test_videos, n_test_queries = sizes["test"]
    notes = [
        f"test split: {n_test_queries} queries over {n_test_videos} videos; stage 2 grounds each query in its "
        f"top-{int(c2f_run.stage1_top_k)} videos; percentages.",
        "VR = text-to-video retrieval (stage 1); MR = moment retrieval in the GT video (official QVHighlights "
        "metrics); VCMR Rk@t = a correct moment (GT video, IoU >= t) among the top k of the corpus; bound = VCMR "
        "with the GT video ranked first by stage 1 (perfect stage 1).",
        f"stage-1 mean-pooling cosine baseline (no training): VR R@1 {baseline.get('R@1', '-')}, "
        f"R@5 {baseline.get('R@5', '-')}.",
        f"fusion: score = s2 * exp(w * zscore(s1)), w = {choice['weight']:g} tuned on val.",
        f"loss analysis: VCMR R1@.5 {trained.get('VCMR-R@1-IoU@0.5')} vs {trained.get('oracle-VCMR-R@1-IoU@0.5')} with "
        f"a perfect stage 1 (stage 1 costs the difference); the rest is stage 2.",
    ]
    text = table + "\n\n" + "\n".join(exp_lines + notes)
    run.table.write_text(text + "\n", encoding="utf-8")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu = time.process_time() - cpu0
    summary = {"run_dir": str(run_dir), "seconds": round(steps.elapsed, 1), "cpu_seconds": round(cpu, 1),
               "step_seconds": steps.times,
               "load_start": load0, "load_end": load1, "threads": torch.get_num_threads(), "device": device,
               "corpus": {s: {"videos": v, "queries": q} for s, (v, q) in sizes.items()},
               "fusion": {k2: choice[k2] for k2 in ("form", "weight", "s1_norm", "metric", "value")},
               "seed": seed, "corpus_params": corpus_kw, "chance": chance, "untrained": untrained,
               "trained": trained, "expected": exp_checks,
               "stage1_baseline_mean_pooling": baseline,
               "checkpoints": {"stage1": str(s1_ckpt), "stage2": str(s2_ckpt)}}
    write_json(summary, run.summary)
    print("\n" + text)
    print(f"\nfinished in {steps.elapsed:.0f} s (process CPU time {cpu:.0f} s"
          + (f", load average {load1:.1f}" if load1 is not None else "") + f"); all outputs in {run_dir}", flush=True)
    return summary
