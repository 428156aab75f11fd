"""Stateless stage-2 predictor: windows and saliency of one query in one or many videos.

    predictor = GrounderPredictor(model, clip_length=2.0)
    predictor.predict(query_features, video_features, duration)
        -> {"windows": [[st, ed, score], ...], "saliency": [...]}        # seconds
    predictor.predict_many(query_features, [video_features, ...], [duration, ...])
    predictor.predict_pairs([query, query, other_query], [video, ...], [duration, ...])

Inputs are raw per-item arrays (``numpy`` or ``torch``): query token features (Lt, Dt) (or
the query text for a MESM model with a runtime text encoder) and clip features (Lv, Dv)
**without** TEF columns; the predictor L2-normalises them (per feature stream, like the
datasets do), appends the TEF columns when the model expects them, pads a batch and runs the
model in eval mode without the negative pass. Videos longer than ``max_v_l`` clips are cut
(as the datasets do) and their windows then cover the first ``max_v_l · clip_length``
seconds.

Batching many videos for one query is exact: the predictor uses the batch-independent T2V
mask (``t2v_mask_mode="correct"``, identical to the official one at batch size 1), so a
video's windows do not depend on which other videos share its batch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from lavis_c2f.models.grounder.model import QDDETR
from lavis_c2f.ops.vectors import l2_normalize, tef_columns
from lavis_c2f.models.grounder.postprocess import PostProcessConfig, postprocess_sample

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_tensor(x: Any, name: str, ndim: int) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


class GrounderPredictor:
    """Moment windows for (query, video) pairs from a trained grounder.

    Args:
        model: a :class:`~.model.QDDETR` / :class:`~.mesm.MESMQDDETR` or a registered LAVIS
            wrapper (``c2f_qd_detr`` / ``c2f_mesm_qd_detr``; its post-processing settings are
            the default).
        clip_length: seconds per clip of the features.
        postprocess: post-processing settings (default: the wrapper's, else the defaults).
        use_tef: whether to append TEF columns; None = infer from the model's input width.
        normalize: L2-normalise query tokens and each video stream.
        stream_dims: widths of the concatenated video streams (each normalised separately);
            None = one stream.
        max_v_l: cut videos to this many clips; None = the model's ``max_v_l``.
        batch_size: (query, video) pairs per forward pass in :meth:`predict_many` / :meth:`predict_pairs`.
        t2v_mask_mode: T2V mask used for prediction (default ``"correct"``, see module doc).
        device: run there (default: the model's device).
    """

    def __init__(self, model: nn.Module, clip_length: float, *,
                 postprocess: Optional[PostProcessConfig] = None, use_tef: Optional[bool] = None,
                 normalize: bool = True, stream_dims: Optional[Sequence[int]] = None,
                 max_v_l: Optional[int] = None, batch_size: int = 100,
                 t2v_mask_mode: str = "correct", device: Optional[Union[str, torch.device]] = None):
        detr = getattr(model, "detr", model)
        if not isinstance(detr, QDDETR):
            raise TypeError(f"model must be a QDDETR (or a c2f grounder wrapper), got "
                            f"{type(model).__name__}")
        if detr.aud_dim:
            raise ValueError("models with audio inputs (aud_dim > 0) are not supported by the "
                             "predictor")
        if not clip_length > 0:
            raise ValueError(f"clip_length must be positive, got {clip_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.detr = detr
        self.clip_length = float(clip_length)
        self.postprocess = postprocess or getattr(model, "postprocess", None) or PostProcessConfig()
        self.normalize = normalize
        self.max_v_l = detr.max_v_l if max_v_l is None else int(max_v_l)
        self.batch_size = batch_size
        self.t2v_mask_mode = t2v_mask_mode
        self.device = torch.device(device) if device is not None else next(detr.parameters()).device
        expected = detr.vid_dim
        self.stream_dims = None if stream_dims is None else [int(d) for d in stream_dims]
        if use_tef is None:
            raw_dim = sum(self.stream_dims) if self.stream_dims else None
            use_tef = (raw_dim + 2 == expected) if raw_dim is not None else None
        self.use_tef = use_tef
        self.text_encoder = getattr(detr, "text_encoder", None)

    # ------------------------------------------------------------------ preparation
    def _video(self, feats: ArrayLike, index: int) -> torch.Tensor:
        name = f"video_features[{index}]" if index >= 0 else "video_features"
        v = _as_tensor(feats, name, 2)
        if v.shape[0] == 0:
            raise ValueError(f"{name} has no clips")
        dims = self.stream_dims or [v.shape[1]]
        if sum(dims) != v.shape[1]:
            raise ValueError(f"{name} width {v.shape[1]} != sum of stream_dims {sum(dims)}")
        use_tef = self.use_tef
        if use_tef is None:
            use_tef = v.shape[1] + 2 == self.detr.vid_dim
        width = v.shape[1] + (2 if use_tef else 0)
        if width != self.detr.vid_dim:
            raise ValueError(f"{name} width {v.shape[1]}{' + 2 TEF' if use_tef else ''} does not "
                             f"match the model's vid_dim {self.detr.vid_dim} (features without TEF "
                             f"are expected)")
        v = v[:self.max_v_l]
        if self.normalize:
            v = torch.cat([l2_normalize(part) for part in torch.split(v, dims, dim=1)], dim=1)
        if use_tef:
            v = torch.cat([v, torch.from_numpy(tef_columns(v.shape[0]))], dim=1)
        return v

    def _query(self, query: Union[ArrayLike, str]) -> Dict[str, torch.Tensor]:
        if isinstance(query, str):
            if self.text_encoder is None:
                raise TypeError("this model takes query token features, not text")
            if not query.strip():
                raise ValueError("query text is empty")
            ids, mask, _ = self.text_encoder.tokenize([query])
            return {"txt_ids": ids, "src_txt_mask": mask}
        if self.text_encoder is not None:
            raise TypeError("this model runs its own text encoder: pass the query text")
        q = _as_tensor(query, "query_features", 2)
        if q.shape[0] == 0:
            raise ValueError("query_features has no tokens (empty query)")
        if q.shape[1] != self.detr.txt_dim:
            raise ValueError(f"query_features width {q.shape[1]} != the model's txt_dim "
                             f"{self.detr.txt_dim}")
        if self.normalize:
            q = l2_normalize(q)
        return {"src_txt": q[None], "src_txt_mask": torch.ones(1, q.shape[0])}

    @contextlib.contextmanager
    def _eval(self):
        was_training = self.detr.training
        self.detr.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.detr.train(was_training)

    # ------------------------------------------------------------------ API
    def predict(self, query_features: Union[ArrayLike, str], video_features: ArrayLike,
                duration: float) -> Dict[str, List]:
        """Windows (seconds, best first) and per-clip saliency of one (query, video) pair.

        Args:
            query_features: (Lt, Dt) token features (or the query text, runtime-text models).
            video_features: (Lv, Dv) clip features without TEF.
            duration: video duration in seconds (> 0).
        """
        return self.predict_many(query_features, [video_features], [duration])[0]

    def predict_many(self, query_features: Union[ArrayLike, str],
                     videos: Sequence[ArrayLike], durations: Sequence[float]
                     ) -> List[Dict[str, List]]:
        """:meth:`predict` for one query and several videos (e.g. its top-K), batched.

        Returns one ``{"windows", "saliency"}`` dict per video, in input order.
        """
        if isinstance(videos, (np.ndarray, torch.Tensor)):
            raise TypeError("videos must be a sequence of (Lv, Dv) arrays, one per video")
        return self.predict_pairs([query_features] * len(videos), videos, durations)

    def predict_pairs(self, queries: Sequence[Union[ArrayLike, str]], videos: Sequence[ArrayLike],
                      durations: Sequence[float]) -> List[Dict[str, List]]:
        """:meth:`predict` for (query, video) pairs of many queries, batched: pair ``i`` is
        ``queries[i]`` in ``videos[i]`` (repeat the same query object for its videos: it is
        prepared once). Query tokens are padded and masked within a batch like videos, so a
        pair's windows do not depend on the pairs batched with it (up to float rounding).

        Returns one ``{"windows", "saliency"}`` dict per pair, in input order.
        """
        if isinstance(videos, (np.ndarray, torch.Tensor)):
            raise TypeError("videos must be a sequence of (Lv, Dv) arrays, one per pair")
        if not (len(queries) == len(videos) == len(durations)):
            raise ValueError(f"{len(queries)} queries, {len(videos)} videos and {len(durations)} durations: "
                             "one of each per pair")
        if len(videos) == 0:
            return []
        for i, d in enumerate(durations):
            if not (isinstance(d, (int, float, np.floating, np.integer)) and np.isfinite(d) and d > 0):
                raise ValueError(f"durations[{i}] must be a positive number, got {d!r}")
        prepared_q: Dict[int, Dict[str, torch.Tensor]] = {}
        for q in queries:
            if id(q) not in prepared_q:
                prepared_q[id(q)] = self._query(q)
        qs = [prepared_q[id(q)] for q in queries]
        prepared = [self._video(v, i) for i, v in enumerate(videos)]
        results: List[Dict[str, List]] = []
        with self._eval():
            for start in range(0, len(prepared), self.batch_size):
                end = start + self.batch_size
                results.extend(self._run(qs[start:end], prepared[start:end], durations[start:end]))
        return results

    @staticmethod
    def _stack_queries(queries: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """One query dict per pair -> the batch's (B, Lt[, Dt]) tensors, right-padded (mask 0)."""
        if all(q is queries[0] for q in queries):
            return {k: t.expand(len(queries), *t.shape[1:]) for k, t in queries[0].items()}
        length = max(int(q["src_txt_mask"].shape[1]) for q in queries)
        out = {}
        for k in queries[0]:
            parts = [q[k] for q in queries]
            pad = [length - p.shape[1] for p in parts]
            out[k] = torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, n)) for p, n in zip(parts, pad)])
        return out

    def _run(self, queries: Sequence[Dict[str, torch.Tensor]], videos: List[torch.Tensor],
             durations: Sequence[float]) -> List[Dict[str, List]]:
        bsz, length = len(videos), max(v.shape[0] for v in videos)
        src_vid = torch.zeros(bsz, length, videos[0].shape[1])
        src_vid_mask = torch.zeros(bsz, length)
        for i, v in enumerate(videos):
            src_vid[i, :v.shape[0]] = v
            src_vid_mask[i, :v.shape[0]] = 1.0
        dev = self.device
        kwargs: Dict[str, Any] = {k: t.to(dev) for k, t in self._stack_queries(queries).items()}
        kwargs.setdefault("src_txt", None)
        out = self.detr(src_vid=src_vid.to(dev), src_vid_mask=src_vid_mask.to(dev),
                        compute_neg=False, t2v_mask_mode=self.t2v_mask_mode,
                        **({"compute_rec": False} if hasattr(self.detr, "rec_fw") else {}),
                        **kwargs)
        res = []
        for i, v in enumerate(videos):
            used = min(float(durations[i]), v.shape[0] * self.clip_length)
            res.append(postprocess_sample(out["pred_logits"][i].cpu(), out["pred_spans"][i].cpu(),
                                          out["saliency_scores"][i, :v.shape[0]].cpu(), used,
                                          self.clip_length, self.postprocess))
        return res
