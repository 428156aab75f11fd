"""Stage-2 grounder benchmark: ours against the official QD-DETR and MESM code, in one run.

For each grounder, on the same synthetic batches (official sizes: QVHighlights CLIP widths,
75 clips, 512-d query tokens):

* **training** samples/s: one optimiser step of batch ``--train-batch`` (32, the official
  batch size): forward + losses + backward + gradient clipping (0.1) + AdamW. The official
  side runs the body of its own ``train_epoch`` (``model(**inputs)``, ``criterion``, the
  weighted sum, ``backward``, ``clip_grad_norm_``, ``step``); ours runs the LAVIS model's
  ``forward(samples)`` (losses included) and the same optimiser calls;
* **inference** ms per (query, video) pair at batch 1 and at batch ``--topk`` (100: the top-K
  videos of one query): the official ``compute_mr_results`` (model + official
  post-processing, negative pass included, as the official evaluation runs it) against our
  ``predict_batch`` (model + the same post-processing).

Ours and the official code run round-robin in this one process and each job reports its best
of N runs after a warm-up round, so a burst of load from other processes hits both alike; the
table gives ratios (ours / official) measured in the same run, with the load average. On a
host shared with other jobs, ``--threads 1 --clock cpu`` times CPU seconds instead of elapsed
seconds (waiting for a core then does not count), the steadiest ratios there.

The official code comes from local checkouts (``--official-src``: wjun0830/QD-DETR,
``--official-mesm-src``: lntzm/MESM); it is imported from those folders in this process only
(never by the package). Its modules are built with its own option parser and builders; the
process-local shims this needs are printed with the results (:data:`SHIMS`).

Without official sources it times our models alone (with and without the negative pass).
``--data-share`` also reports the share of training step time spent waiting for data on the
demo corpus (our real dataset, collater and DataLoader settings).

    python bench/grounder.py --official-src ../QD-DETR --official-mesm-src ../MESM --json OUT
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import types
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WORDS = ("a man woman opens closes the door window walks runs into room kitchen car dog "
         "plays with ball talks to camera eats food").split()
TXT_DIM, VID_DIM, CLIP_LEN = 512, 512, 2.0

SHIMS = {
    "cuda": "torch.Tensor.cuda() returns the tensor itself without CUDA (official QD-DETR's "
            "Transformer.forward builds its decoder input with torch.zeros(...).cuda())",
    "sklearn": "sklearn.metrics is a stub module when scikit-learn is not installed (imported "
               "at module level by QD-DETR's standalone_eval, used only by the highlight "
               "metrics, never by compute_mr_results)",
    "mesm_b1": "MESM's sample_outclass_neg pairs a query with itself when the batch holds a "
               "single group (the official code raises IndexError on a batch of one; the "
               "negative pass then does the same work)",
}


# --------------------------------------------------------------------------- synthetic data
def synthetic_samples(n: int, n_clips: int, seed: int, same_query: bool = False,
                      min_words: int = 8, max_words: int = 30) -> List[Dict[str, Any]]:
    """``n`` QVHighlights-like training samples with random features.

    Each has ``n_clips`` L2-normalised 512-d clip features, a query of ``min_words ..
    max_words`` words with one 512-d feature row per word, 1-2 ground-truth windows (seconds,
    clip length 2 s), three annotators' saliency scores (0-4) on the window clips, and the
    official hard/easy positive and negative clip indices. ``same_query``: one query shared by
    all samples (the top-K case)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    shared = None
    for i in range(n):
        vid = torch.nn.functional.normalize(torch.randn(n_clips, VID_DIM, generator=g), dim=-1)
        if shared is None or not same_query:
            n_words = int(torch.randint(min_words, max_words + 1, (1,), generator=g))
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n_words,), generator=g)]
            txt = torch.nn.functional.normalize(torch.randn(n_words, TXT_DIM, generator=g), dim=-1)
            shared = (words, txt)
        words, txt = shared
        windows, rel = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            a = int(torch.randint(0, n_clips - 10, (1,), generator=g))
            b = a + int(torch.randint(2, 10, (1,), generator=g))
            windows.append([a * CLIP_LEN, b * CLIP_LEN])
            rel.extend(j for j in range(a, b) if j not in rel)
        rel.sort()
        scores = torch.randint(0, 5, (len(rel), 3), generator=g)
        agg = scores.sum(1)
        all_labels = torch.zeros(n_clips)
        all_labels[rel] = agg.float()
        order = [rel[j] for j in torch.argsort(agg, stable=True).tolist()]
        outside = [j for j in range(n_clips) if j not in rel]
        easy_pos = rel[int(torch.randint(0, len(rel), (1,), generator=g))]
        easy_neg = outside[int(torch.randint(0, len(outside), (1,), generator=g))]
        out.append({"vid_feat": vid, "txt_feat": txt, "words": words, "windows": windows,
                    "all_labels": all_labels, "pos": [order[-1], easy_pos],
                    "neg": [order[0], easy_neg], "qid": i, "vid": f"v{seed}_{i}",
                    "duration": n_clips * CLIP_LEN})
    return out


def _tef(n_clips: int) -> torch.Tensor:
    st = torch.arange(n_clips, dtype=torch.float32) / n_clips
    return torch.stack([st, st + 1.0 / n_clips], 1)


def _pad(rows: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), length, *rows[0].shape[1:])
    mask = torch.zeros(len(rows), length)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
        mask[i, :r.shape[0]] = 1
    return out, mask


def our_batch(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Our Moment-retrieval batch (docs/ARCHITECTURE.md) of ``samples``."""
    src_vid, vid_mask = _pad([torch.cat([s["vid_feat"], _tef(len(s["vid_feat"]))], 1) for s in samples])
    src_txt, txt_mask = _pad([s["txt_feat"] for s in samples])
    spans = []
    for s in samples:
        w = torch.tensor(s["windows"]) / s["duration"]
        spans.append(torch.stack([(w[:, 0] + w[:, 1]) / 2, w[:, 1] - w[:, 0]], 1))
    labels, _ = _pad([s["all_labels"] for s in samples])
    return {"src_vid": src_vid, "src_vid_mask": vid_mask, "src_txt": src_txt,
            "src_txt_mask": txt_mask, "qid": [s["qid"] for s in samples],
            "query": [" ".join(s["words"]) for s in samples], "vid": [s["vid"] for s in samples],
            "duration": torch.tensor([s["duration"] for s in samples]),
            "clip_length": torch.full((len(samples),), CLIP_LEN), "span_labels": spans,
            "saliency_pos_labels": torch.tensor([s["pos"] for s in samples]),
            "saliency_neg_labels": torch.tensor([s["neg"] for s in samples]),
            "saliency_all_labels": labels, "clip_mask": labels != 0,
            "has_labels": torch.ones(len(samples), dtype=torch.bool)}


# --------------------------------------------------------------------------- official code
_OFFICIAL_TOP = ("qd_detr", "standalone_eval", "utils", "model", "dataset", "runner", "eval",
                 "train")


def _forget_official_modules() -> None:
    """Drop the official checkouts' top-level module names (both have a ``utils`` package)."""
    for name in list(sys.modules):
        if name.split(".")[0] in _OFFICIAL_TOP:
            del sys.modules[name]


@contextlib.contextmanager
def official_imports(src: str) -> Iterator[None]:
    """Import from the official checkout ``src`` (first on ``sys.path``) inside the block; its
    module names are forgotten afterwards, the imported objects keep working."""
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise SystemExit(f"official source folder not found: {src}")
    _forget_official_modules()
    sys.path.insert(0, src)
    try:
        yield
    finally:
        sys.path.remove(src)
        _forget_official_modules()


def install_shims(used: List[str]) -> None:
    """Process-local shims of :data:`SHIMS` (no official file is edited)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    if not torch.cuda.is_available() and "cuda" not in used:
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        used.append("cuda")
    try:
        import sklearn.metrics  # noqa: F401
    except ImportError:
        if "sklearn" not in used:
            stub = types.ModuleType("sklearn")
            metrics = types.ModuleType("sklearn.metrics")

            def unavailable(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("scikit-learn is not installed (bench stub)")

            metrics.precision_recall_curve = unavailable  # type: ignore[attr-defined]
            stub.metrics = metrics  # type: ignore[attr-defined]
            sys.modules.setdefault("sklearn", stub)
            sys.modules.setdefault("sklearn.metrics", metrics)
            used.append("sklearn")


class OfficialQDDETR:
    """The official QD-DETR model, criterion and optimiser, built with its own parser and
    ``build_model`` for the CLIP-only QVHighlights setting of ``qd_detr/scripts/train.sh``."""

    name = "qd_detr"

    def __init__(self, src: str, device: torch.device, shims: List[str]):
        install_shims(shims)
        with official_imports(src):
            from qd_detr.config import BaseOptions
            from qd_detr.inference import compute_mr_results
            from qd_detr.model import build_model
            from qd_detr.start_end_dataset import prepare_batch_inputs, start_end_collate

            opts = BaseOptions()
            opts.initialize()
            opt = opts.parser.parse_args([
                "--dset_name", "hl", "--ctx_mode", "video_tef", "--v_feat_dirs", "clip",
                "--v_feat_dim", str(VID_DIM), "--t_feat_dir", "clip_text", "--t_feat_dim",
                str(TXT_DIM), "--train_path", "train.jsonl", "--eval_path", "val.jsonl",
                "--exp_id", "bench", "--bsz", "32"])
            # what BaseOptions.parse adds after parsing (without its results folder)
            opt.device = device
            opt.pin_memory = False
            opt.use_tef, opt.use_video = True, True
            opt.v_feat_dim += 2
            torch.manual_seed(0)
            self.model, self.criterion = build_model(opt)
        self.model.to(device)
        self.criterion.to(device)
        self.opt = opt
        self.compute_mr_results = compute_mr_results
        self.prepare_batch_inputs = prepare_batch_inputs
        self.collate = start_end_collate
        # qd_detr/train.py start_training
        params = [{"params": [p for n, p in self.model.named_parameters() if p.requires_grad]}]
        self.optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.wd)

    def batch(self, samples: Sequence[Dict[str, Any]]) -> Any:
        """The official ``start_end_collate`` of the samples' ``StartEndDataset`` items."""
        items = []
        for s in samples:
            n = len(s["vid_feat"])
            w = torch.tensor(s["windows"]) / (n * CLIP_LEN)
            items.append({
                "meta": {"qid": s["qid"], "query": " ".join(s["words"]), "vid": s["vid"],
                         "duration": s["duration"]},
                "model_inputs": {
                    "query_feat": s["txt_feat"],
                    "video_feat": torch.cat([s["vid_feat"], _tef(n)], 1),
                    "span_labels": torch.stack([(w[:, 0] + w[:, 1]) / 2, w[:, 1] - w[:, 0]], 1),
                    "saliency_pos_labels": list(s["pos"]),
                    "saliency_neg_labels": list(s["neg"]),
                    "saliency_all_labels": s["all_labels"].numpy().astype(np.float32)}})
        return self.collate(items)

    def train_step(self, batch: Any) -> Callable[[], None]:
        model, criterion, opt, optimizer = self.model, self.criterion, self.opt, self.optimizer

        def step() -> None:  # the body of qd_detr/train.py train_epoch
            model.train()
            criterion.train()
            model_inputs, targets = self.prepare_batch_inputs(batch[1], opt.device)
            outputs = model(**model_inputs)
            loss_dict = criterion(outputs, targets)
            weight_dict = criterion.weight_dict
            losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict.keys() if k in weight_dict)
            optimizer.zero_grad()
            losses.backward()
            if opt.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
            optimizer.step()
            for k, v in loss_dict.items():  # its loss meters
                float(v)

        return step

    def infer(self, batch: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return self.compute_mr_results(self.model, [batch], self.opt)[0]

        return run


class OfficialMESM:
    """The official MESM model, criterion and optimiser (``runner.build_*``) with the
    QVHighlights recipe of ``config/QVHighlights/C+SF_C.json`` and CLIP-only video features
    (514 wide with TEF, as ours). Query features come precomputed, as on our side: MESM's
    word-feature path (``tokenizer_type GloVeNLTK`` + ``load_vocab_pkl``: no text tower,
    ``vocab_size + 1`` word classes), so the CLIP text tower is timed on neither side."""

    name = "mesm"

    def __init__(self, src: str, device: torch.device, shims: List[str]):
        install_shims(shims)
        with official_imports(src):
            import eval as official_eval  # noqa: A004 (MESM's eval.py)
            import model.model as official_model
            import runner
            from dataset import collate_qvh, prepare_batch_input
            from utils import BaseOptions
            from utils.func_utils import load_json

            opts = BaseOptions()
            opts.initialize()
            opt = opts.parser.parse_args([])
            opt.__dict__.update(load_json(os.path.join(src, "config", "QVHighlights", "C+SF_C.json")))
            opt.v_feat_dim, opt.t_feat_dim = VID_DIM + 2, TXT_DIM  # BaseOptions.parse: + 2 TEF
            opt.tokenizer_type, opt.load_vocab_pkl = "GloVeNLTK", True
            opt.device = device
            opt.pin_memory = False
            opt.batch_size = 32
            torch.manual_seed(0)
            self.model = runner.build_model(opt, None)
            self.criterion = runner.build_criterion(opt)
            self.optimizer, _ = runner.build_optimizer(opt, self.model)
            self._patch_single_group(official_model, shims)
        self.opt = opt
        self.collate = collate_qvh
        self.prepare = prepare_batch_input
        self.compute_mr_results = official_eval.compute_mr_results
        self.num_word_classes = opt.vocab_size + 1

    @staticmethod
    def _patch_single_group(official_model: Any, shims: List[str]) -> None:
        original = official_model.sample_outclass_neg

        def sample_outclass_neg(num_clips: torch.Tensor) -> torch.Tensor:
            if len(num_clips) == 1:
                return torch.zeros(int(num_clips[0]), dtype=torch.long, device=num_clips.device)
            return original(num_clips)

        official_model.sample_outclass_neg = sample_outclass_neg
        if "mesm_b1" not in shims:
            shims.append("mesm_b1")

    def batch(self, samples: Sequence[Dict[str, Any]], vocab: Dict[str, int]) -> Dict[str, Any]:
        """MESM's ``collate`` (qvhighlights.py) of the samples' items, one query per item;
        word labels, unknown flags and masking weights as its tokenizer gives them (the
        weights from the same POS rule: nouns/verbs/adjectives/adverbs 2)."""
        from lavis_c2f.models.grounder.pos_weights import get_pos_tagger

        tagger = get_pos_tagger(None)
        items = []
        max_words = self.opt.max_words_l
        for s in samples:
            n = len(s["vid_feat"])
            w = torch.tensor(s["windows"]) / (n * CLIP_LEN)
            words = s["words"][:max_words]
            feat = torch.zeros(1, max_words, TXT_DIM)
            feat[0, :len(words)] = s["txt_feat"][:len(words)]
            weight = torch.zeros(1, max_words, dtype=torch.long)
            weight[0, :len(words)] = torch.tensor(tagger.weights(words))
            unknown = torch.zeros(1, max_words, dtype=torch.bool)
            label = torch.zeros(1, max_words, dtype=torch.long)
            for j, word in enumerate(words):
                unknown[0, j] = word not in vocab
                label[0, j] = vocab.get(word, self.opt.vocab_size)
            labels = s["all_labels"]
            items.append({
                "num_clips": 1, "video_feat": [torch.cat([s["vid_feat"], _tef(n)], 1)],
                "video_id": [s["vid"]], "duration": [s["duration"]],
                "sentence": [" ".join(words)], "words_id": [feat], "words_weight": [weight],
                "unknown_mask": [unknown], "words_label": [label], "qid": [s["qid"]],
                "norm_moment": [w], "norm_span": [torch.stack([(w[:, 0] + w[:, 1]) / 2,
                                                               w[:, 1] - w[:, 0]], 1)],
                "pos_idx": [torch.tensor(s["pos"])], "neg_idx": [torch.tensor(s["neg"])],
                "saliency_label": [labels.double()], "clip_mask": [labels != 0]})
        return self.collate(items)

    def train_step(self, batch: Dict[str, Any]) -> Callable[[], None]:
        model, criterion, opt, optimizer = self.model, self.criterion, self.opt, self.optimizer

        def step() -> None:  # the body of MESM's train.py train_epoch
            model.train()
            criterion.train()
            data = dict(batch)
            self.prepare(data, opt.device, non_blocking=opt.pin_memory)
            outputs = model(**data, dataset_name=opt.dataset_name, is_training=True)
            loss_dict, loss = criterion(outputs, data, is_training=True)
            optimizer.zero_grad()
            loss.backward()
            if opt.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
            optimizer.step()
            float(loss)
            for k, v in loss_dict.items():
                float(v)

        return step

    def infer(self, batch: Dict[str, Any]) -> Callable[[], Any]:
        def run() -> Any:
            return self.compute_mr_results(self.model, [dict(batch)], self.opt)[0]

        return run


# --------------------------------------------------------------------------- ours
def build_ours(arch: str, device: torch.device, counts_path: str, num_word_classes: Optional[int] = None,
               overrides: Optional[Dict[str, Any]] = None):
    """The registered model of ``arch`` from its shipped QVHighlights CLIP YAML (MESM: the
    bench's whitespace vocabulary, words without start/end rows, as MESM's word-feature path),
    with ``overrides`` set in its model node (e.g. ``linear_kernel: torch``)."""
    from omegaconf import OmegaConf

    from lavis_c2f.models.grounder import C2FMESMQDDETR, C2FQDDETR

    cls = C2FQDDETR if arch == "qd_detr" else C2FMESMQDDETR
    node = OmegaConf.load(cls.default_config_path("qvh_clip")).model
    for key, value in (overrides or {}).items():
        node[key] = value
    if arch == "qd_detr":
        model = C2FQDDETR.from_config(node)
    else:
        node.vocab_counts = counts_path
        node.fw_tokenizer = "whitespace"
        node.fw_text_special_tokens = False
        if num_word_classes is not None:
            node.num_word_classes = num_word_classes
        model = C2FMESMQDDETR.from_config(node)
    return model.to(device)


def our_train_step(model, batch: Dict[str, Any], neg: bool = True) -> Callable[[], None]:
    """One optimiser step of our LAVIS model (AdamW lr 1e-4, wd 1e-4, clip 0.1 as official)."""
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad]}],
                            lr=1e-4, weight_decay=1e-4)

    def step() -> None:
        model.train()
        model.config["train_neg_pass"] = neg
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        for v in out.values():
            float(v.detach())

    return step


def our_infer(model, batch: Dict[str, Any]) -> Callable[[], Any]:
    """Our ``predict_batch`` (model + official post-processing, no negative pass)."""
    def run() -> Any:
        model.eval()
        return model.predict_batch(batch)

    return run


# --------------------------------------------------------------------------- timing
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - t0


def interleaved_best(jobs: Dict[Any, Callable[[], Any]], rounds: int, warmup: int = 1,
                     clock: str = "wall") -> Dict[Any, float]:
    """Best (minimum) seconds of each job over ``rounds`` rounds after ``warmup`` rounds.

    Jobs run round-robin (one call of each per round), so a burst of load from other
    processes on a shared machine hits every configuration alike, and the minimum is the
    measurement least disturbed by it. ``clock``: ``wall`` (elapsed seconds) or ``cpu`` (CPU
    seconds of this process, all its threads: time spent waiting for a core shared with
    other processes does not count; with one thread the steadiest figure on a loaded host).
    """
    best = {key: float("inf") for key in jobs}
    for r in range(warmup + rounds):
        for key, fn in jobs.items():
            elapsed = _timed(fn, CLOCKS[clock])
            if r >= warmup:
                best[key] = min(best[key], elapsed)
    return best


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------- data share
DEMO_PROJECTS = {"qd_detr": "projects/c2f/demo_stage2.yaml",
                 "mesm": "projects/c2f/demo_stage2_mesm.yaml"}


def data_wait_share(arch: str, epochs: int, tmp: str, device: str = "cpu") -> Dict[str, Any]:
    """Share of training step time spent waiting for the next batch, on the demo corpus: the
    demo project of ``arch`` (:data:`DEMO_PROJECTS`) built as ``train.py`` builds it (our
    dataset, collater and the runner's DataLoader, as configured: no worker processes), then
    ``epochs`` epochs of optimiser steps (the task's ``train_step``, backward, clipping,
    AdamW). Reported for the first epoch (feature files read) and the later ones (features
    held by the stores' caches) apart, with the mean milliseconds per step spent waiting (the
    demo grounder is small, so the same wait is a far smaller share of an official-size step).
    """
    from lavis_c2f.data.demo_corpus import default_demo_root, make_demo_corpus
    from lavis_c2f.launch import build, parse_args
    from lavis_c2f.models.grounder.vocab import count_tokens, read_queries, write_counts

    project = os.path.join(ROOT, DEMO_PROJECTS[arch])
    options = [f"run.device={device}", f"run.output_dir={tmp}/share_{arch}", "run.progress=false"]
    if arch == "mesm":  # FW-MESM trains from the training queries' token counts
        root = default_demo_root()
        make_demo_corpus(root)
        counts, n = count_tokens(read_queries(os.path.join(root, "annotations", "train.jsonl")),
                                 "whitespace")
        path = write_counts(counts, n, "whitespace", os.path.join(tmp, "demo_counts.json"))
        options.append(f"model.vocab_counts={path}")
    cfg, task, datasets, model, runner_cls = build(
        parse_args(["--cfg-path", project, "--options", *options], "bench"))
    runner = runner_cls(cfg=cfg, task=task, model=model, datasets=datasets, job_id="bench")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    per_epoch = []
    for epoch in range(epochs):
        wait = total = 0.0
        steps = 0
        it = iter(runner.train_loader(epoch))
        while True:
            t0 = time.perf_counter()
            try:
                samples = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            loss, _ = task.train_step(model, samples)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            wait += t1 - t0
            total += time.perf_counter() - t0
            steps += 1
        per_epoch.append((wait, total, steps))
    first, later = per_epoch[0], per_epoch[1:]
    run = cfg.run_cfg
    out = {"model": arch, "project": DEMO_PROJECTS[arch], "epochs": epochs,
           "steps_per_epoch": first[2], "batch_size": int(run.get("batch_size_train", 32)),
           "num_workers": int(run.get("num_workers", 0)),
           "share_first_epoch": first[0] / first[1]}
    if later:
        out["share_later_epochs"] = sum(e[0] for e in later) / sum(e[1] for e in later)
    n_steps = sum(e[2] for e in per_epoch)
    out["share_all"] = sum(e[0] for e in per_epoch) / sum(e[1] for e in per_epoch)
    out["step_ms"] = 1000.0 * sum(e[1] for e in per_epoch) / n_steps
    out["wait_ms"] = 1000.0 * sum(e[0] for e in per_epoch) / n_steps
    return out


# --------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-src", default=None, help="local checkout of wjun0830/QD-DETR")
    ap.add_argument("--official-mesm-src", default=None, help="local checkout of lntzm/MESM")
    ap.add_argument("--models", default="qd_detr,mesm", help="comma list of qd_detr, mesm")
    ap.add_argument("--clips", type=int, default=75, help="clips per video (75)")
    ap.add_argument("--train-batch", type=int, default=32, help="training batch size (32)")
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps (3, after 1 warm-up)")
    ap.add_argument("--topk", type=int, default=100, help="videos per query in the batched case (100)")
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats at batch 1 (15)")
    ap.add_argument("--repeats-topk", type=int, default=3, help="timed repeats of the top-K batch (3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="wall: elapsed seconds (default); cpu: this process's CPU seconds "
                         "(steadier on a host shared with other jobs; use with --threads 1)")
    ap.add_argument("--our-model", nargs="+", default=[], metavar="KEY=VALUE",
                    help="set these entries of our models' config (YAML values), e.g. "
                         "linear_kernel=torch dropout_kernel=torch: the official code's kernels")
    ap.add_argument("--data-share", type=int, default=0, metavar="EPOCHS",
                    help="also train the demo projects for EPOCHS epochs (>= 2) and report the "
                         "share of step time spent waiting for data")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    bad = [kv for kv in args.our_model if "=" not in kv]
    if bad:
        ap.error(f"--our-model takes KEY=VALUE, got {bad}")
    our_model = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.our_model)}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    archs = [m.strip() for m in args.models.split(",") if m.strip()]
    for arch in archs:
        if arch not in ("qd_detr", "mesm"):
            raise SystemExit(f"unknown model '{arch}' (qd_detr, mesm)")
    import lavis_c2f.models.grounder  # noqa: F401  (registers the models)
    from lavis_c2f.models.grounder.vocab import write_counts

    tmp = tempfile.mkdtemp(prefix="bench_grounder_")
    counts = Counter({w: 10 + i for i, w in enumerate(WORDS[:-3])})  # 3 words stay unknown
    counts_path = write_counts(counts, 5000, "whitespace", os.path.join(tmp, "counts.json"))
    vocab = {w: i for i, (w, _) in enumerate(counts.most_common())}

    train_s = synthetic_samples(args.train_batch, args.clips, seed=1)
    b1_s = synthetic_samples(1, args.clips, seed=2)
    bk_s = synthetic_samples(args.topk, args.clips, seed=3, same_query=True)
    official_src = {"qd_detr": args.official_src, "mesm": args.official_mesm_src}
    shims: List[str] = []
    t_start = time.perf_counter()
    train_jobs: Dict[Tuple[str, str], Callable[[], Any]] = {}
    b1_jobs: Dict[Tuple[str, str], Callable[[], Any]] = {}
    bk_jobs: Dict[Tuple[str, str], Callable[[], Any]] = {}
    for arch in archs:
        official = None
        if official_src[arch]:
            official = (OfficialQDDETR if arch == "qd_detr" else OfficialMESM)(
                official_src[arch], device, shims)
        ours = build_ours(arch, device, counts_path,
                          None if official is None or arch == "qd_detr" else official.num_word_classes,
                          our_model)
        sides = [("ours", True)] + ([("ours", False)] if official is None else [])
        for side, neg in sides:
            key = (arch, side if official is not None else ("ours" if neg else "ours-no-neg"))
            train_jobs[key] = our_train_step(ours, our_batch(train_s), neg)
            b1_jobs[key] = our_infer(ours, our_batch(b1_s))
            bk_jobs[key] = our_infer(ours, our_batch(bk_s))
        if official is not None:
            args_b = (vocab,) if arch == "mesm" else ()
            train_jobs[(arch, "official")] = official.train_step(official.batch(train_s, *args_b))
            b1_jobs[(arch, "official")] = official.infer(official.batch(b1_s, *args_b))
            bk_jobs[(arch, "official")] = official.infer(official.batch(bk_s, *args_b))
    load_before = _load()
    train_t = interleaved_best(train_jobs, args.train_steps, clock=args.clock)
    print(f"  training timed ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    b1_t = interleaved_best(b1_jobs, args.repeats, clock=args.clock)
    bk_t = interleaved_best(bk_jobs, args.repeats_topk, clock=args.clock)
    print(f"  inference timed ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    load_after = _load()

    measured = {}
    for key in train_jobs:
        measured[key] = {"train_samples_per_s": args.train_batch / train_t[key],
                         "infer_ms_per_pair_b1": 1000.0 * b1_t[key],
                         f"infer_ms_per_pair_b{args.topk}": 1000.0 * bk_t[key] / args.topk}
    print(f"grounder benchmark: device={device.type} threads={torch.get_num_threads()} "
          f"clock={args.clock} clips={args.clips} train_batch={args.train_batch} top-K batch={args.topk}; "
          f"{load_before} (before), {load_after} (after); best of "
          f"{args.train_steps}/{args.repeats}/{args.repeats_topk} round-robin runs")
    kernels = {k: ours.config.get(k) for k in ("linear_kernel", "dropout_kernel")}
    print(f"ours: {kernels}" + (f", config set: {our_model}" if our_model else ""))
    cols = ["model", "side", "train samples/s", "infer ms/pair B=1", f"infer ms/pair B={args.topk}"]
    metric_keys = ["train_samples_per_s", "infer_ms_per_pair_b1", f"infer_ms_per_pair_b{args.topk}"]
    rows: List[Dict[str, Any]] = []
    table = [cols]
    for arch in archs:
        base_key = (arch, "official") if (arch, "official") in measured else (arch, "ours")
        for key in [k for k in measured if k[0] == arch]:
            m = measured[key]
            b = measured[base_key]
            table.append([arch, key[1]] + [f"{m[k]:9.2f} ({m[k] / b[k]:.2f}x)" for k in metric_keys])
        if (arch, "official") in measured:
            o, u = measured[(arch, "official")], measured[(arch, "ours")]
            rows.append({"model": arch,
                         "train_ratio": u["train_samples_per_s"] / o["train_samples_per_s"],
                         "infer_ratio_b1": u["infer_ms_per_pair_b1"] / o["infer_ms_per_pair_b1"],
                         f"infer_ratio_b{args.topk}": (u[f"infer_ms_per_pair_b{args.topk}"]
                                                       / o[f"infer_ms_per_pair_b{args.topk}"]),
                         "ours": u, "official": o})
    print("(ratios: x the official code's value in the same run; higher is better for "
          "samples/s, lower for ms)" if rows else "(ratios: x ours with the negative pass)")
    print(_table(table))
    for r in rows:
        print(f"{r['model']}: train {r['train_ratio']:.2f}x official samples/s (target >= 1.5), "
              f"inference {r['infer_ratio_b1']:.2f}x (B=1) and "
              f"{r[f'infer_ratio_b{args.topk}']:.2f}x (B={args.topk}) official time (target <= 0.35)")
    shares = []
    if args.data_share:
        for arch in archs:
            shares.append(data_wait_share(arch, max(2, args.data_share), tmp, device.type))
        print("\ndata wait (share of training step time spent waiting for the next batch, demo "
              "corpus, our DataLoader as the project configures it):")
        for r in shares:
            print(f"  {r['model']} ({r['project']}, batch {r['batch_size']}, {r['num_workers']} "
                  f"workers, {r['step_ms']:.0f} ms/step of which {r['wait_ms']:.1f} ms waiting): "
                  f"first epoch (feature files read) "
                  f"{100 * r['share_first_epoch']:.1f}%, later epochs "
                  f"{100 * r['share_later_epochs']:.1f}%, all {100 * r['share_all']:.1f}%")
    if shims:
        print("process-local shims for the official code (no file edited):")
        for s in shims:
            print(f"  - {SHIMS[s]}")
    if args.json:
        from lavis_c2f.common.io import write_json

        write_json({"settings": vars(args), "device": device.type,
                    "threads": torch.get_num_threads(), "load": [load_before, load_after],
                    "shims": [SHIMS[s] for s in shims], "rows": rows, "data_share": shares,
                    "measured": [{"model": k[0], "side": k[1], **v} for k, v in measured.items()]},
                   args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
