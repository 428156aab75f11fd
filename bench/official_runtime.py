"""Running the official QD-DETR code from a user's checkout on a CPU, for bench/train_parity.py.

Imports only the standard library, NumPy and torch at module level, so that it also runs under
a separate interpreter that holds the official code's own dependencies (``--official-python``).
The official code is never imported by the package or the tests; it is put on ``sys.path``
here, from the path the user gives.

Shims (installed by :func:`install_shims` in the bench's own processes; the checkout is not
edited). Each is device placement or a library-version default, never training behaviour:

* ``Tensor.cuda()`` returns the tensor itself when CUDA is unavailable: the official
  ``Transformer.forward`` builds its decoder input with ``torch.zeros(...).cuda()``
  (``qd_detr/transformer.py``); every other placement follows ``--device -1`` (CPU).
* ``torch.load`` defaults to ``weights_only=False``: the official code re-loads its own best
  checkpoint, which pickles its ``argparse.Namespace``; torch >= 2.6 refuses that by default.
* ``torch.utils.tensorboard.SummaryWriter`` becomes a no-op writer when tensorboard is not
  installed (logging only).
* one intra-op thread (``torch.set_num_threads(1)``) so that every side of a comparison gets
  the same CPU budget; likewise ``standalone_eval``'s ``compute_mr_ap`` runs without its pool
  of 8 worker processes (``num_workers=1``, the same numbers).
* ``compute_mr_ap`` / ``compute_mr_r1`` of an empty length range (the demo corpus has no
  moment longer than 30 s, so ``long`` is empty) return NaN instead of raising; the official
  evaluation raises there (``ap_array.mean(0)`` of no query). Other ranges are unaffected.

Not a shim but a condition the bench sets for the official processes: NumPy >= 1.25 sorts
64-bit numbers with x86-simd-sort on AVX-512 CPUs, whose tie order differs from the scalar
introsort of the NumPy the official code pinned (1.17); the bench starts them with
``NPY_DISABLE_CPU_FEATURES`` (:func:`lavis_c2f.ops.argsort.scalar_sort_env`) so that ``np.argsort`` in
``get_saliency_labels_all`` orders tied clips as it did for the authors.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import types
from typing import Any, Callable, Dict, List

import numpy as np
import torch

SHIMS = (
    "Tensor.cuda() is a no-op without CUDA (official Transformer.forward calls .cuda() on its "
    "decoder input; everything else follows --device -1)",
    "torch.load defaults to weights_only=False (the official code re-loads its own checkpoint, "
    "which pickles argparse.Namespace; torch >= 2.6 refuses that by default)",
    "torch.utils.tensorboard.SummaryWriter is a no-op when tensorboard is not installed",
    "torch.set_num_threads(1), --num_workers 0 and compute_mr_ap without its 8-process pool "
    "(same CPU budget as our side)",
    "compute_mr_ap/compute_mr_r1 of an empty length range (no GT moment in it, e.g. 'long' on the "
    "demo corpus) give NaN instead of raising",
)


class _NullWriter:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def install_shims(official_dir: str) -> None:
    """Put the official checkout first on ``sys.path`` and install the shims of the module doc."""
    official_dir = os.path.abspath(official_dir)
    if official_dir not in sys.path:
        sys.path.insert(0, official_dir)
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    original_load = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("weights_only", False)
        return original_load(*args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        stub = types.ModuleType("torch.utils.tensorboard")
        stub.SummaryWriter = _NullWriter  # type: ignore[attr-defined]
        sys.modules["torch.utils.tensorboard"] = stub


MESM_SHIMS = (
    "Tensor.to / Module.to with a CUDA device are no-ops without CUDA (MESM.CLIP_encode_text moves "
    "the text tower and the token ids to 'cuda' whenever they are on the CPU)",
    "the official CLIP text tower runs in float32 (convert_weights is skipped and its dtype is "
    "float32; the official code casts it to fp16, which on a GPU is fast and on a CPU is slow and "
    "rounds the word features at 1e-3, so the two codes could not be compared at 1e-5); our tower "
    "always runs in float32",
    "NLTK_DATA points at the bench's nltk_data folder (the averaged-perceptron tagger data written "
    "from the model our package uses), so nltk.pos_tag in MESM's tokenizer runs offline",
)


def install_mesm_shims(official_dir: str, tagger_dir: str) -> None:
    """:func:`install_shims` plus :data:`MESM_SHIMS` (before the official code is imported)."""
    os.environ["NLTK_DATA"] = os.path.abspath(tagger_dir)
    import nltk  # the official tokenizer's dependency; an nltk imported earlier read NLTK_DATA already

    if os.path.abspath(tagger_dir) not in nltk.data.path:
        nltk.data.path.insert(0, os.path.abspath(tagger_dir))
    install_shims(official_dir)
    if torch.cuda.is_available():
        return

    def is_cuda(args: Any, kwargs: Any) -> bool:
        dev = kwargs.get("device", args[0] if args else None)
        return (isinstance(dev, str) and dev.startswith("cuda")) or (
            isinstance(dev, torch.device) and dev.type == "cuda")

    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def t_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if is_cuda(args, kwargs) else tensor_to(self, *args, **kwargs)

    def m_to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        return self if is_cuda(args, kwargs) else module_to(self, *args, **kwargs)

    torch.Tensor.to = t_to  # type: ignore[method-assign]
    torch.nn.Module.to = m_to  # type: ignore[method-assign]
    import model.text_encoder as text_encoder
    import runner

    text_encoder.CLIPTextEncoder.dtype = property(lambda self: torch.float32)  # type: ignore[assignment]
    runner.convert_weights = lambda model: None


def without_text_encoder(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The official checkpoint's ``model`` entry: every key containing ``text_encoder`` dropped
    (``state_dict_without_module``)."""
    return {k: v for k, v in state.items() if "text_encoder" not in k}


def install_eval_shims() -> None:
    """The evaluation shims of the module doc (after ``install_shims``)."""
    import standalone_eval.eval as official_eval

    compute_ap, compute_r1 = official_eval.compute_mr_ap, official_eval.compute_mr_r1

    def nan_row(with_average: bool) -> Dict[str, float]:
        thds = [str(float(f"{t:.2f}")) for t in np.linspace(0.5, 0.95, 10)]
        return {k: float("nan") for k in thds + (["average"] if with_average else [])}

    def mr_ap(submission, ground_truth, *args: Any, **kwargs: Any):
        if not ground_truth:
            return nan_row(True)
        kwargs["num_workers"] = 1
        return compute_ap(submission, ground_truth, *args, **kwargs)

    def mr_r1(submission, ground_truth, *args: Any, **kwargs: Any):
        return nan_row(False) if not ground_truth else compute_r1(submission, ground_truth, *args, **kwargs)

    official_eval.compute_mr_ap, official_eval.compute_mr_r1 = mr_ap, mr_r1


# --------------------------------------------------------------------------- training


def _brief(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics["brief"].items() if v is not None}  # MESM: None for an empty range


def train_and_test(official_dir: str, argv: List[str], test_path: str, eval_batch_sizes: List[int],
                   out_json: str) -> None:
    """Train with the official ``qd_detr/train.py`` (``argv`` = its command line), then evaluate
    its best checkpoint (selected on ``--eval_path`` every 5 epochs, as the official code does)
    on ``test_path`` with the official ``eval_epoch`` at each evaluation batch size.

    Writes ``{train_seconds, train_samples, epochs, ckpt, test: {bsz: brief metrics}}``.
    """
    install_shims(official_dir)
    os.chdir(official_dir)  # train.py copies qd_detr/*.py by relative path
    install_eval_shims()
    import qd_detr.train as official_train
    from qd_detr.inference import eval_epoch, setup_model
    from qd_detr.start_end_dataset import StartEndDataset

    seconds = [0.0]
    n_batches = [0]
    original_epoch = official_train.train_epoch

    def timed_epoch(model, criterion, train_loader, *args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        original_epoch(model, criterion, train_loader, *args, **kwargs)
        seconds[0] += time.perf_counter() - t0
        n_batches[0] += len(train_loader)

    official_train.train_epoch = timed_epoch
    sys.argv = ["qd_detr/train.py"] + list(argv)
    best_ckpt, _split, _path, _debug, opt = official_train.start_training()
    with open(opt.train_path) as f:
        n_train = sum(1 for line in f if line.strip())

    opt.resume, opt.resume_all = best_ckpt, False
    model, criterion, _, _ = setup_model(opt)
    test_set = StartEndDataset(
        dset_name=opt.dset_name, data_path=test_path, v_feat_dirs=opt.v_feat_dirs,
        q_feat_dir=opt.t_feat_dir, q_feat_type="last_hidden_state", max_q_l=opt.max_q_l,
        max_v_l=opt.max_v_l, ctx_mode=opt.ctx_mode, normalize_v=not opt.no_norm_vfeat,
        normalize_t=not opt.no_norm_tfeat, clip_len=opt.clip_length, max_windows=opt.max_windows,
        load_labels=True, span_loss_type=opt.span_loss_type, txt_drop_ratio=0)
    opt.eval_split_name = "val"  # the official code computes metrics only for a split named val
    results: Dict[str, Any] = {}
    for bsz in eval_batch_sizes:
        opt.eval_bsz = int(bsz)
        with torch.no_grad():
            metrics, _, _, _ = eval_epoch(model, test_set, opt, f"test_bsz{bsz}_preds.jsonl")
        results[str(bsz)] = _brief(metrics)
    epochs = int(opt.n_epoch)
    summary = {"train_seconds": seconds[0], "train_samples": n_train * epochs, "epochs": epochs,
               "train_batches": n_batches[0], "ckpt": best_ckpt, "test": results}
    with open(out_json, "w") as f:
        json.dump(summary, f, indent=1)


def train_and_test_mesm(official_dir: str, tagger_dir: str, argv: List[str], test_ann_path: str,
                        out_json: str) -> None:
    """Train with the official MESM ``train.py`` (``argv`` = its command line, QVHighlights
    options), then evaluate its best checkpoint (``model_val_best.ckpt``, selected on val by
    MR-full-mAP every ``--eval_epoch_interval`` epochs) on ``test_ann_path/highlight_val_release.jsonl``
    with the official ``eval_epoch``, as the official evaluation runs: items grouped by video,
    ``--eval_batch_size`` items per batch, the loader shuffled (MESM's reader keeps labels for a
    split named val only; its evaluation at batch size 1 raises, the negative pass having no other
    video to pair with).

    Writes ``{train_seconds, train_samples, epochs, ckpt, test: {eval_batch_size: brief metrics}}``.
    """
    install_mesm_shims(official_dir, tagger_dir)
    os.chdir(official_dir)  # BaseOptions.parse copies model/*.py by relative path
    import eval as official_eval
    import train as official_train
    from dataset import QVHighlightsDataset, collate_qvh
    from torch.utils.data import DataLoader
    from utils import merge_state_dict_with_module

    compute_ap = official_eval.compute_mr_ap

    def mr_ap(*args: Any, **kwargs: Any) -> Any:
        kwargs["num_workers"] = 1
        return compute_ap(*args, **kwargs)

    official_eval.compute_mr_ap = mr_ap
    seconds = [0.0]
    original_epoch = official_train.train_epoch

    def timed_epoch(*args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        original_epoch(*args, **kwargs)
        seconds[0] += time.perf_counter() - t0

    official_train.train_epoch = timed_epoch
    options = official_train.BaseOptions
    parsed: Dict[str, Any] = {}
    parse = options.parse

    def keep_opt(self: Any) -> Any:
        parsed["opt"] = parse(self)
        return parsed["opt"]

    options.parse = keep_opt
    sys.argv = ["train.py"] + list(argv)
    official_train.train()
    opt = parsed["opt"]
    best = opt.ckpt_filepath.replace(".ckpt", "_val_best.ckpt")
    with open(os.path.join(opt.ann_path, "highlight_train_release.jsonl")) as f:
        n_train = sum(1 for line in f if line.strip())
    ckpt = torch.load(best, map_location="cpu")
    model = official_train.build_model(ckpt["opt"])
    model.load_state_dict(merge_state_dict_with_module(ckpt["model"], model.text_encoder.state_dict(),
                                                       "text_encoder"))
    test_set = QVHighlightsDataset(
        ann_path=test_ann_path, feat_files=opt.feat_files, split="val", use_tef=opt.use_tef, clip_len=opt.clip_len,
        max_words_l=opt.max_words_l, max_video_l=opt.max_video_l, tokenizer_type=opt.tokenizer_type,
        load_vocab_pkl=opt.load_vocab_pkl, bpe_path=opt.bpe_path, vocab=None, normalize_video=opt.normalize_video,
        contra_samples=opt.contra_samples, recfw=False, vocab_size=opt.vocab_size, max_windows=opt.max_windows,
        max_gather_size=opt.max_gather_size)
    loader = DataLoader(test_set, collate_fn=collate_qvh, batch_size=opt.eval_batch_size, num_workers=0,
                        shuffle=True)
    with torch.no_grad():
        metrics, _, _, _ = official_eval.eval_epoch(model, loader, opt, "test_preds.jsonl")
    epochs = int(opt.n_epoch)
    summary = {"train_seconds": seconds[0], "train_samples": n_train * epochs, "epochs": epochs,
               "best_epoch": int(ckpt["epoch"]), "ckpt": best, "test": {str(opt.eval_batch_size): _brief(metrics)}}
    with open(out_json, "w") as f:
        json.dump(summary, f, indent=1)


def main(argv: List[str]) -> int:
    """``python official_runtime.py train OFFICIAL_DIR TEST_JSONL BSZ[,BSZ] OUT_JSON -- ARGV...`` (QD-DETR) or
    ``python official_runtime.py train-mesm OFFICIAL_DIR NLTK_DATA TEST_ANN_DIR OUT_JSON -- ARGV...`` (MESM)"""
    if len(argv) < 6 or argv[0] not in ("train", "train-mesm") or argv[5] != "--":
        print(main.__doc__, file=sys.stderr)
        return 2
    if argv[0] == "train-mesm":
        _, official_dir, tagger_dir, test_dir, out_json, _sep, *rest = argv
        train_and_test_mesm(official_dir, tagger_dir, rest, test_dir, out_json)
        return 0
    _, official_dir, test_path, sizes, out_json, _sep, *rest = argv
    train_and_test(official_dir, rest, test_path, [int(s) for s in sizes.split(",")], out_json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
