"""Stage-1 dataset over decoded video frames: end-to-end (CLIP-tower) text -> video retrieval.

The frames counterpart of :class:`~lavis_c2f.datasets.video_retrieval.VideoRetrievalDataset`,
with the same bookkeeping (``queries``, ``videos``, ``gt_video_index``, ``query_batch``,
``video_batch``) so the ``c2f_video_retrieval`` task trains and evaluates it alike.

Per video: probe the file (:func:`lavis_c2f.video.probe.probe`), choose frame indices with a
:class:`~lavis_c2f.video.frame_sampling.FrameSampling` (T-MASS's or CLIP4Clip's rule), decode
them (:func:`~lavis_c2f.video.decode.decode_frames`: decord, PyAV fallback), and turn them into
CLIP input with a :class:`~lavis_c2f.processors.clip_processors.ClipFrameProcessor` (train or
eval transform). Padding slots (CLIP4Clip's rule only) are zero frames with mask 0. Random
choices (``rand`` frame picks, train crops and flips) come from generators seeded by
``(seed, epoch, item index)``, so an epoch is the same whatever the number of workers.

Texts are tokenised per batch by a :class:`~lavis_c2f.processors.clip_processors.ClipTokenizer`
(padding to the batch's longest text, as T-MASS, or to ``max_words``).

Batches (docs/ARCHITECTURE.md, "Retrieval batch (stage 1, frames)"):

* ``collater`` (training pairs): ``txt_input_ids``, ``txt_attention_mask`` (B, L) int64,
  ``vid_pixels`` (B, F, 3, S, S) float32, ``vid_pixels_mask`` (B, F) float32, ``qid``,
  ``query``, ``vid`` lists, ``video_index`` (B,) long;
* ``query_batch``: the text keys + ``qid``, ``query``, ``gt_video_index``;
* ``video_batch``: ``vid_pixels``, ``vid_pixels_mask``, ``vid``.

A video that cannot be decoded raises :class:`~lavis_c2f.video.decode.VideoDecodeError` naming
the file and the reason.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, List, Mapping, Sequence

import numpy as np
import torch

from lavis_c2f.data.records import MomentRecord
from lavis_c2f.datasets.video_retrieval import RetrievalPairs
from lavis_c2f.processors.clip_processors import ClipFrameProcessor
from lavis_c2f.video.decode import decode_frames
from lavis_c2f.video.probe import VideoInfo, probe
from lavis_c2f.video.frame_sampling import FrameSampling


def _seed(*parts: Any) -> int:
    """A 63-bit seed from any hashable parts (stable across processes and Python runs)."""
    h = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class VideoFramesRetrievalDataset(RetrievalPairs):
    """(query, GT video) pairs over decoded frames (module docstring).

    Args:
        records: annotations; each query's GT video is ``record.vid``.
        video_paths: vid -> video file, for every vid of ``records``.
        sampling: which frames (rule, ``num_frames``, train/eval picks).
        frame_processor: ``c2f_clip_frames`` transform for this split (``mode`` train or eval).
        tokenizer: callable texts -> ``{"input_ids", "attention_mask"}`` (``c2f_clip_tokenizer``).
        train: draw the train-mode frame picks (``sampling.pick_train``) and random transforms.
        seed: base seed of the random choices.
        decode_backend: ``auto`` | ``decord`` | ``pyav``.
    """

    def __init__(self, records: Sequence[MomentRecord], video_paths: Mapping[str, str], *,
                 sampling: FrameSampling, frame_processor: ClipFrameProcessor,
                 tokenizer: Callable[[Sequence[str]], Dict[str, torch.Tensor]], train: bool = False,
                 seed: int = 0, decode_backend: str = "auto", name: str = "video_frames"):
        super().__init__(records, name)
        missing = [v for v in self.videos if v not in video_paths]
        if missing:
            raise KeyError(f"{name}: no video file for {len(missing)} vid(s), e.g. {missing[:5]}")
        self.video_paths = {v: str(video_paths[v]) for v in self.videos}
        self.sampling = sampling
        self.frame_processor = frame_processor
        self.tokenizer = tokenizer
        self.train = bool(train)
        self.seed = int(seed)
        self.decode_backend = decode_backend
        self._infos: Dict[str, VideoInfo] = {}

    # -- frames
    def frames(self, vid: str, item: int = 0) -> Dict[str, torch.Tensor]:
        """``{"pixels": (F, 3, S, S) float32, "pixel_mask": (F,) float32}`` of video ``vid``;
        ``item`` keys the random choices of a training item."""
        info = self._infos.get(vid)
        if info is None:
            info = self._infos[vid] = probe(self.video_paths[vid])
        rng = np.random.default_rng(_seed(self.seed, self.epoch, item, vid)) if self.train else None
        idx, mask = self.sampling.indices(info.n_frames, info.fps, train=self.train, rng=rng)
        raw = decode_frames(info, idx, backend=self.decode_backend)            # (n, H, W, 3) uint8
        gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, item, vid, "aug")) if self.train else None
        pix = self.frame_processor(raw, generator=gen)
        f = self.sampling.num_frames
        if pix.shape[0] < f:
            pix = torch.cat([pix, pix.new_zeros((f - pix.shape[0],) + tuple(pix.shape[1:]))])
        return {"pixels": pix, "pixel_mask": torch.from_numpy(mask)}

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rec = self.queries[index]
        fr = self.frames(rec.vid, item=index)
        return {"qid": rec.qid, "query": rec.query, "vid": rec.vid, "video_index": self._video_index[rec.vid],
                "pixels": fr["pixels"], "pixel_mask": fr["pixel_mask"]}

    # -- batching
    def _text(self, texts: List[str]) -> Dict[str, torch.Tensor]:
        enc = self.tokenizer(texts)
        return {"txt_input_ids": enc["input_ids"], "txt_attention_mask": enc["attention_mask"]}

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Training pairs -> the frames retrieval batch (module docstring)."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        out = self._text([s["query"] for s in samples])
        out.update({"vid_pixels": torch.stack([s["pixels"] for s in samples]),
                    "vid_pixels_mask": torch.stack([s["pixel_mask"] for s in samples]),
                    "qid": [s["qid"] for s in samples], "query": [s["query"] for s in samples],
                    "vid": [s["vid"] for s in samples],
                    "video_index": torch.tensor([s["video_index"] for s in samples], dtype=torch.long)})
        return out

    def query_batch(self, idx_list: Sequence[int]) -> Dict[str, Any]:
        """Queries ``self.queries[i] for i in idx_list`` -> text keys, ``qid``, ``query``,
        ``gt_video_index`` (B,) long."""
        recs = [self.queries[i] for i in idx_list]
        if not recs:
            raise ValueError("query_batch needs at least one index")
        out = self._text([r.query for r in recs])
        out.update({"qid": [r.qid for r in recs], "query": [r.query for r in recs],
                    "gt_video_index": torch.tensor([self._video_index[r.vid] for r in recs], dtype=torch.long)})
        return out

    def video_batch(self, idx_list: Sequence[int]) -> Dict[str, Any]:
        """Videos ``self.videos[i] for i in idx_list`` -> ``vid_pixels`` (B, F, 3, S, S),
        ``vid_pixels_mask`` (B, F), ``vid`` (the split's frame picks and transform)."""
        vids = [self.videos[i] for i in idx_list]
        if not vids:
            raise ValueError("video_batch needs at least one index")
        frames = [self.frames(v, item=-1 - i) for v, i in zip(vids, idx_list)]
        return {"vid_pixels": torch.stack([f["pixels"] for f in frames]),
                "vid_pixels_mask": torch.stack([f["pixel_mask"] for f in frames]), "vid": vids}
