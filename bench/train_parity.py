"""Our QD-DETR and MESM training against the official QD-DETR and MESM code: one step side by side, and
trained side by side.

The MESM side (``--official-mesm DIR``; ``bench/parity_mesm.py``, docs/parity.md) does the same
with the official MESM code on the corpus written in MESM's layout; what follows describes the
QD-DETR side.

**Step check** (``--step-check``): one batch of real training items is built with the official
``StartEndDataset`` of the user's checkout and the same items with our dataset, and printed
side by side: input features, span labels, hard saliency positive/negative, easy saliency
positive/negative, all-clip scores. Deterministic labels must be identical (span labels to
1e-6). The easy positive/negative clips are random draws in both codes (Python ``random``
there, a seeded NumPy generator here), so they are compared **by distribution**: over
``--draws`` draws per item (seeds 0..N-1 on both sides) both codes must draw from exactly the
same set of clips, uniformly (the frequencies are printed); a random subset of windows (items
with more than ``max_windows`` windows) is compared the same way. Then both models start from
the same weights (the official model's initialisation, copied into ours), get the same batch
(ours with the official draw of the random labels), and run one training forward and
backward, with the official dropout masks replayed in ours (same sites, same rates; the
official code lays tensors out sequence-first, ours batch-first, so the masks are transposed
into our layout). Every loss term, the weighted total and every parameter gradient are
compared; the exit status is non-zero when a label differs or a loss or gradient differs by
more than 1e-5 relative (``|ours - official| / max(|official|, 1e-6)``; per gradient tensor
``max |diff| / max(max |official|, 1e-6)``). The last line reads
``step-check: labels identical, max loss diff X, max grad diff Y``.

**Train parity** (``--train``): the official ``qd_detr/train.py`` and our ``train.py`` train on
the same data (the demo corpus by default, Moment-DETR layout) with the same recipe (sizes,
batch size, epochs, learning rate, weight decay, clipping, model selection on val every 5
epochs by MR-full-mAP) for each seed; both best checkpoints are evaluated on the test split
with the official QVHighlights metrics, each in two ways: batch-independently (the official
code at evaluation batch size 1, ours with ``eval_t2v_mask_mode: correct``) and with the
official evaluation batching (batch ``eval_bsz`` with the batch-mixing T2V mask: the official
code as it ships, ours with ``eval_t2v_mask_mode: official``). Train samples/s count the
training epochs only. Rows: the official code, ours with the official recipe (the defaults),
ours with the corrected T2V mask, ours with the old stable tie-breaking.

Conditions: every training process runs with one intra-op thread and no data-loader workers;
both sides are measured in the same invocation. The official processes run with NumPy's SIMD
sorts disabled (``NPY_DISABLE_CPU_FEATURES``; see ``lavis_c2f/ops/argsort.py``) so that their
``np.argsort`` orders tied clips as the NumPy the official code pinned; the step check checks
that. The official code runs unmodified, with the device shims listed in
``bench/official_runtime.py`` (printed by every run).

    python bench/train_parity.py --official-qd-detr DIR --step-check [--corpus DIR]
    python bench/train_parity.py --official-qd-detr DIR --train [--seeds 0 1 2] [--epochs 10]
        [--official-python PY] [--jobs 2] [--json OUT]
    python bench/train_parity.py make-qvh-sample --annotations ../shared/data/qvhighlights --out DIR
    python bench/train_parity.py --official-mesm DIR --step-check [--corpus DIR] [--items 4] [--mesm-layout DIR]
    python bench/train_parity.py --official-mesm DIR --train [--seeds 0 1 2] [--official-python PY] [--jobs 2]

``--corpus`` takes a demo corpus (``lavis-c2f make-demo-corpus``) or a QVHighlights-layout
folder (``highlight_{train,val,test}_release.jsonl``, ``features/{slowfast,clip}_features``,
``features/clip_text_features``); the default is the demo corpus in the cache, generated when
missing. ``make-qvh-sample`` writes a small QVHighlights-layout folder from real annotations
and generated (random) features.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import zlib
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench modules (also when loaded by path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import official_runtime  # noqa: E402
from parity_common import (TOL, Corpus, DropoutReplay, Job, Recipe, compare_item_labels,  # noqa: E402
                           compare_random_labels, detect_corpus, job_envs, official_job, our_run_config, ours_job,
                           parity_table, print_gradients, print_losses, run_jobs, seed_comparison)

#: our model config of the step checks unless ``--our-model`` says otherwise: the official code's
#: kernels. Float32 products on torch's BLAS, so that both sides round alike and an activation
#: input within float32 rounding of 0 (PReLU, ReLU) falls on the same side of its kink in both
#: (oneDNN's products, our default, lavis_c2f/ops/linear.py, differ by rounding, which can flip
#: such an input and move that one unit's gradient; docs/parity.md); dropout through
#: ``F.dropout``, where the recorded official masks are replayed (our default draws its masks
#: from raw bits, lavis_c2f/ops/dropout.py)
STEP_CHECK_MODEL: Dict[str, Any] = {"linear_kernel": "torch", "dropout_kernel": "torch"}


# --------------------------------------------------------------------------- data layouts


def default_demo_corpus() -> str:
    from lavis_c2f.data.demo_corpus import default_demo_root, make_demo_corpus

    root = default_demo_root()
    make_demo_corpus(root)  # a no-op when it is there
    return root


def make_qvh_sample(annotations: str, out: str, n_train: int = 64, n_val: int = 32, seed: int = 0,
                    streams: Sequence[Tuple[str, int]] = (("slowfast", 2304), ("clip", 512)),
                    text_dim: int = 512, clip_length: float = 2.0) -> Corpus:
    """A small QVHighlights-layout folder: real annotation rows, generated features.

    Rows: of each split, alternately the next full-length (150 s) video's query and the next
    shorter video's query, so that batches mix video lengths (padding) as real batches do.
    Video features: ``ceil(duration / clip_length)`` clips of seeded Gaussian noise per stream;
    text features: ``len(query.split()) + 2`` token rows (CLIP adds start/end tokens).
    """
    out = os.path.abspath(out)
    feat = {name: os.path.join(out, "features", f"{name}_features") for name, _ in streams}
    text_dir = os.path.join(out, "features", "clip_text_features")
    for d in list(feat.values()) + [text_dir]:
        os.makedirs(d, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        with open(os.path.join(annotations, f"highlight_{split}_release.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        full = [r for r in rows if r["duration"] >= 150]
        short = [r for r in rows if r["duration"] < 150]
        picked: List[Dict[str, Any]] = []
        for a, b in zip(full, short):
            picked += [a, b]
        picked = picked[:n]
        with open(os.path.join(out, f"highlight_{split}_release.jsonl"), "w") as f:
            for r in picked:
                f.write(json.dumps(r) + "\n")
        for r in picked:
            rng = np.random.default_rng([seed, zlib.crc32(r["vid"].encode())])
            n_clips = int(math.ceil(r["duration"] / clip_length))
            for name, dim in streams:
                path = os.path.join(feat[name], f"{r['vid']}.npz")
                if not os.path.exists(path):
                    np.savez(path, features=rng.standard_normal((n_clips, dim)).astype(np.float32))
            trng = np.random.default_rng([seed, int(r["qid"])])
            n_tok = len(r["query"].split()) + 2
            np.savez(os.path.join(text_dir, f"qid{r['qid']}.npz"),
                     last_hidden_state=trng.standard_normal((n_tok, text_dim)).astype(np.float32),
                     pooler_output=trng.standard_normal(text_dim).astype(np.float32))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("QVHighlights-layout sample written by bench/train_parity.py make-qvh-sample: annotation rows "
                f"from {annotations} (CC BY-NC-SA 4.0), features are seeded random numbers (seed {seed}).\n")
    return detect_corpus(out)


# --------------------------------------------------------------------------- the recipe


def official_argv(recipe: Recipe, corpus: Corpus, seed: int, results_root: str) -> List[str]:
    """The official ``qd_detr/train.py`` command line for ``recipe`` on ``corpus``."""
    v_dim, t_dim = corpus.widths()
    r = recipe
    return ["--dset_name", "hl", "--ctx_mode", "video_tef", "--train_path", corpus.annotations["train"],
            "--eval_path", corpus.annotations["val"], "--eval_split_name", "val",
            "--v_feat_dirs", *corpus.video_dirs, "--v_feat_dim", str(v_dim), "--t_feat_dir", corpus.text_dir,
            "--t_feat_dim", str(t_dim), "--results_root", results_root, "--exp_id", f"seed{seed}",
            "--seed", str(seed), "--device", "-1", "--num_workers", "0", "--no_pin_memory",
            "--hidden_dim", str(r.hidden_dim), "--nheads", str(r.nheads),
            "--dim_feedforward", str(r.dim_feedforward), "--enc_layers", str(r.enc_layers),
            "--dec_layers", str(r.dec_layers), "--num_queries", str(r.num_queries),
            "--dropout", str(r.dropout), "--input_dropout", str(r.input_dropout),
            "--lw_saliency", str(r.lw_saliency), "--lr", str(r.lr), "--wd", str(r.wd),
            "--lr_drop", str(r.lr_drop), "--grad_clip", str(r.grad_clip), "--bsz", str(r.bsz),
            "--eval_bsz", str(r.eval_bsz), "--n_epoch", str(r.epochs), "--max_es_cnt", "-1",
            "--max_q_l", str(r.max_q_l), "--max_v_l", str(r.max_v_l),
            "--clip_length", str(r.clip_length), "--max_windows", str(r.max_windows)]


# our variants: name -> (model overrides, dataset overrides)
VARIANTS: Dict[str, Tuple[Dict[str, Any], Dict[str, Any]]] = {
    "official recipe (defaults)": ({}, {}),
    "corrected T2V mask": ({"t2v_mask_mode": "correct"}, {}),
    "stable tie-breaking (old)": ({}, {"saliency_tie_break": "stable"}),
}


def our_model_config(recipe: Recipe, corpus: Corpus, **overrides: Any) -> Dict[str, Any]:
    """Our ``c2f_qd_detr`` model node for ``recipe`` (official recipe defaults, official
    post-processing: clamp to 150 s, no NMS, all windows)."""
    v_dim, t_dim = corpus.widths()
    r = recipe
    cfg = {"arch": "c2f_qd_detr", "model_type": "demo", "txt_dim": t_dim, "vid_dim": v_dim + 2,
           "hidden_dim": r.hidden_dim, "nheads": r.nheads, "dim_feedforward": r.dim_feedforward,
           "enc_layers": r.enc_layers, "dec_layers": r.dec_layers, "num_queries": r.num_queries,
           "dropout": r.dropout, "input_dropout": r.input_dropout, "lw_saliency": r.lw_saliency,
           "max_q_l": r.max_q_l, "max_v_l": r.max_v_l, "t2v_mask_mode": "official",
           "eval_t2v_mask_mode": "correct", "neg_sampling": "roll", "train_neg_pass": True,
           "postprocess": {"max_ts_val": 150.0, "nms_threshold": None, "max_after_nms": 10,
                           "top_k": None}}
    cfg.update(overrides)
    return cfg


def our_dataset_config(recipe: Recipe, corpus: Corpus, seed: int, **overrides: Any) -> Dict[str, Any]:
    """A ``c2f_qvh`` dataset node reading ``corpus`` (the builder of every QVHighlights-layout set)."""
    ann = {s: {"path": p, "format": "qvh", "require_windows": s == "train"}
           for s, p in corpus.annotations.items()}
    d = {"dataset_type": "moment_retrieval", "data_root": corpus.root, "annotations": ann,
         "reader": {"tolerance": 1.0, "clamp": False, "swap_reversed": False, "on_error": "raise"},
         "video_features": [{"type": "npz", "path": p, "field": "features", "cache_size": 4096}
                            for p in corpus.video_dirs],
         "text_features": {"type": "npz", "path": corpus.text_dir, "field": "last_hidden_state",
                           "pooled_field": "pooler_output", "qid_format": "qid{qid}", "cache_size": 8192},
         "clip_length": float(recipe.clip_length), "max_v_l": recipe.max_v_l, "max_q_l": recipe.max_q_l,
         "max_windows": recipe.max_windows, "use_tef": True, "normalize": True, "seed": seed,
         "saliency_max_n": 1, "saliency_tie_break": "official"}
    d.update(overrides)
    return d


def our_project(recipe: Recipe, corpus: Corpus, seed: int, output_dir: str, variant: str) -> Dict[str, Any]:
    """The project YAML of one of our runs (``VARIANTS``)."""
    model_over, data_over = VARIANTS[variant]
    return {"model": our_model_config(recipe, corpus, **model_over),
            "datasets": {"c2f_qvh": our_dataset_config(recipe, corpus, seed, **data_over)},
            "run": our_run_config(recipe, seed, output_dir)}


# --------------------------------------------------------------------------- step check


def step_check_qd_detr(official_dir: str, corpus: Corpus, recipe: Recipe, batch_size: int, seed: int,
                       n_draws: int, tie_break: str = "official",
                       our_model: Optional[Dict[str, Any]] = None) -> int:
    """The QD-DETR step check (module doc); ``tie_break`` is our dataset's
    ``saliency_tie_break`` (``stable`` shows what the check reports for the old order);
    ``our_model``: entries set in our model config (:data:`STEP_CHECK_MODEL` by default).
    Returns the exit status."""
    import random

    official_runtime.install_shims(official_dir)
    from qd_detr import attention as official_attention
    from qd_detr.config import BaseOptions
    from qd_detr.model import build_model
    from qd_detr.start_end_dataset import StartEndDataset, prepare_batch_inputs, start_end_collate

    from lavis_c2f.datasets.builders import QVHighlightsBuilder
    from lavis_c2f.models.grounder.lavis_models import C2FQDDETR
    from lavis_c2f.ops.argsort import introsort_argsort

    probe = [1.0] * 17
    scalar = np.argsort(np.asarray(probe)).tolist() == introsort_argsort(probe).tolist()
    print(f"NPY_DISABLE_CPU_FEATURES={os.environ.get('NPY_DISABLE_CPU_FEATURES', '')!r}: np.argsort "
          f"{'orders ties as the scalar introsort (as the official NumPy 1.17)' if scalar else 'uses a SIMD sort'}")
    if not scalar:
        print("step-check: np.argsort does not use NumPy's scalar introsort here: the official labels "
              "would follow this CPU's SIMD tie order")
        return 1

    opts = BaseOptions()
    opts.initialize()
    opt = opts.parser.parse_args(official_argv(recipe, corpus, seed, tempfile.gettempdir()))
    opt.device, opt.use_tef, opt.use_video = torch.device("cpu"), True, True
    opt.v_feat_dim += 2  # what BaseOptions.parse adds for the TEF columns

    off_ds = StartEndDataset(
        dset_name="hl", data_path=corpus.annotations["train"], v_feat_dirs=corpus.video_dirs,
        q_feat_dir=corpus.text_dir, q_feat_type="last_hidden_state", max_q_l=recipe.max_q_l,
        max_v_l=recipe.max_v_l, ctx_mode="video_tef", clip_len=recipe.clip_length,
        max_windows=recipe.max_windows, span_loss_type="l1", txt_drop_ratio=0)
    builder = QVHighlightsBuilder(dict(our_dataset_config(recipe, corpus, seed, saliency_tie_break=tie_break),
                                       splits=["train"]))
    our_ds = builder.build_datasets()["train"]
    n = min(batch_size, len(off_ds), len(our_ds))
    if [str(off_ds.data[i]["qid"]) for i in range(n)] != [str(our_ds.records[i].qid) for i in range(n)]:
        print("step-check: the two datasets list the training queries in different orders")
        return 1

    random.seed(seed)
    off_items = [off_ds[i] for i in range(n)]
    off_meta, off_batch = start_end_collate(off_items)
    off_inputs, off_targets = prepare_batch_inputs(off_batch, torch.device("cpu"))
    our_items = [our_ds[i] for i in range(n)]
    ours = our_ds.collater(our_items)

    print(f"\n== labels: {n} training items of {corpus.annotations['train']} ==")
    failures: List[str] = []
    for key_o, key_u in (("src_vid", "src_vid"), ("src_vid_mask", "src_vid_mask"),
                         ("src_txt", "src_txt"), ("src_txt_mask", "src_txt_mask")):
        a, b = off_inputs[key_o], ours[key_u]
        d = math.inf if a.shape != b.shape else float((a - b).abs().max())
        ok = d <= 1e-6
        print(f"  input {key_u:<16} shapes {tuple(a.shape)} / {tuple(b.shape)}, max |diff| {d:.2e}"
              f"{'' if ok else '  << DIFFERS'}")
        if not ok:
            failures.append(f"input {key_u}")

    random_windows: List[int] = []
    for i in range(n):
        meta, rec = off_meta[i], our_ds.records[i]
        ctx_l = int(off_inputs["src_vid_mask"][i].sum())
        print(f" item {i} qid {meta['qid']} vid {meta['vid']} clips {ctx_l} windows {len(meta['relevant_windows'])}")
        bad, is_random = compare_item_labels(
            f"item {i}", off_targets["span_labels"][i]["spans"], ours["span_labels"][i], len(meta["relevant_windows"]),
            recipe.max_windows, [(name, int(off_targets[key][i, 0]), int(ours[key][i, 0])) for name, key in
                                 (("hard positive", "saliency_pos_labels"), ("hard negative", "saliency_neg_labels"))])
        failures += bad
        if is_random:
            random_windows.append(i)
        a_all = off_targets["saliency_all_labels"][i, :ctx_l]
        b_all = ours["saliency_all_labels"][i, :ctx_l]
        ok = torch.equal(a_all, b_all.to(a_all.dtype))
        nz = [(j, int(a_all[j])) for j in torch.nonzero(a_all).flatten().tolist()]
        print(f"  {'all-clip scores':<22} {'equal' if ok else 'DIFFER'} over {ctx_l} clips (non-zero: "
              f"{len(nz)}, e.g. {nz[:4]})")
        if not ok:
            failures.append(f"item {i} all-clip scores")
        # random labels: distributions over n_draws draws on each side
        row = off_ds.data[i]

        def off_draw(k: int) -> List[Tuple[str, int]]:
            random.seed(k)
            pos, neg, _ = off_ds.get_saliency_labels_all(row["relevant_clip_ids"], row["saliency_scores"], ctx_l)
            return [("easy positive", int(pos[1])), ("easy negative", int(neg[1]))]

        def our_draw(k: int) -> List[Tuple[str, int]]:
            our_ds.set_epoch(k)
            lab = our_ds.labels(rec, ctx_l, our_ds.rng_for(i))
            return [("easy positive", int(lab["saliency_pos_labels"][1])),
                    ("easy negative", int(lab["saliency_neg_labels"][1]))]

        windows = [tuple(w) for w in row["relevant_windows"]]

        def off_win(k: int) -> List[Tuple[float, float]]:
            random.seed(k)
            return [tuple(round(x, 4) for x in w) for w in
                    off_ds.get_span_labels(list(windows), ctx_l).tolist()]

        def our_win(k: int) -> List[Tuple[float, float]]:
            our_ds.set_epoch(k)
            return [tuple(round(x, 4) for x in w) for w in
                    our_ds.labels(rec, ctx_l, our_ds.rng_for(i))["span_labels"].tolist()]

        this_batch = {name: (int(off_targets[key][i, 1]), int(ours[key][i, 1]))
                      for name, key in (("easy positive", "saliency_pos_labels"),
                                        ("easy negative", "saliency_neg_labels"))}
        random_rows = (off_win, our_win) if i in random_windows else (None, None)
        failures += [f"item {i} {name}" for name in compare_random_labels(off_draw, our_draw, n_draws, this_batch,
                                                                          *random_rows)]
    our_ds.set_epoch(0)

    # ---- one training step from the same weights, on the same batch
    torch.manual_seed(seed)
    off_model, off_crit = build_model(opt)
    our_model = STEP_CHECK_MODEL if our_model is None else our_model
    print(f"our model config set for this check: {our_model}")
    model = C2FQDDETR.from_config(our_model_config(recipe, corpus, **our_model))
    model.detr.load_state_dict(off_model.state_dict(), strict=True)  # same key layout
    batch = dict(ours)
    batch["saliency_pos_labels"] = ours["saliency_pos_labels"].clone()
    batch["saliency_neg_labels"] = ours["saliency_neg_labels"].clone()
    batch["saliency_pos_labels"][:, 1] = off_targets["saliency_pos_labels"][:, 1]
    batch["saliency_neg_labels"][:, 1] = off_targets["saliency_neg_labels"][:, 1]
    batch["span_labels"] = [off_targets["span_labels"][i]["spans"] if i in random_windows else s
                            for i, s in enumerate(ours["span_labels"])]
    off_model.train()
    off_crit.train()
    model.train()
    replay = DropoutReplay()
    try:
        replay.record(off_model, official_attention)
        off_out = off_model(**off_inputs)
        replay.restore()
        off_losses = off_crit(off_out, off_targets)
        w = off_crit.weight_dict
        off_total = sum(off_losses[k] * w[k] for k in off_losses if k in w)
        off_total.backward()
        replay.replay()
        our_losses = model(batch)
    finally:
        replay.restore()
    our_losses["loss"].backward()
    print(f"\n== one training step (batch {n}, official initialisation with seed {seed}; dropout: {replay.used} "
          f"of {len(replay.masks)} official masks replayed, the rest belong to the official negative-pair "
          "pass's decoder, whose outputs the official code discards) ==")
    max_loss = print_losses([k for k in off_losses if k in our_losses], off_losses, off_total, our_losses)
    off_params = dict(off_model.named_parameters())
    ours_grads = {name: p.grad for name, p in model.detr.named_parameters()}
    max_grad = print_gradients(ours_grads, {name: off_params[name].grad for name in ours_grads}, "")
    if failures:
        print(f"\nlabels that differ: {failures}")
    status = 0 if not failures and max_loss <= TOL and max_grad <= TOL else 1
    labels = "labels identical" if not failures else f"labels DIFFER ({len(failures)})"
    print(f"step-check: {labels}, max loss diff {max_loss:.2e}, max grad diff {max_grad:.2e}")
    return status


# --------------------------------------------------------------------------- train parity


def train_parity(official_dir: str, corpus: Corpus, recipe: Recipe, seeds: Sequence[int], official_python: str,
                 parallel: int, work: str, variants: Sequence[str]) -> Tuple[str, List[Dict[str, Any]]]:
    os.makedirs(work, exist_ok=True)
    base_env, off_env = job_envs()
    jobs: List[Job] = []
    for seed in seeds:
        jobs.append(official_job(
            work, f"official_seed{seed}", "official QD-DETR", "official defaults", seed, official_python,
            lambda d, out: ["train", official_dir, corpus.annotations["test"], f"1,{recipe.eval_bsz}", out, "--",
                            *official_argv(recipe, corpus, seed, os.path.join(d, "results"))],
            off_env))
        for variant in variants:
            tag = variant.split(" (")[0].replace(" ", "_").replace("-", "_")
            jobs.append(ours_job(
                work, f"ours_{tag}_seed{seed}", "ours QD-DETR", variant, seed,
                lambda d: our_project(recipe, corpus, seed, os.path.join(d, "output"), variant),
                recipe.eval_bsz, base_env))
    order = ["official defaults"] + list(variants)
    jobs.sort(key=lambda j: (order.index(j.variant), j.seed))  # the headline rows first
    print(f"train parity: {len(jobs)} runs, {parallel} at a time, work folder {work}", flush=True)
    run_jobs(jobs, parallel)
    return parity_table(jobs, recipe.eval_bsz)


# --------------------------------------------------------------------------- CLI


def _reexec_with_scalar_sort() -> None:
    """Restart this process with NumPy's SIMD sorts disabled (needed before NumPy is used)."""
    from lavis_c2f.ops.argsort import scalar_sort_env

    env = scalar_sort_env(os.environ)
    if env.get("NPY_DISABLE_CPU_FEATURES") and os.environ.get("NPY_DISABLE_CPU_FEATURES") is None:
        env.setdefault("OMP_NUM_THREADS", "1")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["make-qvh-sample"]:
        p = argparse.ArgumentParser(prog="train_parity.py make-qvh-sample")
        p.add_argument("--annotations", required=True, help="folder with highlight_{train,val}_release.jsonl")
        p.add_argument("--out", required=True)
        p.add_argument("--n-train", type=int, default=64)
        p.add_argument("--n-val", type=int, default=32)
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args(argv[1:])
        c = make_qvh_sample(a.annotations, a.out, a.n_train, a.n_val, a.seed)
        print(f"QVHighlights-layout sample written to {c.root} (streams {[os.path.basename(d) for d in c.video_dirs]})")
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-qd-detr", metavar="DIR", help="a checkout of the official QD-DETR code")
    p.add_argument("--official-mesm", metavar="DIR", help="a checkout of the official MESM code")
    p.add_argument("--mesm-layout", default=None, metavar="DIR",
                   help="where the corpus is written in MESM's layout (default: a folder of the corpus name "
                        "under the system temp folder; files already there are reused)")
    p.add_argument("--items", type=int, default=4, help="MESM step check: training items (videos)")
    p.add_argument("--mesm-bsz", type=int, default=None, help="MESM training batch in items (default: MesmRecipe)")
    p.add_argument("--our-model", nargs="+", default=[], metavar="KEY=VALUE",
                   help="step check: set these entries of our model config (YAML values), e.g. "
                        "ss_group_video=own or linear_kernel=onednn, to see what the check reports "
                        "for a variant (the check's own default: " + ", ".join(
                            f"{k}={v}" for k, v in STEP_CHECK_MODEL.items()) + ")")
    p.add_argument("--input-dropout", action="store_true",
                   help="MESM step check with the recipe's input dropout replayed too (needs "
                        "--our-model mesm_input_dropout=true for the masks to line up)")
    p.add_argument("--no-dropout", action="store_true",
                   help="MESM step check without dropout (diagnosis: computation vs dropout sites)")
    p.add_argument("--corpus", default=None, help="demo corpus or QVHighlights-layout folder (default: the demo corpus)")
    p.add_argument("--step-check", action="store_true")
    p.add_argument("--train", action="store_true", help="the three-seed train-parity table")
    p.add_argument("--batch-size", type=int, default=32, help="step check batch")
    p.add_argument("--draws", type=int, default=2000, help="draws per item for the random labels")
    p.add_argument("--seed", type=int, default=0, help="step check seed")
    p.add_argument("--our-tie-break", default="official", choices=["official", "stable"],
                   help="step check: our saliency_tie_break (stable = the old order, to see it reported)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--official-python", default=sys.executable,
                   help="interpreter with the official code's dependencies (sklearn, tqdm)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (each uses one thread)")
    p.add_argument("--work", default=None, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if not (a.step_check or a.train):
        p.error("nothing to do: give --step-check and/or --train")
    if not (a.official_qd_detr or a.official_mesm):
        p.error("give --official-qd-detr DIR and/or --official-mesm DIR")
    if a.step_check:
        _reexec_with_scalar_sort()
    bad = [kv for kv in a.our_model if "=" not in kv]
    if bad:
        p.error(f"--our-model takes KEY=VALUE, got {bad}")
    a.our_model = dict(STEP_CHECK_MODEL, **{k: yaml.safe_load(v) for k, v in
                                            (kv.split("=", 1) for kv in a.our_model)})
    recipe = Recipe() if a.epochs is None else Recipe(epochs=a.epochs)
    recipe.check()
    corpus = detect_corpus(a.corpus or default_demo_corpus())
    status = 0
    report: Dict[str, Any] = {"recipe": asdict(recipe), "corpus": corpus.root}
    if a.official_mesm:
        status = max(status, _mesm_main(a, p, corpus, report))
    if not a.official_qd_detr:
        return _write_report(a.json, report, status)
    official = os.path.abspath(a.official_qd_detr)
    if not os.path.isfile(os.path.join(official, "qd_detr", "start_end_dataset.py")):
        p.error(f"--official-qd-detr {official}: no qd_detr/start_end_dataset.py there")
    print(f"corpus: {corpus.root} ({corpus.layout} layout); official code: {official}")
    print("official code shims (bench/official_runtime.py): " + "; ".join(official_runtime.SHIMS))
    if a.step_check:
        status = step_check_qd_detr(official, corpus, recipe, a.batch_size, a.seed, a.draws,
                                    a.our_tie_break, a.our_model)
    if a.train:
        work = a.work or tempfile.mkdtemp(prefix="train_parity_")
        table, rows = train_parity(official, corpus, recipe, a.seeds, a.official_python, a.jobs, work, a.variants)
        print(f"\nrecipe: {asdict(recipe)}\n\n{table}")
        heads = [r for r in rows if r["variant"] == "official defaults"] + \
            [r for r in rows if r["variant"] == "official recipe (defaults)"]
        if len(heads) == 2 and all(len(r["seeds"]) > 1 for r in heads):
            print("\n" + seed_comparison(heads[1], heads[0], "indep"))
        report["train"] = rows
    return _write_report(a.json, report, status)


def _write_report(path: Optional[str], report: Dict[str, Any], status: int) -> int:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return status


def _mesm_main(a: argparse.Namespace, p: argparse.ArgumentParser, corpus: Corpus, report: Dict[str, Any]) -> int:
    """The ``--official-mesm`` part of :func:`main`."""
    import parity_mesm

    official = os.path.abspath(a.official_mesm)
    if not os.path.isfile(os.path.join(official, "dataset", "qvhighlights.py")):
        p.error(f"--official-mesm {official}: no dataset/qvhighlights.py there")
    recipe = parity_mesm.MesmRecipe(**{k: v for k, v in (("epochs", a.epochs), ("bsz", a.mesm_bsz)) if v is not None})
    recipe.check()
    where = a.mesm_layout or os.path.join(tempfile.gettempdir(), "train_parity_mesm",
                                          os.path.basename(os.path.normpath(corpus.root)))
    layout = parity_mesm.write_mesm_layout(corpus, where, recipe.tower_width, recipe.tower_layers)
    print(f"corpus: {corpus.root} ({corpus.layout} layout), in MESM's layout at {layout.root}; official MESM: {official}")
    print("official code shims (bench/official_runtime.py): "
          + "; ".join(official_runtime.SHIMS[:3] + official_runtime.MESM_SHIMS))
    status = 0
    report["mesm_recipe"] = asdict(recipe)
    if a.step_check:
        status = parity_mesm.step_check_mesm(official, layout, recipe, a.items, a.seed, a.draws, not a.no_dropout,
                                             a.our_model, a.input_dropout)
    if a.train:
        work = a.work or tempfile.mkdtemp(prefix="train_parity_mesm_")
        table, rows = parity_mesm.train_parity_mesm(official, layout, recipe, a.seeds, a.official_python,
                                                    a.jobs, work)
        print(f"\nMESM recipe: {asdict(recipe)}\n\n{table}")
        if len(rows) == 2 and all(len(r["seeds"]) > 1 for r in rows):
            print("\n" + seed_comparison(rows[1], rows[0], "batched"))
        report["mesm_train"] = rows
    return status


if __name__ == "__main__":
    sys.exit(main())
