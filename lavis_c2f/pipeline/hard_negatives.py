"""Stage-2 training on retrieved videos: hard-negative samples from stage-1 results.

:class:`HardNegativeMomentDataset` wraps a :class:`~lavis_c2f.datasets.MomentRetrievalDataset`
(its samples come first, unchanged) and appends ``round(ratio * N)`` extra samples, N being
the number of queries that have at least one retrieved non-GT video. An extra sample pairs a
query with one of its top-``top_k`` retrieved videos that is **not** its ground-truth video,
with no windows: ``has_labels = False``, empty ``span_labels``, zero saliency labels, the
duration of that video. The grounder learns to give such pairs low foreground scores (every
DETR query is matched to "no object"), which is what makes stage-2 scores comparable across
the candidate videos of a query in the coarse-to-fine ranking. The saliency margin term skips
these samples (the criterion masks ``has_labels = False``), and the negative-pair term keeps
using the batch's other texts, as for ordinary samples.

Sampling is deterministic per epoch: :meth:`set_epoch` draws which queries get an extra sample
this epoch (a permutation seeded by ``[seed, epoch]``) and each extra sample draws its video
with ``numpy.random.default_rng([seed, epoch, j])``. Stage-1 lists come from the records'
``extra["stage1_result"]`` (``lavis-c2f merge-stage1``) or from a stage-1 ranks file; they are
read on first use, so building the split without training on it (``evaluate.py``) needs none.

The wrapper lives here (not in :mod:`lavis_c2f.datasets`) and is applied by the
``c2f_corpus_moment_retrieval`` task to its training split (``run.hard_negative_ratio``).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.pipeline.merge import stage1_lists

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _NegativeState:
    negatives: List[List[str]]
    eligible: List[int]
    num_extra: int
    durations: Dict[str, float]


class HardNegativeMomentDataset(Dataset):
    """A moment-retrieval dataset plus hard-negative (query, retrieved non-GT video) samples.

    Args:
        base: the stage-2 dataset (``records``, ``video_features``, ``text_features``,
            ``labels``, ``collater``, ``set_epoch``).
        stage1: per record of ``base`` its ranked ``[[vid, score], ...]`` (None: read
            ``record.extra["stage1_result"]``).
        ratio: extra samples per eligible query and epoch (> 0; 1.0 = one each).
        top_k: negatives are drawn among the first ``top_k`` retrieved videos.
        seed: sampling seed.
    """

    def __init__(self, base, stage1: Union[None, Sequence[Sequence[Sequence[Any]]],
                                           Callable[[], Sequence[Sequence[Sequence[Any]]]]] = None, *,
                 ratio: float = 0.5, top_k: int = 5, seed: int = 0):
        if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0 and math.isfinite(ratio)):
            raise ConfigError(f"run.hard_negative_ratio: expected a number > 0, got {ratio!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"run.hard_negative_top_k: expected a positive integer, got {top_k!r}")
        self.base = base
        self.ratio = float(ratio)
        self.top_k = int(top_k)
        self.seed = int(seed)
        self._stage1 = stage1
        self.epoch = 0
        self._order_epoch = None
        self._order = np.zeros(0, dtype=np.int64)

    @functools.cached_property
    def _state(self) -> _NegativeState:
        """The stage-1 lists turned into negatives, read on first use (a split that is only
        built, e.g. by ``evaluate.py``, never needs them)."""
        stage1 = self._stage1() if callable(self._stage1) else self._stage1
        if stage1 is None:
            stage1 = stage1_lists(self.base.records, None, top_k=self.top_k, where="run.stage1_ranks")
        if len(stage1) != len(self.base.records):
            raise ValueError(f"{len(stage1)} stage-1 lists for {len(self.base.records)} records")
        negatives = [[str(v) for v, _ in list(ranked)[: self.top_k] if str(v) != rec.vid]
                     for rec, ranked in zip(self.base.records, stage1)]
        eligible = [i for i, n in enumerate(negatives) if n]
        durations: Dict[str, float] = {}
        for rec in self.base.records:
            durations.setdefault(rec.vid, float(rec.duration))
        state = _NegativeState(negatives, eligible, int(round(self.ratio * len(eligible))), durations)
        logger.info("%s: %d hard-negative samples per epoch added to %d", getattr(self.base, "name", "train"),
                    state.num_extra, len(self.base))
        return state

    @property
    def negatives(self) -> List[List[str]]:
        """Per record, its retrieved non-GT videos among the first ``top_k``."""
        return self._state.negatives

    @property
    def eligible(self) -> List[int]:
        """Records with at least one retrieved non-GT video."""
        return self._state.eligible

    @property
    def num_extra(self) -> int:
        """Hard-negative samples per epoch."""
        return self._state.num_extra

    @property
    def durations(self) -> Dict[str, float]:
        """Duration in seconds of each video of the base records."""
        return self._state.durations

    # -- LAVIS / runner plumbing
    def __len__(self) -> int:
        return len(self.base) + self.num_extra

    def __getattr__(self, name: str) -> Any:  # records, clip_length, name, ... of the base dataset
        if name == "base" or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        return self.base.collater(samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _epoch_order(self) -> np.ndarray:
        """Record index of each extra sample of the current epoch (drawn once per epoch)."""
        if self._order_epoch != self.epoch:
            st = self._state
            if st.eligible:
                reps = -(-st.num_extra // len(st.eligible))   # ceil: ratio > 1 repeats queries
                rng = np.random.default_rng([self.seed, self.epoch, 1])
                perm = np.concatenate([rng.permutation(len(st.eligible)) for _ in range(max(reps, 1))])
                self._order = np.asarray(st.eligible, dtype=np.int64)[perm[: st.num_extra]]
            else:
                self._order = np.zeros(0, dtype=np.int64)
            self._order_epoch = self.epoch
        return self._order

    # -- samples
    def negative_pair(self, j: int) -> tuple:
        """``(record index, negative vid)`` of extra sample ``j`` in the current epoch."""
        qi = int(self._epoch_order()[j])
        rng = np.random.default_rng([self.seed, self.epoch, int(j), 2])
        negs = self.negatives[qi]
        return qi, negs[int(rng.integers(len(negs)))]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self.base)
        if index < n:
            return self.base[index]
        j = index - n
        if not 0 <= j < self.num_extra:
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        qi, vid = self.negative_pair(j)
        rec = self.base.records[qi]
        video = self.base.video_features(vid)
        query = self.base.text_features(rec.qid)
        neg = MomentRecord(qid=rec.qid, query=rec.query, vid=vid,
                           duration=self.durations.get(vid, math.inf), relevant_windows=[])
        sample = {"qid": rec.qid, "query": rec.query, "vid": vid, "clip_length": self.base.clip_length,
                  "relevant_windows": [], "video_feat": video, "query_feat": query}
        sample.update(self.base.labels(neg, int(video.shape[0]), np.random.default_rng([self.seed, self.epoch, j, 3])))
        return sample
