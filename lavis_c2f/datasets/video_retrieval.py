"""Stage-1 dataset: text -> video retrieval over a split's videos (pre-extracted features).

Training iterates (query, GT video) pairs (``dataset[i]`` + :meth:`collater` -> the
retrieval batch of docs/ARCHITECTURE.md). Evaluation builds the (Q, V) score matrix in
blocks: ``.queries`` (Q records), ``.videos`` (V unique vids in order of first appearance),
:meth:`gt_video_index`, :meth:`query_batch` and :meth:`video_batch`.

Video features carry no TEF columns here (``use_tef`` of the processor is forced off).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from lavis_c2f.data.features import FeatureStore
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.datasets.collate import pad_sequences
from lavis_c2f.processors.feature_processors import TextFeatureProcessor, VideoFeatureProcessor


class RetrievalPairs(Dataset):
    """Bookkeeping shared by the stage-1 datasets: (query, GT video) records, the unique
    videos in order of first appearance and the index maps.

    Attributes:
        queries: the Q records (``record.vid`` is the query's GT video).
        videos: the V unique vids, in order of first appearance.
    """

    def __init__(self, records: Sequence[MomentRecord], name: str):
        self.queries: List[MomentRecord] = list(records)
        self.name = name
        self.videos: List[str] = []
        self._video_index: Dict[str, int] = {}
        for r in self.queries:
            if r.vid not in self._video_index:
                self._video_index[r.vid] = len(self.videos)
                self.videos.append(r.vid)
        self._query_index: Dict[Any, int] = {}
        for i, r in enumerate(self.queries):
            self._query_index.setdefault(r.qid, i)
        self.epoch = 0

    # -- sizes / ids
    def __len__(self) -> int:
        return len(self.queries)

    @property
    def num_videos(self) -> int:
        return len(self.videos)

    def set_epoch(self, epoch: int) -> None:
        """The epoch (datasets with random sampling draw from (seed, epoch, index))."""
        self.epoch = int(epoch)

    def video_index(self, vid: str) -> int:
        """Position of ``vid`` in :attr:`videos` (KeyError naming it if absent)."""
        try:
            return self._video_index[vid]
        except KeyError:
            raise KeyError(f"video {vid!r} is not in {self.name} ({len(self.videos)} videos)") from None

    def gt_video_index(self, qid: Any) -> int:
        """Index in :attr:`videos` of the GT video of query ``qid``."""
        try:
            i = self._query_index[qid]
        except KeyError:
            raise KeyError(f"qid {qid!r} is not in {self.name} ({len(self.queries)} queries)") from None
        return self._video_index[self.queries[i].vid]


class VideoRetrievalDataset(RetrievalPairs):
    """(query, GT video) pairs over pre-extracted features, plus block access for
    corpus-level evaluation.

    Args:
        records: annotations; each query's GT video is ``record.vid``.
        video_stores: one store per video stream.
        text_store: text store with token and pooled fields.
        vis_processor: ``c2f_video_features`` (its TEF is switched off here).
        text_processor: ``c2f_text_features`` (applied to tokens and to the pooled vector).
        text_field / pooled_field: token (``last_hidden_state``) and sentence
            (``pooler_output``) fields of the text store.
        qid_format: text store key of a qid.
    ``dataset[i]``: ``qid, query, vid, video_index`` and ``query_feat`` (Lt, Dt),
    ``txt_pooled`` (Dt,), ``video_feat`` (Lv, Dv).
    """

    def __init__(self, records: Sequence[MomentRecord], video_stores: Sequence[FeatureStore],
                 text_store: FeatureStore, *, vis_processor: Optional[VideoFeatureProcessor] = None,
                 text_processor: Optional[TextFeatureProcessor] = None,
                 text_field: str = "last_hidden_state", pooled_field: str = "pooler_output",
                 qid_format: str = "qid{qid}", name: str = "video_retrieval"):
        if len(video_stores) == 0:
            raise ValueError("need at least one video feature store")
        super().__init__(records, name)
        self.video_stores = list(video_stores)
        self.text_store = text_store
        vp = vis_processor or VideoFeatureProcessor(use_tef=False)
        self.vis_processor = VideoFeatureProcessor(normalize=vp.normalize, max_len=vp.max_len, use_tef=False)
        self.text_processor = text_processor or TextFeatureProcessor()
        self.text_field = text_field
        self.pooled_field = pooled_field
        self.qid_format = qid_format

    # -- features
    def video_features(self, vid: str) -> torch.Tensor:
        """(Lv, Dv) float tensor (normalised, truncated, no TEF)."""
        return self.vis_processor([s.get(vid) for s in self.video_stores])

    def text_features(self, qid: Any) -> torch.Tensor:
        """(Lt, Dt) token features."""
        return self.text_processor(self.text_store.get(self.qid_format.format(qid=qid), self.text_field))

    def pooled_text_features(self, qid: Any) -> torch.Tensor:
        """(Dt,) sentence feature (``pooled_field``), L2-normalised like the tokens."""
        a = self.text_store.get(self.qid_format.format(qid=qid), self.pooled_field)
        if a.ndim == 2 and a.shape[0] == 1:
            a = a[0]
        if a.ndim != 1:
            raise ValueError(f"{self.name}: pooled text feature of qid {qid!r} ({self.pooled_field}) must "
                             f"be (D,), got shape {tuple(a.shape)}")
        return self.text_processor(a)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rec = self.queries[index]
        return {"qid": rec.qid, "query": rec.query, "vid": rec.vid,
                "video_index": self._video_index[rec.vid],
                "query_feat": self.text_features(rec.qid),
                "txt_pooled": self.pooled_text_features(rec.qid),
                "video_feat": self.video_features(rec.vid)}

    # -- batching
    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Pairs -> the retrieval batch: ``src_txt`` (B, Lt, Dt), ``src_txt_mask`` (B, Lt),
        ``txt_pooled`` (B, Dt), ``src_vid`` (B, Lv, Dv), ``src_vid_mask`` (B, Lv),
        ``qid``/``query``/``vid`` lists, ``video_index`` (B,) long (position in :attr:`videos`,
        equal entries = same video, for masking duplicate positives)."""
        return collate_video_retrieval(samples)

    def query_batch(self, idx_list: Sequence[int]) -> Dict[str, Any]:
        """Queries ``self.queries[i] for i in idx_list`` -> ``src_txt`` (B, Lt, Dt),
        ``src_txt_mask`` (B, Lt), ``txt_pooled`` (B, Dt), ``qid``, ``query``, ``gt_video_index``
        (B,) long."""
        recs = [self.queries[i] for i in idx_list]
        if not recs:
            raise ValueError("query_batch needs at least one index")
        src_txt, mask = pad_sequences([self.text_features(r.qid) for r in recs])
        pooled = torch.stack([self.pooled_text_features(r.qid) for r in recs])
        return {"src_txt": src_txt, "src_txt_mask": mask, "txt_pooled": pooled,
                "qid": [r.qid for r in recs], "query": [r.query for r in recs],
                "gt_video_index": torch.tensor([self._video_index[r.vid] for r in recs], dtype=torch.long)}

    def video_batch(self, idx_list: Sequence[int]) -> Dict[str, Any]:
        """Videos ``self.videos[i] for i in idx_list`` -> ``src_vid`` (B, Lv, Dv),
        ``src_vid_mask`` (B, Lv), ``vid`` list."""
        vids = [self.videos[i] for i in idx_list]
        if not vids:
            raise ValueError("video_batch needs at least one index")
        src_vid, mask = pad_sequences([self.video_features(v) for v in vids])
        return {"src_vid": src_vid, "src_vid_mask": mask, "vid": vids}


def collate_video_retrieval(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """See :meth:`VideoRetrievalDataset.collater`."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    src_txt, txt_mask = pad_sequences([s["query_feat"] for s in samples])
    src_vid, vid_mask = pad_sequences([s["video_feat"] for s in samples])
    return {
        "src_txt": src_txt,
        "src_txt_mask": txt_mask,
        "txt_pooled": torch.stack([s["txt_pooled"].to(torch.float32) for s in samples]),
        "src_vid": src_vid,
        "src_vid_mask": vid_mask,
        "qid": [s["qid"] for s in samples],
        "query": [s["query"] for s in samples],
        "vid": [s["vid"] for s in samples],
        "video_index": torch.tensor([s["video_index"] for s in samples], dtype=torch.long),
    }
