"""The MESM side of bench/train_parity.py: the corpus in MESM's layout, the recipe given to both
codes, the step check and the training runs (the CLI is ``train_parity.py --official-mesm DIR``).

**MESM's layout** (:func:`write_mesm_layout`), written from a demo corpus or a QVHighlights-layout
folder (Moment-DETR layout): ``annotations/highlight_{train,val}_release.jsonl`` (QVHighlights
rows; a ``vid`` not of the form ``{youtube_id}_{start}_{end}`` becomes ``{vid}_0_{duration}``,
so MESM's QVHighlights reader groups the queries of one video), ``annotations/
CLIP_tokenized_count.txt`` (``ID COUNT`` per CLIP BPE id of the training queries, most frequent
first: the vocabulary of the word reconstruction, read by both codes), one ``.hdf5`` per video
stream keyed by ``vid`` (CLIP first, then SlowFast: MESM's order), ``eval_test/`` (the test split
as ``highlight_val_release.jsonl``: MESM's reader keeps labels for a split named val only),
``clip_text_encoder.pth`` (a small random CLIP text tower in the official layout, see
:func:`write_text_tower`) and ``nltk_data/`` (nltk's averaged-perceptron tagger data as JSON,
written from the ``textblob-aptagger`` model our package falls back on, so that both codes tag
with the same weights; MESM calls ``nltk.pos_tag``, which finds it through ``NLTK_DATA``).
Our side reads the same annotation and HDF5 files (``c2f_qvh`` with ``group_by: youtube``,
``norm_style``/``label_style: mesm``) and runs the same tower file (``model.text_encoder``).

**Step check** (:func:`step_check_mesm`): the first ``--items`` training items (all queries of one
video each) from the official ``QVHighlightsDataset`` and from ours, item by item: video inputs,
token ids, POS masking weights, unknown flags, word labels, span labels, hard saliency labels,
all-clip scores, ``clip_mask`` (exact); the easy saliency positive/negative and window subsets
are random in both codes and compared by distribution (``draws`` seeded draws per query). The
initial spread of every large weight tensor of a fresh official model and of ours is compared
(:func:`init_differences`). Then one training step from the same weights (the official initialisation copied into ours), our
batch with the official draws of the random labels, the official negative pairing
(``sample_outclass_neg``) and masked words (``_mask_words``) fed to ours, dropout on with the
official masks replayed in ours (input dropout 0 in this check, see :data:`STEP_NOTES`). Every
loss term, the weighted total and every parameter gradient are compared as on the QD-DETR side.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import official_runtime
from parity_common import (TOL, Corpus, DropoutReplay, Job, Recipe, compare_item_labels, compare_random_labels,
                           job_envs, official_job, our_run_config, ours_job, parity_table, print_gradients,
                           print_losses, run_jobs)

LAVIS_BPE = os.path.join("lavis", "models", "clip_models", "bpe_simple_vocab_16e6.txt.gz")

STEP_NOTES = (
    "input dropout is 0 in the step check unless --input-dropout: the official code projects the "
    "learned mask/unknown tokens with input_txt_proj once per batch ((1, 1, 512), one dropout mask "
    "shared by every replaced word) and its SS group video a second time; ours by default projects "
    "the replaced rows (one mask per row) and reuses the projected video, so these masks cannot be "
    "replayed one to one (with our mesm_input_dropout: true they can); every transformer/attention "
    "dropout (rate --dropout) is replayed",
    "the official negative pass also runs the decoder, whose outputs it discards; those dropout "
    "masks are dropped before the replay",
)


# --------------------------------------------------------------------------- MESM's layout


@dataclass
class MesmLayout:
    """A corpus written in MESM's layout (module doc); absolute paths."""

    root: str
    ann_path: str                  # highlight_{split}_release.jsonl + CLIP_tokenized_count.txt
    feat_files: List[str]          # one hdf5 per stream, MESM's order
    feat_dims: List[int]
    test_ann_path: Optional[str]   # eval_test/highlight_val_release.jsonl (the test split)
    text_dir: str                  # qid{qid}.npz of the source corpus (our dataset reads it; our
    text_model_path: str           # model runs the tower instead)
    tagger_dir: str                # an nltk_data folder
    bpe_path: str

    @property
    def counts_file(self) -> str:
        return os.path.join(self.ann_path, "CLIP_tokenized_count.txt")

    def split_file(self, split: str) -> str:
        return os.path.join(self.ann_path, f"highlight_{split}_release.jsonl")


def mesm_vid(vid: str, duration: float) -> str:
    """``vid`` if it is ``{youtube_id}_{start}_{end}`` (MESM's QVHighlights reader parses it), else
    ``{vid}_0_{duration}`` (one group per source video)."""
    parts = vid.rsplit("_", 2)
    if len(parts) == 3:
        try:
            float(parts[1]), float(parts[2])
            return vid
        except ValueError:
            pass
    return f"{vid}_0_{int(round(float(duration)))}"


def stream_order(video_dirs: Sequence[str]) -> List[str]:
    """MESM's order of the video streams: CLIP first, then the others in their given order."""
    clip = [d for d in video_dirs if "clip" in os.path.basename(os.path.normpath(d)).lower()]
    return clip + [d for d in video_dirs if d not in clip]


def lavis_bpe_path() -> str:
    """The CLIP BPE merges bundled with LAVIS (the file MESM's ``--bpe_path`` names)."""
    import lavis

    path = os.path.join(os.path.dirname(os.path.dirname(lavis.__file__)), LAVIS_BPE)
    if not os.path.isfile(path):
        raise SystemExit(f"the CLIP BPE file is not at {path} (it ships with LAVIS)")
    return path


def write_text_tower(path: str, width: int = 64, layers: int = 1, context_length: int = 77,
                     vocab_size: int = 49408, seed: int = 1000) -> str:
    """A random CLIP text tower in the official ``clip_text_encoder.pth`` layout (fp16 state dict
    as released; heads = width / 64 as the official builder reads it), initialised as OpenAI CLIP's
    ``initialize_parameters`` (normal: token embedding 0.02, positions 0.01, attention in/out and
    MLP by width and depth, projection width^-0.5; LayerNorms 1/0)."""
    from lavis_c2f.models.grounder.text_encoder import OpenAIClipTextTower

    g = torch.Generator().manual_seed(seed)
    tower = OpenAIClipTextTower(vocab_size=vocab_size, context_length=context_length, width=width,
                                heads=max(width // 64, 1), layers=layers, embed_dim=width)
    proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
    attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
    state = {}
    for name, t in tower.state_dict().items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
            v = torch.ones_like(t)
        elif name.endswith(".bias"):
            v = torch.zeros_like(t)
        else:
            std = {"token_embedding.weight": 0.02, "positional_embedding": 0.01,
                   "text_projection": width ** -0.5}.get(name)
            if std is None:
                std = (attn_std if "in_proj" in name else proj_std if "out_proj" in name or "c_proj" in name
                       else fc_std)
            v = torch.randn(t.shape, generator=g) * std
        state[name] = v.half()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)
    return path


def write_tagger_data(out: str) -> str:
    """nltk's ``taggers/averaged_perceptron_tagger_eng`` JSON files under ``out`` (an nltk_data
    folder), written from the tagger our package loads (nltk's data when installed, else the
    ``textblob-aptagger`` model)."""
    from lavis_c2f.models.grounder.pos_weights import PosTagger

    loc = os.path.join(out, "taggers", "averaged_perceptron_tagger_eng")
    if not os.path.isfile(os.path.join(loc, "averaged_perceptron_tagger_eng.weights.json")):
        tagger = PosTagger()._tagger
        os.makedirs(os.path.dirname(loc), exist_ok=True)
        tagger.save_to_json(lang="eng", loc=loc)
    return out


def write_mesm_layout(corpus: Corpus, out: str, tower_width: int = 64, tower_layers: int = 1) -> MesmLayout:
    """``corpus`` in MESM's layout under ``out`` (module doc). Files already there are kept."""
    import h5py

    from lavis_c2f.models.grounder.vocab import count_tokens

    out = os.path.abspath(out)
    ann_path = os.path.join(out, "annotations")
    os.makedirs(os.path.join(out, "eval_test"), exist_ok=True)
    os.makedirs(ann_path, exist_ok=True)
    rows: Dict[str, List[Dict[str, Any]]] = {}
    for split, path in corpus.annotations.items():
        with open(path) as f:
            rows[split] = [json.loads(line) for line in f if line.strip()]
        for r in rows[split]:
            r["vid"] = mesm_vid(str(r["vid"]), r["duration"])
    for split in ("train", "val"):
        with open(os.path.join(ann_path, f"highlight_{split}_release.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows.get(split, []))
    test_ann = None
    if rows.get("test"):
        test_ann = os.path.join(out, "eval_test")
        with open(os.path.join(test_ann, "highlight_val_release.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows["test"])
    counts, _ = count_tokens([r["query"] for r in rows["train"]], "clip")
    with open(os.path.join(ann_path, "CLIP_tokenized_count.txt"), "w") as f:
        for tok, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            f.write(f"{int(tok)} {int(c)}\n")
    feat_files, dims = [], []
    for d in stream_order(corpus.video_dirs):
        name = os.path.basename(os.path.normpath(d)).replace("_features", "")
        path = os.path.join(out, f"{name}.hdf5")
        src = {mesm_vid(str(r["vid_src"]), r["duration"]): r["vid_src"]
               for split in corpus.annotations for r in _source_rows(corpus, split)}
        if not os.path.isfile(path):
            with h5py.File(path + ".tmp", "w") as h:
                for key, vid in sorted(src.items()):
                    h.create_dataset(key, data=np.load(os.path.join(d, f"{vid}.npz"))["features"].astype(np.float32))
            os.replace(path + ".tmp", path)
        with h5py.File(path, "r") as h:
            dims.append(int(h[next(iter(h.keys()))].shape[1]))
        feat_files.append(path)
    tower = os.path.join(out, f"clip_text_encoder_w{tower_width}_l{tower_layers}.pth")
    if not os.path.isfile(tower):
        write_text_tower(tower, width=tower_width, layers=tower_layers)
    return MesmLayout(out, ann_path, feat_files, dims, test_ann, corpus.text_dir, tower,
                      write_tagger_data(os.path.join(out, "nltk_data")), lavis_bpe_path())


def _source_rows(corpus: Corpus, split: str) -> List[Dict[str, Any]]:
    with open(corpus.annotations[split]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [dict(r, vid_src=r["vid"]) for r in rows]


# --------------------------------------------------------------------------- the recipe


@dataclass
class MesmRecipe(Recipe):
    """The MESM recipe given to both codes: the QD-DETR recipe's shared fields (same sizes and
    schedule, so that MESM and plain QD-DETR compare at equal budget) plus MESM's parts at small
    depth for the CPU, MESM's official loss weights, and a small random text tower.
    ``bsz`` counts items (videos), as MESM's loader does."""

    bsz: int = 4                  # --batch_size (items; official 12)
    t2v_layers: int = 1           # --t2v_layers (official 2)
    num_recfw_layers: int = 1     # --num_recfw_layers (official 2)
    num_recss_layers: int = 1     # --num_recss_layers (official 4)
    vocab_size: int = 5000        # --vocab_size
    loss_recfw_coef: float = 0.5  # --loss_recfw_coef
    loss_recss_coef: float = 0.1  # --loss_recss_coef
    tower_width: int = 64         # random CLIP text tower (official: ViT-B/32's 512 x 12 layers)
    tower_layers: int = 1


def official_mesm_argv(r: MesmRecipe, layout: MesmLayout, seed: int, results_root: str) -> List[str]:
    """The official ``train.py`` command line (``BaseOptions``) for ``r`` on ``layout``: MESM's
    QVHighlights C+SF_C options with the recipe's sizes and schedule."""
    return ["--dataset_name", "qvhighlights", "--ann_path", layout.ann_path, "--feat_files", *layout.feat_files,
            "--use_tef", "--clip_len", str(r.clip_length), "--max_words_l", str(r.max_q_l),
            "--max_video_l", str(r.max_v_l), "--tokenizer_type", "CLIP", "--bpe_path", layout.bpe_path,
            "--normalize_video", "--normalize_txt", "--contra_samples", "2", "--batch_size", str(r.bsz),
            "--eval_batch_size", str(r.eval_bsz), "--num_workers", "0", "--vocab_size", str(r.vocab_size),
            "--max_windows", str(r.max_windows), "--device", "cpu", "--text_model_path", layout.text_model_path,
            "--share_MLP", "--hidden_dim", str(r.hidden_dim), "--dropout", str(r.dropout),
            "--nheads", str(r.nheads), "--dim_feedforward", str(r.dim_feedforward),
            "--num_recfw_layers", str(r.num_recfw_layers), "--t2v_layers", str(r.t2v_layers),
            "--enc_layers", str(r.enc_layers), "--dec_layers", str(r.dec_layers),
            "--input_dropout", str(r.input_dropout), "--v_feat_dim", str(sum(layout.feat_dims)),
            "--t_feat_dim", str(r.tower_width), "--num_queries", str(r.num_queries), "--n_input_proj", "2",
            "--rec_fw", "--rec_ss", "--num_recss_layers", str(r.num_recss_layers), "--span_loss_type", "l1",
            "--aux_loss", "--rank_coef", "12", "--use_triplet", "--saliency_margin", "0.2",
            "--loss_saliency_coef", str(r.lw_saliency), "--loss_recfw_coef", str(r.loss_recfw_coef),
            "--loss_recss_coef", str(r.loss_recss_coef), "--seed", str(seed), "--lr", str(r.lr),
            "--lr_drop", str(r.lr_drop), "--gamma", "0.1", "--weight_decay", str(r.wd),
            "--n_epoch", str(r.epochs), "--grad_clip", str(r.grad_clip), "--exp_id", f"seed{seed}",
            "--result_root", results_root, "--max_es_cnt", "-1", "--eval_epoch_interval", "5",
            "--sort_results", "--max_ts_val", "150", "--stop_score", "mAP", "--save_interval", "100000"]


def our_mesm_model_config(r: MesmRecipe, layout: MesmLayout, **overrides: Any) -> Dict[str, Any]:
    """Our ``c2f_mesm_qd_detr`` node for ``r`` (official post-processing: clamp to 150 s, no NMS,
    10 windows; the tower file and the counts file of ``layout``)."""
    cfg = {"arch": "c2f_mesm_qd_detr", "model_type": "qvh_clip_slowfast", "txt_dim": None,
           "vid_dim": sum(layout.feat_dims) + 2, "hidden_dim": r.hidden_dim, "nheads": r.nheads,
           "dim_feedforward": r.dim_feedforward, "enc_layers": r.enc_layers, "t2v_layers": r.t2v_layers,
           "dec_layers": r.dec_layers, "num_queries": r.num_queries, "dropout": r.dropout,
           "input_dropout": r.input_dropout, "lw_saliency": r.lw_saliency, "max_v_l": r.max_v_l,
           "max_q_l": r.max_q_l + 1,  # the (unused) text positions: words + the SS token, as MESM sizes them
           "num_recfw_layers": r.num_recfw_layers, "num_recss_layers": r.num_recss_layers,
           "vocab_size": r.vocab_size, "vocab_counts": layout.counts_file, "pos_tagger": layout.tagger_dir,
           "loss_recfw_coef": r.loss_recfw_coef, "loss_recss_coef": r.loss_recss_coef,
           "text_encoder": {"checkpoint": layout.text_model_path, "max_words_l": r.max_q_l},
           "postprocess": {"max_ts_val": 150.0, "nms_threshold": None, "max_after_nms": 10, "top_k": None}}
    cfg.update(overrides)
    return cfg


def model_type_merged(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` over the defaults of its ``model_type`` YAML, as LAVIS merges a project's model node
    (what ``train.py`` builds from :func:`our_mesm_project`)."""
    from omegaconf import OmegaConf

    from lavis_c2f.models.grounder.lavis_models import C2FMESMQDDETR

    base = OmegaConf.load(C2FMESMQDDETR.default_config_path(cfg["model_type"])).model
    return OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.create(cfg)), resolve=True)


def our_mesm_dataset_config(r: MesmRecipe, layout: MesmLayout, seed: int, test: bool = True) -> Dict[str, Any]:
    """A ``c2f_qvh`` node reading ``layout`` as MESM's loader does (grouped by YouTube id)."""
    ann = {s: {"path": layout.split_file(s), "format": "qvh", "require_windows": s == "train"}
           for s in ("train", "val")}
    if test and layout.test_ann_path:
        ann["test"] = {"path": os.path.join(layout.test_ann_path, "highlight_val_release.jsonl"),
                       "format": "qvh", "require_windows": False}
    return {"dataset_type": "moment_retrieval", "data_root": layout.root, "annotations": ann,
            "reader": {"tolerance": 1.0, "clamp": False, "swap_reversed": False, "on_error": "raise"},
            "video_features": [{"type": "hdf5", "path": p, "field": None} for p in layout.feat_files],
            "text_features": {"type": "npz", "path": layout.text_dir, "field": "last_hidden_state",
                              "pooled_field": "pooler_output", "qid_format": "qid{qid}"},
            "clip_length": float(r.clip_length), "max_v_l": r.max_v_l, "max_q_l": r.max_q_l,
            "max_windows": r.max_windows, "use_tef": True, "normalize": True, "seed": seed,
            "saliency_max_n": 1, "saliency_tie_break": "official", "norm_style": "mesm",
            "label_style": "mesm", "group_by": "youtube", "max_group_size": None}


def our_mesm_project(r: MesmRecipe, layout: MesmLayout, seed: int, output_dir: str) -> Dict[str, Any]:
    """The project YAML of our MESM run with recipe ``r``."""
    return {"model": our_mesm_model_config(r, layout),
            "datasets": {"c2f_qvh": our_mesm_dataset_config(r, layout, seed)},
            "run": our_run_config(r, seed, output_dir)}


# --------------------------------------------------------------------------- step check


def official_mesm_opt(r: MesmRecipe, layout: MesmLayout, seed: int) -> Any:
    """The official option namespace (``BaseOptions`` parsed from :func:`official_mesm_argv`, with
    what ``parse()`` adds: the TEF columns, the device)."""
    from utils.config import BaseOptions

    opts = BaseOptions()
    opts.initialize()
    opt = opts.parser.parse_args(official_mesm_argv(r, layout, seed, tempfile.gettempdir()))
    opt.device, opt.is_inference = torch.device("cpu"), False
    opt.v_feat_dim += 2
    return opt


def official_mesm_dataset(opt: Any, split: str, recfw: bool) -> Any:
    """The official ``QVHighlightsDataset`` of ``opt`` (as ``runner.build_dataloader`` builds it)."""
    from dataset import QVHighlightsDataset

    return QVHighlightsDataset(
        ann_path=opt.ann_path, feat_files=opt.feat_files, split=split, use_tef=opt.use_tef,
        clip_len=opt.clip_len, max_words_l=opt.max_words_l, max_video_l=opt.max_video_l,
        tokenizer_type=opt.tokenizer_type, load_vocab_pkl=opt.load_vocab_pkl, bpe_path=opt.bpe_path, vocab=None,
        normalize_video=opt.normalize_video, contra_samples=opt.contra_samples, recfw=recfw,
        vocab_size=opt.vocab_size, max_windows=opt.max_windows, max_gather_size=opt.max_gather_size)


INIT_MIN_NUMEL, INIT_TOL = 4096, 0.1


def init_differences(official: Dict[str, torch.Tensor], ours: Dict[str, torch.Tensor]
                     ) -> List[Tuple[str, float, float]]:
    """Weight tensors (at least :data:`INIT_MIN_NUMEL` values, in both) whose initial standard
    deviation differs by more than :data:`INIT_TOL` relative: ``(name, official std, our std)``.
    The step itself starts both from the official weights, so this is where a different
    initialisation scheme shows (e.g. Xavier where the official code keeps PyTorch's default)."""
    rows = []
    for name, a in official.items():
        b = ours.get(name)
        if b is None or a.numel() < INIT_MIN_NUMEL or a.shape != b.shape or not a.dtype.is_floating_point:
            continue
        sa, sb = float(a.float().std()), float(b.float().std())
        if abs(sa - sb) > INIT_TOL * max(sa, sb):
            rows.append((name, sa, sb))
    return rows


def _crop(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` (B, L, ...) cut or zero-padded to ``width`` along dim 1."""
    if x.shape[1] >= width:
        return x[:, :width]
    pad = x.new_zeros((x.shape[0], width - x.shape[1]) + tuple(x.shape[2:]))
    return torch.cat([x, pad], 1)


def step_check_mesm(official_dir: str, layout: MesmLayout, recipe: MesmRecipe, n_items: int, seed: int,
                    n_draws: int, dropout: bool = True, our_model: Optional[Dict[str, Any]] = None,
                    input_dropout: bool = False) -> int:
    """The MESM step check (module doc); ``dropout=False`` runs the step without any dropout (a
    diagnosis: tells a computation difference from a dropout-site difference); ``input_dropout``:
    keep the recipe's input dropout (replayable with our ``mesm_input_dropout: true``); ``our_model``:
    entries set in our model config (e.g. ``ss_group_video: own`` to see what the check reports
    for a variant). Returns the exit status."""
    import functools
    import sys

    official_runtime.install_mesm_shims(official_dir, layout.tagger_dir)
    import runner as official_runner
    from dataset import collate_qvh, prepare_batch_input

    official_model_module = sys.modules["model.model"]
    import model.attention as official_attention

    from lavis_c2f.datasets.builders import QVHighlightsBuilder
    from lavis_c2f.models.grounder.checkpoint import map_mesm_state_dict
    from lavis_c2f.models.grounder.lavis_models import C2FMESMQDDETR

    for note in STEP_NOTES:
        print(f"note: {note}")
    recipe = MesmRecipe(**dict(asdict(recipe), input_dropout=recipe.input_dropout if dropout and input_dropout else 0.0,
                               dropout=recipe.dropout if dropout else 0.0))
    opt = official_mesm_opt(recipe, layout, seed)
    off_ds = official_mesm_dataset(opt, "train", recfw=True)
    builder = QVHighlightsBuilder(dict(our_mesm_dataset_config(recipe, layout, seed, test=False), splits=["train"]))
    our_ds = builder.build_datasets()["train"]
    n = min(n_items, len(off_ds), len(our_ds))
    off_q = [[str(q) for q in off_ds.merged_data[i]["qid"]] for i in range(n)]
    our_q = [[str(our_ds.records[j].qid) for j in our_ds.items[i][1]] for i in range(n)]
    if off_q != our_q:
        print(f"step-check: the two datasets group the training queries differently: official {off_q[:3]}, "
              f"ours {our_q[:3]}")
        return 1

    torch.manual_seed(seed)
    model = C2FMESMQDDETR.from_config(model_type_merged(our_mesm_model_config(recipe, layout, **(our_model or {}))))
    if our_model:
        print(f"our model config changed for this check: {our_model}")
    random.seed(seed)
    off_items = [off_ds[i] for i in range(n)]
    off_batch = collate_qvh(off_items)
    prepare_batch_input(off_batch, torch.device("cpu"))
    ours = our_ds.collater([our_ds[i] for i in range(n)])
    n_q = len(ours["qid"])
    text = model._text(ours)
    fw_labels, fw_weights, fw_unknown, aligned = model._fw_targets(ours, text, text["src_txt_mask"].shape[1])
    width = text["src_txt_mask"].shape[1]

    print(f"\n== labels: {n} training items ({n_q} queries) of {layout.split_file('train')} ==")
    failures: List[str] = []
    a, b = off_batch["video_feat"], ours["src_vid"]
    d = math.inf if a.shape != b.shape else float((a - b).abs().max())
    print(f"  input video             shapes {tuple(a.shape)} / {tuple(b.shape)}, max |diff| {d:.2e}"
          f"{'' if d <= 1e-6 else '  << DIFFERS'}")
    if d > 1e-6:
        failures.append("input video")
    if not torch.equal(off_batch["video_mask"].float(), ours["src_vid_mask"].float()):
        failures.append("video mask")
    text_rows = {
        "token ids": (_crop(off_batch["words_id"][:, :recipe.max_q_l], width), text["txt_ids"]),
        "token mask": (_crop(off_batch["words_mask"][:, :recipe.max_q_l].long(), width),
                       text["src_txt_mask"].long()),
        "POS weights": (_crop(off_batch["words_weight"], width).float(), fw_weights),
        "unknown flags": (_crop(off_batch["unknown_mask"], width), fw_unknown),
        "word labels": (torch.where(_crop(off_batch["words_mask"][:, :recipe.max_q_l], width),
                                    _crop(off_batch["words_label"], width), torch.full_like(fw_labels, -100)),
                        fw_labels),
    }
    for name, (x, y) in text_rows.items():
        ok = x.shape == y.shape and torch.equal(x.to(y.dtype), y)
        print(f"  {name:<23} {'identical' if ok else 'DIFFER'} over {n_q} queries (width {width})")
        if not ok:
            bad = [i for i in range(n_q) if not torch.equal(x[i].to(y.dtype), y[i])][:3]
            for i in bad:
                print(f"    query {ours['qid'][i]}: official {x[i].tolist()}\n    {'':<{len(str(ours['qid'][i])) + 7}}"
                      f"ours     {y[i].tolist()}")
            failures.append(name)
    if not bool(aligned.all()):
        failures.append("token alignment")

    off_spans = [s["spans"] for s in off_batch["norm_span"]]
    random_windows: List[int] = []
    flat = [(i, j) for i in range(n) for j in our_ds.items[i][1]]
    for q, (item, rec_idx) in enumerate(flat):
        rec = our_ds.records[rec_idx]
        ctx_l = int(ours["src_vid_mask"][q].sum())
        print(f" query {q} qid {rec.qid} vid {rec.vid} (item {item}) clips {ctx_l} windows {len(rec.relevant_windows)}")
        bad, is_random = compare_item_labels(
            f"query {q}", off_spans[q], ours["span_labels"][q], len(rec.relevant_windows), recipe.max_windows,
            [(name, int(off_batch[key][q, 0]), int(ours[our_key][q, 0])) for name, key, our_key in
             (("hard positive", "pos_idx", "saliency_pos_labels"), ("hard negative", "neg_idx", "saliency_neg_labels"))])
        failures += bad
        if is_random:
            random_windows.append(q)
        for name, x, y in (("all-clip scores", off_batch["saliency_label"][q, :ctx_l].float(),
                            ours["saliency_all_labels"][q, :ctx_l].float()),
                           ("clip_mask", off_batch["clip_mask"][q, :ctx_l], ours["clip_mask"][q, :ctx_l])):
            ok = torch.equal(x, y)
            print(f"  {name:<22} {'equal' if ok else 'DIFFER'} over {ctx_l} clips ({int((x != 0).sum())} non-zero)")
            if not ok:
                failures.append(f"query {q} {name}")
        meta = off_ds.merged_data[item]
        k = [str(v) for v in meta["qid"]].index(str(rec.qid))

        def off_draw(s: int, meta=meta, k=k, ctx_l=ctx_l) -> List[Tuple[str, int]]:
            random.seed(s)
            pos, neg, _ = off_ds.get_saliency_labels_all(meta["relevant_clip_ids"][k], meta["saliency_scores"][k],
                                                         ctx_l)
            return [("easy positive", int(pos[1])), ("easy negative", int(neg[1]))]

        def our_draw(s: int, rec=rec, rec_idx=rec_idx, ctx_l=ctx_l) -> List[Tuple[str, int]]:
            our_ds.set_epoch(s)
            lab = our_ds.base.labels(rec, ctx_l, our_ds.base.rng_for(rec_idx))
            return [("easy positive", int(lab["saliency_pos_labels"][1])),
                    ("easy negative", int(lab["saliency_neg_labels"][1]))]

        windows = [list(w) for w in meta["relevant_windows"][k]]

        def off_win(s: int, windows=windows, ctx_l=ctx_l) -> List[Tuple[float, ...]]:
            random.seed(s)
            return [tuple(round(x, 4) for x in w) for w in off_ds.get_span_labels(list(windows), ctx_l)[1].tolist()]

        def our_win(s: int, rec=rec, rec_idx=rec_idx, ctx_l=ctx_l) -> List[Tuple[float, ...]]:
            our_ds.set_epoch(s)
            return [tuple(round(x, 4) for x in w) for w in
                    our_ds.base.labels(rec, ctx_l, our_ds.base.rng_for(rec_idx))["span_labels"].tolist()]

        random_rows = (off_win, our_win) if q in random_windows else (None, None)
        failures += [f"query {q} {name}" for name in compare_random_labels(off_draw, our_draw, n_draws, None,
                                                                           *random_rows)]
    our_ds.set_epoch(0)

    # ---- one training step from the same weights, on the same batch
    official_runner.convert_weights = lambda m: None  # float32 tower (see official_runtime.MESM_SHIMS)
    torch.manual_seed(seed)
    off_model = official_runner.build_model(opt)
    off_crit = official_runner.build_criterion(opt)
    off_state = map_mesm_state_dict(official_runtime.without_text_encoder(off_model.state_dict()))
    init_rows = init_differences(off_state, model.detr.state_dict())
    print(f"\n== initialisation: {len(init_rows)} weight tensors of >= {INIT_MIN_NUMEL} values whose standard "
          f"deviation differs by more than {INIT_TOL:.0%} between a fresh official model and ours ==")
    for name, a, b in init_rows:
        print(f"  {name:<56} std official {a:.4f}, ours {b:.4f}  << DIFFERS")
    failures += [f"initialisation of {name}" for name, _, _ in init_rows]
    missing = model.detr.load_state_dict(off_state, strict=False)
    bad_keys = [k for k in missing.missing_keys if not k.startswith("text_encoder.")] + list(missing.unexpected_keys)
    if bad_keys:
        print(f"step-check: the official weights do not map onto ours: {bad_keys[:8]}")
        return 1
    tower_diff = max(float((p - model.detr.text_encoder.model.state_dict()[k].float()).abs().max())
                     for k, p in off_model.text_encoder.state_dict().items())
    batch = dict(ours)
    for key, col_key in (("saliency_pos_labels", "pos_idx"), ("saliency_neg_labels", "neg_idx")):
        batch[key] = ours[key].clone()
        batch[key][:, 1] = off_batch[col_key][:, 1]
    batch["span_labels"] = [off_spans[q] if q in random_windows else s for q, s in enumerate(ours["span_labels"])]
    off_model.train()
    off_crit.train()
    model.train()
    record: Dict[str, Any] = {}
    sample_neg = official_model_module.sample_outclass_neg

    def recorded_neg(num_clips: torch.Tensor) -> torch.Tensor:
        record["neg_index"] = sample_neg(num_clips)
        return record["neg_index"]

    mask_words = off_model._mask_words

    def recorded_mask(*args: Any, **kwargs: Any) -> Any:
        out = mask_words(*args, **kwargs)
        record["masked"] = out[1].clone()
        return out

    decoder = off_model.transformer.decoder
    decoder_forward = decoder.forward
    replay = DropoutReplay(crop_padding=True)
    spans: List[Tuple[int, int]] = []

    def counted_decoder(*args: Any, **kwargs: Any) -> Any:
        start = len(replay.masks)
        out = decoder_forward(*args, **kwargs)
        spans.append((start, len(replay.masks)))
        return out

    official_model_module.sample_outclass_neg = recorded_neg
    off_model._mask_words = recorded_mask
    decoder.forward = counted_decoder
    try:
        replay.record(off_model, official_attention, seq_first=("transformer", "t2v_encoder", "enhance_encoder",
                                                               "ss_reconstructor"))
        np.random.seed(seed)  # the official _mask_words draws from NumPy's global generator
        off_out = off_model(**off_batch, dataset_name="qvhighlights", is_training=True)
        replay.restore()
        off_losses, off_total = off_crit(off_out, off_batch, is_training=True)
        off_total.backward()
        if len(spans) != 2:
            raise RuntimeError(f"expected 2 official decoder calls (positive, negative pass), got {len(spans)}")
        del replay.masks[spans[1][0]:spans[1][1]]
        n_dropped = spans[1][1] - spans[1][0]
        original_forward = model.detr.forward
        inner = functools.partial(original_forward, neg_index=record["neg_index"],
                                  fw_masked=_crop(record["masked"].bool(), width))

        def keep(*args: Any, **kwargs: Any) -> Any:
            record["ours_out"] = inner(*args, **kwargs)
            return record["ours_out"]

        model.detr.forward = keep
        replay.replay()
        our_losses = model(batch)
    finally:
        replay.restore()
        official_model_module.sample_outclass_neg = sample_neg
        decoder.forward = decoder_forward
    model.detr.forward = original_forward
    our_losses["loss"].backward()
    print(f"\n== one training step ({n} items, {n_q} queries; official initialisation with seed {seed}; text tower "
          f"max |diff| {tower_diff:.1e}; negative pairing {record['neg_index'].tolist()} and "
          f"{int(record['masked'].sum())} masked words from the official draw; dropout: {replay.used} of "
          f"{len(replay.masks)} official masks replayed, {n_dropped} of the negative pass's decoder dropped) ==")
    step_failures: List[str] = []
    if replay.used != len(replay.masks):
        step_failures.append(f"dropout sites: ours used {replay.used} of {len(replay.masks)} official masks")
    max_loss = print_losses([k for k in off_losses if k in our_losses and k in off_crit.weight_dict], off_losses,
                            off_total, our_losses)
    missing_terms = [k for k in off_crit.weight_dict if k not in our_losses]
    if missing_terms:
        step_failures.append(f"loss terms missing on our side: {missing_terms}")
    off_grads = map_mesm_state_dict({name: p.grad for name, p in off_model.named_parameters() if p.requires_grad})
    ours_grads = {name: p.grad for name, p in model.detr.named_parameters()
                  if p.requires_grad and not name.startswith("text_encoder.")}
    # trainable on one side only: fine when no loss reaches it (no gradient, AdamW skips it);
    # MESM's output_sent_proj is such a parameter (ours keeps it frozen)
    only = sorted(k for k in set(off_grads) ^ set(ours_grads)
                  if (off_grads.get(k) if k in off_grads else ours_grads.get(k)) is not None)
    if only:
        step_failures.append(f"trainable parameters differ: {only[:6]}")
    max_grad = print_gradients(ours_grads, {k: off_grads.get(k) for k in ours_grads},
                               f" with a gradient (of {len(ours_grads)} trainable)")
    failures += step_failures
    if failures:
        print(f"\ndiffers: {failures}")
    status = 0 if not failures and max_loss <= TOL and max_grad <= TOL else 1
    n_label = len(failures) - len(step_failures)
    labels = "labels identical" if not n_label else f"labels DIFFER ({n_label})"
    if step_failures:
        labels += f", step setup DIFFERS ({'; '.join(step_failures)})"
    print(f"step-check: {labels}, max loss diff {max_loss:.2e}, max grad diff {max_grad:.2e}")
    return status


# --------------------------------------------------------------------------- train parity


def count_items(annotations: str) -> int:
    """MESM's training items in a QVHighlights-layout file: distinct YouTube ids."""
    with open(annotations) as f:
        return len({json.loads(line)["vid"].rsplit("_", 2)[0] for line in f if line.strip()})

#: our model config for the evaluation with the official batching (the official evaluation's items
#: group the queries of a video: SS groups over the item, official T2V mask, batches of items)
OFFICIAL_EVAL = {"eval_t2v_mask_mode": "official", "predict_with_groups": True}


def _grouped_test(project: Dict[str, Any]) -> Dict[str, Any]:
    """``project`` evaluating the test split grouped by video, as the official MESM evaluation."""
    project["datasets"]["c2f_qvh"]["group_splits"] = ["train", "test"]
    return project


def train_parity_mesm(official_dir: str, layout: MesmLayout, recipe: MesmRecipe, seeds: Sequence[int],
                      official_python: str, parallel: int, work: str) -> Tuple[str, List[Dict[str, Any]]]:
    """Official MESM vs ours, one run per seed and side (``parallel`` at a time, one thread
    each), both evaluated on the test split; returns the table and its rows (:func:`parity_table`).

    Columns: *B-indep.*: ours as it evaluates by default (correct T2V mask, each query its own
    sentence group: no prediction depends on the batch); the official code cannot evaluate that
    way (its negative pass needs a second video in the batch). *Official batching*: both as the
    official evaluation runs (items grouped by video, ``eval_bsz`` items per batch, official T2V
    mask; the official loader also shuffles the items).
    """
    if not layout.test_ann_path:
        raise SystemExit(f"{layout.root}: the corpus has no test split to evaluate on")
    n_items = count_items(layout.split_file("train"))
    if n_items % recipe.bsz == 1:
        raise SystemExit(f"{n_items} training items (videos) in batches of {recipe.bsz} leave a last batch of one "
                         "item, on which the official MESM code raises (its negative pass needs a second video; "
                         "its loader keeps the last partial batch): choose another --mesm-bsz")
    os.makedirs(work, exist_ok=True)
    our_env, off_env = job_envs()
    jobs: List[Job] = []
    for seed in seeds:
        jobs.append(official_job(
            work, f"official_mesm_seed{seed}", "official MESM", "official code", seed, official_python,
            lambda d, out: ["train-mesm", official_dir, layout.tagger_dir, layout.test_ann_path, out, "--",
                            *official_mesm_argv(recipe, layout, seed, os.path.join(d, "results"))],
            off_env))
        jobs.append(ours_job(
            work, f"ours_mesm_seed{seed}", "ours MESM", "official recipe (defaults)", seed,
            lambda d: _grouped_test(our_mesm_project(recipe, layout, seed, os.path.join(d, "output"))),
            recipe.eval_bsz, our_env, OFFICIAL_EVAL))
    print(f"MESM train parity: {len(jobs)} runs, {parallel} at a time, work folder {work}", flush=True)
    run_jobs(jobs, parallel)
    return parity_table(jobs, recipe.eval_bsz)
