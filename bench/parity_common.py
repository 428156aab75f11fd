"""What both sides of the train-parity bench share (``bench/train_parity.py``: QD-DETR and the CLI;
``bench/parity_mesm.py``: MESM): the corpus layout, the recipe base, the step-check comparisons
and printers, the official dropout-mask replay, and the training runs (jobs, our child process,
the table). Both import this module; it imports neither (docs/parity.md).

Our side of one training run is a child process of this file:

    python bench/parity_common.py _ours-train PROJECT.yaml EVAL_BSZ OUT.json [OFFICIAL_EVAL_JSON]
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

TOL = 1e-5

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- data layouts


@dataclass
class Corpus:
    """A Moment-DETR-layout folder: annotation files and ``.npz`` feature folders (absolute paths)."""

    root: str
    layout: str                    # "demo" | "qvh"
    annotations: Dict[str, str]    # split -> jsonl
    video_dirs: List[str]          # concatenated in order ({vid}.npz['features'])
    text_dir: str                  # qid{qid}.npz['last_hidden_state']

    def widths(self) -> Tuple[int, int]:
        """(video feature width without TEF, text feature width) read from the first files."""
        with open(self.annotations["train"]) as f:
            row = json.loads(f.readline())
        v = sum(int(np.load(os.path.join(d, f"{row['vid']}.npz"))["features"].shape[1])
                for d in self.video_dirs)
        t = int(np.load(os.path.join(self.text_dir, f"qid{row['qid']}.npz"))["last_hidden_state"].shape[1])
        return v, t


def detect_corpus(root: str) -> Corpus:
    """The layout of ``root``: a demo corpus (``corpus.json``) or a QVHighlights folder."""
    root = os.path.abspath(root)
    if os.path.isfile(os.path.join(root, "corpus.json")):
        ann = {s: os.path.join(root, "annotations", f"{s}.jsonl") for s in SPLITS}
        corpus = Corpus(root, "demo", ann, [os.path.join(root, "clip_features")],
                        os.path.join(root, "clip_text_features"))
    elif os.path.isfile(os.path.join(root, "highlight_train_release.jsonl")):
        ann = {s: os.path.join(root, f"highlight_{s}_release.jsonl") for s in SPLITS}
        streams = [os.path.join(root, "features", f"{s}_features") for s in ("slowfast", "clip")]
        corpus = Corpus(root, "qvh", ann, [d for d in streams if os.path.isdir(d)],
                        os.path.join(root, "features", "clip_text_features"))
    else:
        raise SystemExit(f"--corpus {root}: neither a demo corpus (corpus.json) nor a QVHighlights-layout "
                         "folder (highlight_train_release.jsonl)")
    missing = [p for p in [corpus.annotations["train"], corpus.text_dir] + corpus.video_dirs
               if not os.path.exists(p)]
    if missing or not corpus.video_dirs:
        raise SystemExit(f"--corpus {root}: missing {missing or 'video feature folders'}")
    corpus.annotations = {s: p for s, p in corpus.annotations.items() if os.path.isfile(p)}
    return corpus


# --------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    """One training recipe, given to both codes (official option names in comments).

    ``hidden_dim`` must be 256: the official decoder's anchor sine embedding is hard-wired to
    128 channels per coordinate (``gen_sineembed_for_position``). The defaults are the official
    defaults except a smaller FFN and encoder, a short schedule with more, smaller batches, less
    input dropout and a heavier saliency loss (as our demo projects), so that a CPU budget of
    15 epochs learns something on the demo corpus.
    """

    hidden_dim: int = 256         # --hidden_dim
    nheads: int = 8               # --nheads
    dim_feedforward: int = 256    # --dim_feedforward (official 1024)
    enc_layers: int = 1           # --enc_layers (official 2; also the T2V layers)
    dec_layers: int = 2           # --dec_layers
    num_queries: int = 10         # --num_queries
    dropout: float = 0.1          # --dropout
    input_dropout: float = 0.1    # --input_dropout (official 0.5)
    lw_saliency: float = 4.0      # --lw_saliency (official 1)
    lr: float = 5e-4              # --lr (official 1e-4 over 200 epochs)
    wd: float = 1e-4              # --wd
    lr_drop: int = 12             # --lr_drop (StepLR step size; ours run.lr_drop)
    grad_clip: float = 0.1        # --grad_clip
    bsz: int = 8                  # --bsz (official 32; more steps in a short schedule)
    eval_bsz: int = 100           # --eval_bsz
    epochs: int = 15              # --n_epoch (validation every 5 epochs in the official code)
    max_q_l: int = 32
    max_v_l: int = 75
    clip_length: int = 2
    max_windows: int = 5

    def check(self) -> None:
        if self.hidden_dim != 256:
            raise SystemExit("--hidden-dim: the official QD-DETR decoder only works with 256")
        if self.epochs % 5:
            raise SystemExit("--epochs must be a multiple of 5 (the official code validates every 5 epochs)")


def our_run_config(r: Recipe, seed: int, output_dir: str) -> Dict[str, Any]:
    """The ``run`` node of our runs: the recipe's schedule, the official conventions (weight decay
    on every parameter, last partial batch kept), validation every 5 epochs."""
    return {"task": "c2f_moment_retrieval", "runner": "c2f_runner", "eval_protocol": "qvh",
            "agg_metric": "MR-full-mAP", "device": "cpu", "seed": seed, "output_dir": output_dir,
            "max_epoch": r.epochs, "init_lr": r.lr, "lr_sched": "c2f_step_lr", "lr_drop": r.lr_drop,
            "lr_gamma": 0.1, "weight_decay": r.wd, "weight_decay_scope": "all", "drop_last": False,
            "grad_clip": r.grad_clip, "batch_size_train": r.bsz, "batch_size_eval": r.eval_bsz,
            "num_workers": 0, "train_splits": ["train"], "valid_splits": ["val"], "val_interval": 5,
            "test_splits": ["test"], "progress": False}


# --------------------------------------------------------------------------- comparisons


def rel_diff(ours: float, official: float) -> float:
    """``|ours - official| / max(|official|, 1e-6)``."""
    return abs(float(ours) - float(official)) / max(abs(float(official)), 1e-6)


def grad_differences(ours: Dict[str, Optional[torch.Tensor]], official: Dict[str, Optional[torch.Tensor]],
                     floor: float = 1e-4) -> Tuple[float, List[Tuple[str, float, float, float]]]:
    """Per parameter tensor ``max |ours - official| / max(max |official|, floor * G)``, where G is
    the largest official gradient entry of the model (the floor keeps float32 noise in gradients
    that vanish analytically, e.g. a key bias under softmax, from counting as a difference).

    A gradient present on one side only counts as inf unless it is all zeros. Returns the
    largest value and ``(name, value, max |diff|, max |official|)`` rows, largest first.
    """
    scales = [float(g.abs().max()) for g in official.values() if g is not None and g.numel()]
    big = max(scales) if scales else 0.0
    rows = []
    for name, a in ours.items():
        b = official.get(name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            present = a if a is not None else b
            d = 0.0 if float(present.abs().max()) == 0.0 else math.inf
            rows.append((name, d, math.inf, 0.0))
            continue
        diff, scale = float((a - b).abs().max()), float(b.abs().max())
        rows.append((name, diff / max(scale, floor * big, 1e-12), diff, scale))
    rows.sort(key=lambda r: -r[1])
    return (rows[0][1] if rows else 0.0), rows


def draw_support(draw: Callable[[int], Sequence[Any]], n_draws: int) -> Dict[Any, int]:
    """How often each value came out of ``draw(k)`` for k = 0..n_draws-1 (a draw may return
    several values: each counts)."""
    counts: Dict[Any, int] = {}
    for k in range(n_draws):
        for v in draw(k):
            counts[v] = counts.get(v, 0) + 1
    return counts


def same_distribution(ours: Dict[Any, int], official: Dict[Any, int]) -> Tuple[bool, str]:
    """Both sides draw uniformly from the same set: equal supports (the frequencies are reported,
    with their largest deviation from uniform on each side)."""
    if set(ours) != set(official):
        only_o = sorted(set(official) - set(ours), key=str)
        only_u = sorted(set(ours) - set(official), key=str)
        return False, f"supports differ: official only {only_o[:6]}, ours only {only_u[:6]}"

    def spread(c: Dict[Any, int]) -> float:
        n = sum(c.values())
        return max(abs(v / n - 1 / len(c)) for v in c.values()) * len(c) if c else 0.0

    return True, (f"{len(ours)} values, max |freq/uniform - 1|: official {spread(official):.2f}, "
                  f"ours {spread(ours):.2f}")


class DropoutReplay:
    """Records the official dropout masks and replays them in our model.

    Official sites: ``nn.Dropout`` modules (input projections: batch-first (B, L, D);
    inside ``transformer``: sequence-first (L, B, D)) and the attention-weight dropout of
    ``qd_detr/attention.py`` and of torch's ``nn.MultiheadAttention`` ((B*H, Lq, Lk)). Ours are batch-first ((B, L, D), attention
    (B, H, Lq, Lk)). :meth:`record` installs a dropout that draws ``rand >= p`` and keeps the
    mask with the layout of its site; :meth:`replay` installs one that takes the next mask,
    puts it in our layout and checks its shape.

    ``crop_padding``: the official tensors may be longer than ours along a sequence (MESM pads
    every text to ``max_words_l``, ours to the longest text of the batch); the mask is then cut
    to our extent (the positions cut are padding, which no valid output reads).
    """

    def __init__(self, crop_padding: bool = False) -> None:
        self.masks: List[Tuple[str, torch.Tensor, float]] = []
        self.used = 0
        self.crop_padding = crop_padding
        self._undo: List[Callable[[], None]] = []

    @staticmethod
    def apply(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
        return x * mask.to(x.dtype) / (1.0 - p)

    @staticmethod
    def to_ours(layout: str, mask: torch.Tensor, shape: torch.Size, crop_padding: bool = False) -> torch.Tensor:
        """An official mask in our layout (``layout``: batch_first | seq_first | heads), cut to
        ``shape`` when ``crop_padding`` (class doc)."""
        if layout == "seq_first" and mask.dim() == 3:  # (L, B, D); a (B, D) vector has no sequence axis
            mask = mask.transpose(0, 1)
        elif layout == "heads":
            if crop_padding and len(shape) == 4 and mask.dim() == 3 and mask.shape[0] == shape[0] * shape[1]:
                mask = mask.reshape(shape[0], shape[1], *mask.shape[1:])
            else:
                mask = mask.reshape(shape)
        if (crop_padding and mask.dim() == len(shape) and tuple(mask.shape) != tuple(shape)
                and all(m >= s for m, s in zip(mask.shape, shape))):
            mask = mask[tuple(slice(0, s) for s in shape)]
        if tuple(mask.shape) != tuple(shape):
            raise RuntimeError(f"dropout site mismatch: official mask {tuple(mask.shape)} ({layout}) "
                               f"for our tensor {tuple(shape)}")
        return mask

    def _patch(self, obj: Any, name: str, fn: Callable) -> None:
        old = getattr(obj, name)
        setattr(obj, name, fn)
        self._undo.append(lambda: setattr(obj, name, old))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def record(self, official_model: torch.nn.Module, attention_module: Any,
               seq_first: Sequence[str] = ("transformer",)) -> None:
        """Record the masks of ``official_model``; ``seq_first``: its submodules whose tensors
        are sequence-first (QD-DETR: the transformer; MESM also its T2V-style encoders)."""
        import torch.nn.functional as F

        in_transformer = {id(m) for name in seq_first for m in getattr(official_model, name).modules()}
        for module in official_model.modules():
            if isinstance(module, torch.nn.Dropout):
                layout = "seq_first" if id(module) in in_transformer else "batch_first"
                self._patch(module, "forward", self._recorder(layout, lambda m=module: m.p, lambda m=module: m.training))
        original = F.dropout

        def attention_dropout(x, p=0.5, training=True, inplace=False):
            if not training or p == 0:
                return original(x, p, training, inplace)
            return self._draw("heads", x, p)

        self._patch(attention_module, "dropout", attention_dropout)  # qd_detr/attention.py
        self._patch(F, "dropout", attention_dropout)  # inside torch's nn.MultiheadAttention

    def _recorder(self, layout: str, p_of: Callable[[], float], training_of: Callable[[], bool]):
        def forward(x):
            p = p_of()
            if not training_of() or p == 0:
                return x
            return self._draw(layout, x, p)
        return forward

    def _draw(self, layout: str, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = torch.rand(x.shape) >= p
        self.masks.append((layout, mask, p))
        return self.apply(x, mask, p)

    def replay(self) -> None:
        import torch.nn.functional as F

        original = F.dropout

        def dropout(x, p=0.5, training=True, inplace=False):
            if not training or p == 0:
                return original(x, p, training, inplace)
            if self.used >= len(self.masks):
                raise RuntimeError("our model draws more dropout masks than the official one")
            layout, mask, p_off = self.masks[self.used]
            self.used += 1
            if abs(p_off - p) > 1e-12:
                raise RuntimeError(f"dropout rate mismatch at site {self.used}: official {p_off}, ours {p}")
            return self.apply(x, self.to_ours(layout, mask, x.shape, self.crop_padding), p)

        self._patch(F, "dropout", dropout)


# --------------------------------------------------------------------------- step-check printers


def _fmt(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _row(label: str, official: Any, ours: Any, ok: bool) -> str:
    return f"  {label:<22} official {_fmt(official):<34} ours {_fmt(ours):<34} {'' if ok else '<< DIFFERS'}"


def compare_span_labels(official: torch.Tensor, ours: torch.Tensor, n_windows: int, max_windows: int
                        ) -> Tuple[bool, bool]:
    """Print one item's span labels side by side; returns (ok, random): with more than
    ``max_windows`` windows both codes keep a random subset (only the shapes must agree here;
    :func:`compare_random_labels` compares the subsets), else equal to 1e-6."""
    if n_windows > max_windows:
        ok = official.shape == ours.shape
        print(_row("span labels (random)", f"{tuple(official.shape)} subset", f"{tuple(ours.shape)} subset", ok))
        return ok, True
    ok = official.shape == ours.shape and float((official - ours).abs().max()) <= 1e-6
    print(_row("span labels (cx, w)", official, ours, ok))
    return ok, False


def compare_item_labels(tag: str, official_spans: torch.Tensor, our_spans: torch.Tensor, n_windows: int,
                        max_windows: int, hard: Sequence[Tuple[str, int, int]]) -> Tuple[List[str], bool]:
    """One item's span labels (:func:`compare_span_labels`) and hard saliency labels (``(name,
    official, ours)``, exact), printed; returns (what differs, prefixed with ``tag``; whether the
    span labels are a random subset)."""
    ok, is_random = compare_span_labels(official_spans, our_spans, n_windows, max_windows)
    failures = [] if ok else [f"{tag} span labels"]
    for name, a, b in hard:
        print(_row(name, a, b, a == b))
        if a != b:
            failures.append(f"{tag} {name}")
    return failures, is_random

Draw = Callable[[int], Sequence[Any]]


def compare_random_labels(off_draw: Draw, our_draw: Draw, n_draws: int,
                          this_batch: Optional[Dict[str, Tuple[int, int]]] = None,
                          off_windows: Optional[Draw] = None, our_windows: Optional[Draw] = None) -> List[str]:
    """One item's random labels by distribution (:func:`same_distribution` over ``n_draws`` seeded
    draws per side): easy positive/negative (``*_draw(k)`` returns ``[("easy positive", clip),
    ("easy negative", clip)]``) and, when given, the kept windows. Prints a row each; returns the
    names that differ."""
    off_counts, our_counts = draw_support(off_draw, n_draws), draw_support(our_draw, n_draws)
    failures = []
    for name in ("easy positive", "easy negative"):
        ok, why = same_distribution({v: c for (kind, v), c in our_counts.items() if kind == name},
                                    {v: c for (kind, v), c in off_counts.items() if kind == name})
        now = "" if this_batch is None else f"this batch: official {this_batch[name][0]}, ours {this_batch[name][1]}; "
        print(f"  {name:<22} {now}{n_draws} draws each: {'same distribution' if ok else 'DIFFERENT'} ({why})")
        if not ok:
            failures.append(f"{name} distribution")
    if off_windows is not None and our_windows is not None:
        ok, why = same_distribution(draw_support(our_windows, n_draws), draw_support(off_windows, n_draws))
        print(f"  {'kept windows':<22} {n_draws} draws each: {'same distribution' if ok else 'DIFFERENT'} ({why})")
        if not ok:
            failures.append("window subset distribution")
    return failures


def print_losses(keys: Sequence[str], official: Dict[str, torch.Tensor], official_total: torch.Tensor,
                 ours: Dict[str, torch.Tensor]) -> float:
    """Print the loss terms ``keys`` and the weighted total (ours: ``ours["loss"]``) side by side;
    returns the largest relative difference."""
    worst = 0.0
    for k in list(keys) + ["weighted total"]:
        a = float((official_total if k == "weighted total" else official[k]).detach())
        b = float((ours["loss"] if k == "weighted total" else ours[k]).detach())
        d = rel_diff(b, a)
        worst = max(worst, d)
        print(f"  {k:<22} official {a:>12.6f}   ours {b:>12.6f}   rel diff {d:.2e}{'' if d <= TOL else '  << DIFFERS'}")
    return worst


def print_gradients(ours: Dict[str, Optional[torch.Tensor]], official: Dict[str, Optional[torch.Tensor]],
                    note: str) -> float:
    """Print the largest per-tensor gradient differences (:func:`grad_differences`); returns the
    largest."""
    worst, table = grad_differences(ours, official)
    print(f"  gradients: {sum(g is not None for g in ours.values())} parameter tensors{note}; largest differences "
          "(max |ours - official| / max(max |official|, 1e-4 x the largest official gradient entry)):")
    for name, d, diff, scale in table[:5]:
        print(f"    {name:<52} rel {d:.2e}  (max |diff| {diff:.2e}, max |official| {scale:.2e})")
    return worst


# --------------------------------------------------------------------------- train parity


def train_ours(config_path: str, eval_bsz: int, out_json: str, official_eval: Optional[Dict[str, Any]] = None
               ) -> None:
    """Our side of one training run (run in a child process): ``train.py`` as a user runs it, with
    the training epochs timed, then the best checkpoint also evaluated with the official
    evaluation batching (``official_eval``: model config entries set for that evaluation; default
    the official T2V mask)."""
    from lavis_c2f.launch import build, parse_args

    torch.set_num_threads(1)
    cfg, task, datasets, model, runner_cls = build(parse_args(["--cfg-path", config_path], "train parity"))
    runner = runner_cls(cfg=cfg, task=task, model=model, datasets=datasets, job_id="run")
    seconds = [0.0]
    original = task.train_epoch

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        seconds[0] += time.perf_counter() - t0
        return out

    task.train_epoch = timed
    summary = runner.train()
    correct = summary["test"]["test"]
    runner.unwrapped_model.config.update(official_eval or {"eval_t2v_mask_mode": "official"})
    runner.run_cfg.batch_size_eval = eval_bsz
    batched = runner.evaluate(cur_epoch="best")["test"]
    keep = lambda m: {k: float(v) for k, v in m.items() if k.startswith(("MR-", "HL-")) and v is not None}  # noqa: E731
    train_set = datasets["c2f_qvh"]["train"] if "c2f_qvh" in datasets else None
    n_train = len(getattr(train_set, "records", train_set)) if train_set is not None else None  # queries
    epochs = int(cfg.run_cfg.max_epoch)
    with open(out_json, "w") as f:
        json.dump({"train_seconds": seconds[0], "train_samples": (n_train or 0) * epochs, "epochs": epochs,
                   "best_epoch": summary["best_epoch"], "test": {"1": keep(correct), str(eval_bsz): keep(batched)}},
                  f, indent=1)


@dataclass
class Job:
    code: str       # "official QD-DETR" | "ours QD-DETR"
    variant: str
    seed: int
    cmd: List[str]
    env: Dict[str, str]
    out_json: str
    log: str
    result: Optional[Dict[str, Any]] = None
    seconds: float = 0.0


def run_jobs(jobs: List[Job], parallel: int) -> None:
    """Run the jobs, ``parallel`` at a time; each job's output goes to its log file."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            log = open(job.log, "w")
            running.append((job, subprocess.Popen(job.cmd, env=job.env, stdout=log, stderr=subprocess.STDOUT,
                                                  cwd=ROOT), log, time.time()))
            print(f"  started {job.code} / {job.variant} / seed {job.seed}", flush=True)
        time.sleep(2)
        for item in list(running):
            job, proc, log, t0 = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            job.seconds = time.time() - t0
            if proc.returncode == 0 and os.path.isfile(job.out_json):
                with open(job.out_json) as f:
                    job.result = json.load(f)
                print(f"  done {job.code} / {job.variant} / seed {job.seed} in {job.seconds:.0f} s", flush=True)
            else:
                print(f"  FAILED {job.code} / {job.variant} / seed {job.seed} (exit {proc.returncode}); "
                      f"log: {job.log}", flush=True)

METRICS = (("MR-full-R1@0.5", "R1@0.5"), ("MR-full-R1@0.7", "R1@0.7"), ("MR-full-mAP", "mAP"))


def mean_sd(values: Sequence[float]) -> str:
    """``mean ± sample standard deviation`` (``mean`` alone for one value)."""
    if not values:
        return "-"
    m = float(np.mean(values))
    return f"{m:.2f} ± {float(np.std(values, ddof=1)):.2f}" if len(values) > 1 else f"{m:.2f}"


def parity_table(jobs: List[Job], eval_bsz: int) -> Tuple[str, List[Dict[str, Any]]]:
    """The markdown table of the module doc and its rows as dicts (means over seeds)."""
    groups: Dict[Tuple[str, str], List[Job]] = {}
    for job in jobs:
        groups.setdefault((job.code, job.variant), []).append(job)
    head = ("| code | recipe | seeds | " + " | ".join(f"{s} (B-indep.)" for _, s in METRICS) + " | "
            + " | ".join(f"{s} (official batching)" for _, s in METRICS) + " | train samples/s |")
    lines = [head, "|" + "---|" * (3 + 2 * len(METRICS) + 1)]
    rows = []
    for (code, variant), group in groups.items():
        done = [j.result for j in group if j.result]
        cells = []
        row: Dict[str, Any] = {"code": code, "variant": variant, "seeds": [j.seed for j in group if j.result]}
        for bsz in ("1", str(eval_bsz)):
            for key, short in METRICS:
                vals = [r["test"][bsz][key] for r in done if bsz in r["test"]]
                cells.append(mean_sd(vals))
                row[f"{short}@{'indep' if bsz == '1' else 'batched'}"] = vals
        speeds = [r["train_samples"] / r["train_seconds"] for r in done if r["train_seconds"] > 0]
        row["samples_per_s"] = speeds
        lines.append(f"| {code} | {variant} | {len(done)}/{len(group)} | " + " | ".join(cells)
                     + f" | {mean_sd(speeds)} |")
        rows.append(row)
    return "\n".join(lines), rows


def difference_of_means(ours: Sequence[float], official: Sequence[float]) -> Tuple[float, float]:
    """``(mean(ours) - mean(official), SE)`` with ``SE = sqrt(s_o^2 / n_o + s_f^2 / n_f)`` (sample
    variances; Welch's standard error of a difference of two independent means)."""
    a, b = np.asarray(ours, float), np.asarray(official, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a standard error needs at least two runs per side")
    return float(a.mean() - b.mean()), float(math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))


def seed_comparison(ours: Dict[str, Any], official: Dict[str, Any], column: str = "batched") -> str:
    """Ours against the official code, per metric (rows of :func:`parity_table`, ``column``
    ``batched`` or ``indep``): the difference of means ± its standard error
    (:func:`difference_of_means`), ``|d| / SE`` and a verdict (``inside the noise`` when
    ``|d| < 2 SE``), then the per-seed differences ``ours - official`` over the seeds both ran, with
    their mean ± ``sd / sqrt(n)``. The codes draw from different random streams, so the same seed
    does not give the same data order: the pairing is by seed number only."""
    both = sorted(set(ours["seeds"]) & set(official["seeds"]))
    lines = [f"ours - official ({column}; {len(ours['seeds'])} vs {len(official['seeds'])} seeds; "
             f"paired over seeds {both}):"]
    for _, short in METRICS:
        key = f"{short}@{column}"
        a, b = ours.get(key) or [], official.get(key) or []
        if len(a) < 2 or len(b) < 2:
            lines.append(f"  {short:<7} too few runs for a standard error")
            continue
        d, se = difference_of_means(a, b)
        verdict = "inside the noise" if abs(d) < 2 * se else ("ours higher" if d > 0 else "ours LOWER")
        per_seed = {s: a[ours["seeds"].index(s)] - b[official["seeds"].index(s)] for s in both}
        paired = ""
        if len(per_seed) >= 2:
            v = np.asarray(list(per_seed.values()))
            paired = (f"; per seed {', '.join(f'{s}: {x:+.2f}' for s, x in per_seed.items())} "
                      f"(mean {v.mean():+.2f} ± {v.std(ddof=1) / math.sqrt(len(v)):.2f}, "
                      f"ours >= official on {int((v >= 0).sum())}/{len(v)})")
        lines.append(f"  {short:<7} {d:+.2f} ± {se:.2f} (|d|/SE {abs(d) / se if se else math.inf:.1f}: "
                     f"{verdict}){paired}")
    return "\n".join(lines)


def job_envs() -> Tuple[Dict[str, str], Dict[str, str]]:
    """Environments of the training processes: ours (one thread, this checkout first on the path)
    and the official code's (one thread, NumPy's scalar sorts: :func:`lavis_c2f.ops.argsort.scalar_sort_env`)."""
    from lavis_c2f.ops.argsort import scalar_sort_env

    base = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
                TOKENIZERS_PARALLELISM="false")
    return dict(base, PYTHONPATH=ROOT), scalar_sort_env(base)


def job_paths(work: str, name: str) -> Tuple[str, str, str]:
    """(folder, result JSON, log) of one run under ``work`` (the folder is created)."""
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    return d, os.path.join(d, "result.json"), os.path.join(d, "log.txt")


def ours_train_cmd(config_path: str, eval_bsz: int, out_json: str,
                   official_eval: Optional[Dict[str, Any]] = None) -> List[str]:
    """The command line of :func:`train_ours` as a child process (this file's ``_ours-train``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "_ours-train", config_path, str(eval_bsz), out_json]
    return cmd + ([json.dumps(official_eval)] if official_eval is not None else [])


def official_job(work: str, name: str, label: str, variant: str, seed: int, official_python: str,
                 command: Callable[[str, str], List[str]], env: Dict[str, str]) -> Job:
    """A run of the official code in ``work/name`` (:func:`job_paths`): ``official_python
    bench/official_runtime.py`` followed by ``command(folder, result_json)``."""
    d, out, log = job_paths(work, name)
    cmd = [official_python, os.path.join(BENCH, "official_runtime.py"), *command(d, out)]
    return Job(label, variant, seed, cmd, env, out, log)


def ours_job(work: str, name: str, label: str, variant: str, seed: int, project: Callable[[str], Dict[str, Any]],
             eval_bsz: int, env: Dict[str, str], official_eval: Optional[Dict[str, Any]] = None) -> Job:
    """A run of our training in ``work/name``: ``project(folder)`` written there as
    ``project.yaml`` and trained by :func:`ours_train_cmd`."""
    d, out, log = job_paths(work, name)
    cfg_path = os.path.join(d, "project.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(project(d), f)
    return Job(label, variant, seed, ours_train_cmd(cfg_path, eval_bsz, out, official_eval), env, out, log)


if __name__ == "__main__":
    if sys.argv[1:2] != ["_ours-train"] or len(sys.argv) not in (5, 6):
        sys.exit("usage: parity_common.py _ours-train PROJECT.yaml EVAL_BSZ OUT.json [OFFICIAL_EVAL_JSON]")
    train_ours(sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]) if len(sys.argv) > 5 else None)
