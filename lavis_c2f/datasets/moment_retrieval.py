"""Stage-2 dataset: (query, its video) -> features + QD-DETR/Moment-DETR training labels.

Labels follow QD-DETR's ``StartEndDataset`` (``label_style: qd_detr``) or MESM's datasets
(``label_style: mesm``, see below), with these documented differences:

* **Deterministic sampling.** The random choices (easy saliency positives/negatives, the
  subset of windows kept when there are more than ``max_windows``) use
  ``numpy.random.default_rng([seed, epoch, index])``; call :meth:`set_epoch` each epoch to
  vary them (LAVIS wraps the train split in a ``ConcatDataset``: reach it through
  ``.datasets``).
* **Normalisation** of windows is by ``duration = min(annotated duration, Lv * clip_length)``
  (docs/ARCHITECTURE.md); windows are clamped into ``[0, duration]`` first and windows left
  empty are dropped. QD-DETR divides by ``Lv * clip_length``; the two agree whenever the
  features cover the annotated video (QVHighlights: 75 clips x 2 s = 150 s).
* **Saliency without annotator scores** (Charades-STA, TACoS): clips
  ``int(st / clip_length) .. min(int(ed / clip_length), Lv) - 1`` of every window are
  relevant with score 1; two positives are drawn from them and two negatives from the other
  clips (falling back to the positives when there are none), as lighthouse's
  ``get_saliency_labels_sub_as_query`` does for these datasets. Relevant clip ids at or
  beyond ``Lv`` are clamped to ``Lv - 1`` for the hard labels (as QD-DETR) and ignored in
  ``saliency_all_labels`` (QD-DETR grows that array past ``Lv``, which no mask matches).

Hard saliency positive/negative clips are the last/first of the relevant clips sorted by their
summed annotator scores. QVHighlights-style scores tie a lot, and the official code sorts with
``np.argsort`` (NumPy's unstable introsort), which takes another clip among tied ones than a
stable sort for about a quarter of the queries. ``saliency_tie_break="official"`` (the default
of every dataset YAML) orders ties exactly as the official code did under its pinned NumPy, on
any CPU (:func:`lavis_c2f.ops.argsort.introsort_argsort`; ``np.argsort`` itself orders ties by
CPU since NumPy 1.25); ``"stable"`` takes the lowest-index clip among tied ones (the order this
package used before; a documented variant).

Samples without ground truth (test splits) get ``has_labels = False``, an empty
``span_labels`` (0, 2), zero saliency indices and an all-zero ``saliency_all_labels``.

``label_style: mesm`` (MESM's ``QVHighlightsDataset`` / ``CharadesDataset`` / ``TACoSDataset``):

* with annotator scores, the labels above, plus ``clip_mask`` = clips whose summed score is
  not 0 (the clips FW-MESM rebuilds words from and SS-MESM averages);
* without scores, each window covers clips ``int(st / clip_length) .. min(int(ed /
  clip_length), Lv - 1)`` (end clip included; start clamped to the end) and that 0/1 mask is
  both ``clip_mask`` and ``saliency_all_labels``; 2 positives are drawn from it and 2
  negatives from the other clips, without replacement when there are enough (else with
  replacement; no other clip: the positives).

:class:`GroupedMomentDataset` (``group_by``) makes MESM's items: all queries of one video
(or of one YouTube id) per item.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from lavis_c2f.data.features import FeatureStore
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.datasets.collate import pad_sequences, stack_lists
from lavis_c2f.ops.argsort import introsort_argsort
from lavis_c2f.ops.spans import seconds_to_normalized_cxw
from lavis_c2f.processors.feature_processors import TextFeatureProcessor, VideoFeatureProcessor

logger = logging.getLogger(__name__)

LABEL_STYLES = ("qd_detr", "mesm")
GROUP_BY = ("video", "youtube")
TIE_BREAKS = ("official", "stable")


# --------------------------------------------------------------------------- label functions


def saliency_labels_from_scores(rel_clip_ids: Sequence[int], scores: Sequence[Sequence[float]],
                                ctx_l: int, rng: np.random.Generator, max_n: int = 1,
                                add_easy_negative: bool = True, tie_break: str = "official"
                                ) -> Tuple[List[int], List[int], np.ndarray]:
    """QD-DETR ``get_saliency_labels_all`` with a given RNG.

    ``order = argsort(sum of annotator scores)`` (increasing); hard positives are the clips of
    ``order[-max_n:]``, hard negatives those of ``order[:max_n]``; easy positives are drawn
    from the relevant clips and easy negatives from the others.

    Args:
        rel_clip_ids: relevant clip indices; scores: per-clip annotator scores.
        ctx_l: number of clips Lv.
        tie_break: ``"official"`` (NumPy's scalar introsort, the official order) or
            ``"stable"`` (module docstring).
    Returns:
        ``(pos, neg, all)``: ``2 * max_n`` positive and negative clip indices (hard then easy;
        ``max_n`` each without easy ones) and the (Lv,) summed scores.
    """
    if len(rel_clip_ids) == 0:
        raise ValueError("saliency_labels_from_scores needs at least one relevant clip")
    agg = np.asarray(scores, dtype=np.float64).sum(axis=1)
    if tie_break == "official":
        order = introsort_argsort(agg)
    elif tie_break == "stable":
        order = np.argsort(agg, kind="stable")
    else:
        raise ValueError(f"unknown tie_break {tie_break!r}, expected one of {TIE_BREAKS}")
    all_scores = np.zeros(ctx_l, dtype=np.float32)
    for cid, s in zip(rel_clip_ids, agg):
        if 0 <= cid < ctx_l:
            all_scores[cid] = s
    last = ctx_l - 1
    hard_pos = [min(int(rel_clip_ids[i]), last) for i in order[-max_n:]]
    hard_neg = [min(int(rel_clip_ids[i]), last) for i in order[:max_n]]
    easy_pos: List[int] = []
    easy_neg: List[int] = []
    if add_easy_negative:
        rel_set = set(int(c) for c in rel_clip_ids)
        pool = [c for c in range(ctx_l) if c not in rel_set]
        if len(pool) >= max_n and len(rel_clip_ids) >= max_n:
            easy_pos = [min(int(c), last) for c in rng.choice(np.asarray(rel_clip_ids), size=max_n,
                                                               replace=False)]
            easy_neg = [int(c) for c in rng.choice(np.asarray(pool), size=max_n, replace=False)]
        else:  # copy the hard ones
            easy_pos, easy_neg = list(hard_pos), list(hard_neg)
    return hard_pos + easy_pos, hard_neg + easy_neg, all_scores


def saliency_labels_from_windows(windows: Sequence[Tuple[float, float]], ctx_l: int,
                                 clip_length: float, rng: np.random.Generator, max_n: int = 2
                                 ) -> Tuple[List[int], List[int], np.ndarray]:
    """Saliency labels for datasets without annotator scores (module docstring).

    Returns ``(pos, neg, all)`` with ``max_n`` indices each and an (Lv,) 0/1 array.
    """
    rel = np.zeros(ctx_l, dtype=bool)
    for st, ed in windows:
        a = int(st / clip_length)
        b = max(0, min(int(ed / clip_length), ctx_l) - 1)
        a = min(a, b)
        rel[a: b + 1] = True
    pos_pool = np.flatnonzero(rel)
    neg_pool = np.flatnonzero(~rel)
    if len(pos_pool) >= max_n:
        pos = [int(c) for c in rng.choice(pos_pool, size=max_n, replace=False)]
    else:
        pos = [int(pos_pool[0])] * max_n
    if len(neg_pool) >= max_n:
        neg = [int(c) for c in rng.choice(neg_pool, size=max_n, replace=False)]
    else:
        neg = list(pos)
    return pos, neg, rel.astype(np.float32)


def mesm_window_labels(windows: Sequence[Tuple[float, float]], ctx_l: int, clip_length: float,
                       rng: np.random.Generator, n: int = 2
                       ) -> Tuple[List[int], List[int], np.ndarray]:
    """MESM's saliency labels without annotator scores (module doc, ``label_style: mesm``).

    Returns ``(pos, neg, mask)``: ``n`` positive and ``n`` negative clip indices and the (Lv,)
    0/1 float32 mask of the windows' clips (MESM's ``clip_mask``).
    """
    rel = np.zeros(ctx_l, dtype=bool)
    for st, ed in windows:
        end = min(int(ed / clip_length), ctx_l - 1)
        start = min(int(st / clip_length), end)
        rel[start: end + 1] = True
    pos_pool, neg_pool = np.flatnonzero(rel), np.flatnonzero(~rel)
    pos = [int(c) for c in rng.choice(pos_pool, size=n, replace=len(pos_pool) < n)]
    if len(neg_pool):
        neg = [int(c) for c in rng.choice(neg_pool, size=n, replace=len(neg_pool) < n)]
    else:
        neg = list(pos)
    return pos, neg, rel.astype(np.float32)


# --------------------------------------------------------------------------- dataset


class MomentRetrievalDataset(Dataset):
    """One sample per query (stage 2).

    Args:
        records: annotations (seconds).
        video_stores: one feature store per video stream (concatenated in order).
        text_store: text feature store.
        vis_processor: ``c2f_video_features`` processor (normalise, max_v_l, TEF).
        text_processor: ``c2f_text_features`` processor (normalise, max_q_l).
        clip_length: seconds per clip.
        text_field: field of the text store with token features.
        qid_format: text store key of a qid.
        max_windows: at most this many GT windows become ``span_labels``.
        seed: base of the per-(epoch, index) label sampling.
        saliency_max_n: ``max_n`` of the score-based saliency labels (QD-DETR: 1).
        label_style: ``"qd_detr"`` or ``"mesm"`` (module doc; MESM adds ``clip_mask``).
        saliency_tie_break: order of tied clips for the hard labels (module docstring).
        name: for messages.

    ``dataset[i]`` is a dict: ``qid, query, vid, duration, clip_length, relevant_windows,
    has_labels``, ``video_feat`` (Lv, Dv) float, ``query_feat`` (Lt, Dt) float,
    ``span_labels`` (N, 2) normalised (cx, w), ``saliency_pos_labels`` /
    ``saliency_neg_labels`` (2 * saliency_max_n or 2,) long, ``saliency_all_labels`` (Lv,).
    :meth:`collater` turns a list of them into the moment-retrieval batch.
    """

    def __init__(self, records: Sequence[MomentRecord], video_stores: Sequence[FeatureStore],
                 text_store: FeatureStore, *, vis_processor: Optional[VideoFeatureProcessor] = None,
                 text_processor: Optional[TextFeatureProcessor] = None, clip_length: float,
                 text_field: str = "last_hidden_state", qid_format: str = "qid{qid}",
                 max_windows: int = 5, seed: int = 0, saliency_max_n: int = 1,
                 saliency_tie_break: str = "official", label_style: str = "qd_detr",
                 name: str = "moment_retrieval"):
        if label_style not in LABEL_STYLES:
            raise ValueError(f"label_style must be one of {LABEL_STYLES}, got {label_style!r}")
        if clip_length <= 0:
            raise ValueError(f"clip_length must be > 0, got {clip_length}")
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        if len(video_stores) == 0:
            raise ValueError("need at least one video feature store")
        if saliency_tie_break not in TIE_BREAKS:
            raise ValueError(f"saliency_tie_break must be one of {TIE_BREAKS}, got {saliency_tie_break!r}")
        self.records = list(records)
        self.video_stores = list(video_stores)
        self.text_store = text_store
        self.vis_processor = vis_processor or VideoFeatureProcessor()
        self.text_processor = text_processor or TextFeatureProcessor()
        self.clip_length = float(clip_length)
        self.text_field = text_field
        self.qid_format = qid_format
        self.max_windows = int(max_windows)
        self.seed = int(seed)
        self.saliency_max_n = int(saliency_max_n)
        self.label_style = label_style
        self.saliency_tie_break = saliency_tie_break
        self.name = name
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Vary the sampled labels per epoch (deterministically)."""
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    # -- feature access
    def video_features(self, vid: str) -> torch.Tensor:
        return self.vis_processor([s.get(vid) for s in self.video_stores])

    def text_features(self, qid: Any) -> torch.Tensor:
        return self.text_processor(self.text_store.get(self.qid_format.format(qid=qid), self.text_field))

    # -- labels
    def labels(self, rec: MomentRecord, ctx_l: int, rng: np.random.Generator) -> Dict[str, Any]:
        """span/saliency labels of ``rec`` for a video of ``ctx_l`` clips."""
        duration = min(float(rec.duration), ctx_l * self.clip_length)
        windows = []
        for st, ed in rec.relevant_windows:
            st, ed = max(0.0, float(st)), min(float(ed), duration)
            if ed > st:
                windows.append((st, ed))
        if len(rec.relevant_windows) and not windows:
            logger.debug("%s: qid %s has no window inside the first %.1f s of features", self.name,
                         rec.qid, duration)
        n_sal = 2 * self.saliency_max_n
        mesm = self.label_style == "mesm"
        if not windows:
            out = {"duration": duration, "has_labels": False,
                   "span_labels": torch.zeros((0, 2), dtype=torch.float32),
                   "saliency_pos_labels": [0] * n_sal, "saliency_neg_labels": [0] * n_sal,
                   "saliency_all_labels": torch.zeros(ctx_l, dtype=torch.float32)}
            if mesm:
                out["clip_mask"] = torch.zeros(ctx_l, dtype=torch.bool)
            return out
        kept = windows
        if len(windows) > self.max_windows:
            kept = [windows[i] for i in rng.permutation(len(windows))[: self.max_windows]]
        spans = seconds_to_normalized_cxw(torch.tensor(kept, dtype=torch.float32), duration)
        if rec.has_saliency:
            pos, neg, all_s = saliency_labels_from_scores(rec.relevant_clip_ids, rec.saliency_scores,
                                                          ctx_l, rng, max_n=self.saliency_max_n,
                                                          tie_break=self.saliency_tie_break)
        elif mesm:
            pos, neg, all_s = mesm_window_labels(windows, ctx_l, self.clip_length, rng, n=n_sal)
        else:
            pos, neg, all_s = saliency_labels_from_windows(windows, ctx_l, self.clip_length, rng,
                                                           max_n=n_sal)
        out = {"duration": duration, "has_labels": True, "span_labels": spans,
               "saliency_pos_labels": pos, "saliency_neg_labels": neg,
               "saliency_all_labels": torch.from_numpy(all_s)}
        if mesm:
            out["clip_mask"] = torch.from_numpy(all_s != 0)
        return out

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rec = self.records[index]
        video = self.video_features(rec.vid)
        query = self.text_features(rec.qid)
        sample = {"qid": rec.qid, "query": rec.query, "vid": rec.vid, "clip_length": self.clip_length,
                  "relevant_windows": [[float(s), float(e)] for s, e in rec.relevant_windows],
                  "video_feat": video, "query_feat": query}
        sample.update(self.labels(rec, int(video.shape[0]), self.rng_for(index)))
        return sample

    # -- batching
    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        return collate_moment_retrieval(samples)


def collate_moment_retrieval(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Samples of :class:`MomentRetrievalDataset` -> the moment-retrieval batch.

    Keys (docs/ARCHITECTURE.md): ``src_vid`` (B, Lv, Dv), ``src_vid_mask`` (B, Lv),
    ``src_txt`` (B, Lt, Dt), ``src_txt_mask`` (B, Lt), ``qid``/``query``/``vid`` lists,
    ``duration`` (B,), ``clip_length`` (B,), ``span_labels`` list of (N_i, 2),
    ``saliency_pos_labels``/``saliency_neg_labels`` (B, 2k) long, ``saliency_all_labels``
    (B, Lv), ``relevant_windows`` list, ``has_labels`` (B,) bool. Sequences are zero-padded at
    the end to the longest in the batch; masks are float, 1 = valid.
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    src_vid, vid_mask = pad_sequences([s["video_feat"] for s in samples])
    src_txt, txt_mask = pad_sequences([s["query_feat"] for s in samples])
    sal_all, _ = pad_sequences([s["saliency_all_labels"] for s in samples])
    if sal_all.shape[1] < src_vid.shape[1]:  # labels shorter than the clips (never by construction)
        sal_all = torch.nn.functional.pad(sal_all, (0, src_vid.shape[1] - sal_all.shape[1]))
    width = max(len(s["saliency_pos_labels"]) for s in samples)
    pad = lambda row: list(row) + [0] * (width - len(row))  # noqa: E731 (no-label rows)
    extra: Dict[str, Any] = {}
    if all("clip_mask" in s for s in samples):
        mask, _ = pad_sequences([s["clip_mask"].float() for s in samples])
        extra["clip_mask"] = torch.nn.functional.pad(
            mask, (0, src_vid.shape[1] - mask.shape[1])).bool()
    return extra | {
        "src_vid": src_vid,
        "src_vid_mask": vid_mask,
        "src_txt": src_txt,
        "src_txt_mask": txt_mask,
        "qid": [s["qid"] for s in samples],
        "query": [s["query"] for s in samples],
        "vid": [s["vid"] for s in samples],
        "duration": torch.tensor([s["duration"] for s in samples], dtype=torch.float32),
        "clip_length": torch.tensor([s["clip_length"] for s in samples], dtype=torch.float32),
        "span_labels": [s["span_labels"] for s in samples],
        "saliency_pos_labels": stack_lists([pad(s["saliency_pos_labels"]) for s in samples], width),
        "saliency_neg_labels": stack_lists([pad(s["saliency_neg_labels"]) for s in samples], width),
        "saliency_all_labels": sal_all,
        "relevant_windows": [s["relevant_windows"] for s in samples],
        "has_labels": torch.tensor([bool(s["has_labels"]) for s in samples], dtype=torch.bool),
    }


# --------------------------------------------------------------------------- MESM items


def group_key(vid: str, group_by: str) -> str:
    """The grouping id of a video: itself (``video``) or its YouTube id (``youtube``:
    ``vid.rsplit("_", 2)[0]``, QVHighlights' ``{youtube_id}_{start}_{end}``)."""
    if group_by == "video":
        return vid
    if group_by == "youtube":
        return str(vid).rsplit("_", 2)[0]
    raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")


def _segment_start(vid: str) -> float:
    parts = str(vid).rsplit("_", 2)
    try:
        return float(parts[1]) if len(parts) == 3 else 0.0
    except ValueError:
        return 0.0


class GroupedMomentDataset(Dataset):
    """MESM's training items: one item = the queries of one group, in MESM's order.

    Groups are the queries sharing :func:`group_key` (MESM's ``_gather_data_by_video_id``):
    ``youtube`` items are sorted by segment start (MESM's ``video_start``), ``video`` items
    by the clip index of their first window's start (MESM's ``start_idx``; stable, then
    annotation order). With ``max_group_size`` a group is shuffled once (seeded) and cut into
    chunks of at most that many queries, each sorted the same way (MESM ``max_gather_size``).
    A batch of B items therefore holds all queries of B groups; :meth:`collater` flattens it
    into the moment-retrieval batch (queries of an item consecutive) and adds ``group``
    (the group id of each query, what the MESM model groups and draws negatives by) and
    ``group_sizes`` (MESM's ``num_clips``).

    Args:
        base: the per-query :class:`MomentRetrievalDataset`.
        group_by: ``"video"`` or ``"youtube"``.
        max_group_size: None (whole groups) or the chunk size.
        seed: the chunking shuffle.
    """

    def __init__(self, base: MomentRetrievalDataset, group_by: str,
                 max_group_size: Optional[int] = None, seed: int = 0):
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
        if max_group_size is not None and max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1 or null, got {max_group_size}")
        self.base, self.group_by, self.max_group_size = base, group_by, max_group_size
        self.clip_length = base.clip_length
        members: Dict[str, List[int]] = {}
        for i, rec in enumerate(base.records):
            members.setdefault(group_key(rec.vid, group_by), []).append(i)
        rng = np.random.default_rng([int(seed), 7919])

        def order(idx: int) -> float:
            rec = base.records[idx]
            if group_by == "youtube":
                return _segment_start(rec.vid)
            wins = rec.relevant_windows
            return float(int(wins[0][0] / base.clip_length)) if wins else 0.0

        self.items: List[Tuple[str, List[int]]] = []
        for key, idx in members.items():
            chunks = [idx]
            if max_group_size is not None:
                idx = [idx[j] for j in rng.permutation(len(idx))]
                chunks = [idx[k: k + max_group_size] for k in range(0, len(idx), max_group_size)]
            self.items.extend((key, sorted(c, key=order)) for c in chunks)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    @property
    def records(self):
        return self.base.records

    def __getitem__(self, index: int) -> List[Dict[str, Any]]:
        key, idx = self.items[index]
        out = []
        for j in idx:
            sample = self.base[j]
            sample["group"] = key
            out.append(sample)
        return out

    def collater(self, items: List[List[Dict[str, Any]]]) -> Dict[str, Any]:
        flat = [s for item in items for s in item]
        batch = collate_moment_retrieval(flat)
        batch["group"] = [s["group"] for s in flat]
        batch["group_sizes"] = torch.tensor([len(item) for item in items], dtype=torch.long)
        return batch
