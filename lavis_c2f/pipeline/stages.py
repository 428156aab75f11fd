"""Stage backends of the coarse-to-fine engine (:mod:`lavis_c2f.pipeline.engine`).

Stage 1 (``rank``):

* :class:`RankedLists`: the lists come with the batch (stage-1 ranks files of the corpus task);
* :class:`IndexStage1`: a trained retriever and a :class:`~lavis_c2f.index.base.StageOneIndex`
  (FAISS pre-filter + exact re-ranking);
* :class:`ZeroShotStage1`: the cosine of the backbone's pooled text embedding with each clip
  (its text-space columns: the CLIP stream of a CLIP+SlowFast corpus),
  ``max`` or top-k mean per video (:mod:`lavis_c2f.models.zero_shot`), exhaustive over the
  corpus (normalised clip features are kept in memory up to :data:`ZERO_SHOT_BANK_BYTES`,
  else streamed in blocks of 256 videos).

Stage 2 (``ground``), over the videos of a :class:`~lavis_c2f.index.corpora.Corpus`:

* :class:`FeatureGrounder`: a trained QD-DETR / MESM grounder
  (:class:`~lavis_c2f.models.grounder.predictor.GrounderPredictor`, every (query, video) pair
  of the engine's batch in batched calls, queries padded like videos), fed the feature streams it was trained on in its order
  (:func:`select_streams`: e.g. CLIP then SlowFast for MESM on a SlowFast+CLIP index).
  Videos longer than the grounder's ``max_v_l`` clips are covered by overlapping chunks of ``max_v_l`` clips (stride half of it); the chunks' windows are shifted
  to the video's time, merged by NMS, and the saliency is averaged where chunks overlap. Empty
  windows (start = end after snapping to clips) and repeated spans are left out.
* :class:`ZeroShotGrounder`: windows from the thresholded, smoothed similarity curve
  (:func:`lavis_c2f.models.zero_shot.ground`).

A zero-shot backend built with ``refuse=MESSAGE`` raises :class:`ConfigError` with it when used
(the demo corpus: its text and video features live in unrelated spaces).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.index.base import StageOneIndex
from lavis_c2f.index.corpora import Corpus
from lavis_c2f.models import zero_shot as zs
from lavis_c2f.models.grounder.postprocess import PostProcessConfig
from lavis_c2f.models.grounder.predictor import GrounderPredictor
from lavis_c2f.ops.batching import padded_index
from lavis_c2f.ops.spans import nms_rows
from lavis_c2f.ops.vectors import l2_normalize
from lavis_c2f.pipeline.engine import Grounding, Query, Ranked
from lavis_c2f.video.encoded import EncodedVideo

ZERO_SHOT_BANK_BYTES = 1 << 30  # keep normalised clip features in memory up to this size
CHUNK_NMS = 0.7                 # NMS of chunk windows when the grounder's post-processing has none
_ZS_BLOCK = 256


def check_input_widths(retriever: Any, grounder: Any, text_encoder: Any, stage1_dim: int,
                       grounder_dims: Sequence[int], source: str, streams: Optional[Sequence[str]] = None) -> None:
    """:class:`ConfigError` when a trained model's input widths differ from what the encoders
    give: the clip features of ``source`` that stage 1 reads (``stage1_dim``, the text-space
    columns) and the streams the grounder reads (``grounder_dims``, named ``streams``; it may
    add the 2 TEF columns), the text encoder's sentence embeddings (``dim``) and tokens
    (``text_dim``)."""
    who = f"the {getattr(text_encoder, 'name', type(text_encoder).__name__)} encoder"
    pooled_dim = int(getattr(text_encoder, "dim", 0))
    token_dim = int(getattr(text_encoder, "text_dim", pooled_dim))
    r = retriever
    if r is not None:
        if int(r.video_input_dim) != stage1_dim:
            raise ConfigError(f"the retriever expects {r.video_input_dim}-d clip features (video_input_dim) but "
                              f"{source} gives {stage1_dim}-d features: use a retriever trained on features of this "
                              "backbone")
        if int(r.text_input_dim) != pooled_dim:
            raise ConfigError(f"the retriever expects {r.text_input_dim}-d query features (text_input_dim) but "
                              f"{who} gives {pooled_dim}-d sentence embeddings")
        if r.use_frame_word and token_dim != int(r.text_input_dim):
            raise ConfigError(f"the retriever's frame-word level needs {r.text_input_dim}-d token features but "
                              f"{who} gives {token_dim}-d tokens")
    if grounder is not None:
        detr = getattr(grounder, "detr", grounder)
        vd, td = int(detr.vid_dim), int(detr.txt_dim)
        gd = int(sum(grounder_dims))
        named = f" (streams {'+'.join(streams)})" if streams else ""
        if vd not in (gd, gd + 2):
            raise ConfigError(f"the grounder expects {vd}-d clip features (vid_dim, TEF columns included) but "
                              f"{source} gives {gd}-d features{named} (+2 TEF = {gd + 2}): use a grounder "
                              "trained on features of this backbone")
        if getattr(detr, "text_encoder", None) is None and td != token_dim:
            raise ConfigError(f"the grounder expects {td}-d query token features (txt_dim) but {who} gives "
                              f"{token_dim}-d tokens")


def select_streams(names: Sequence[str], dims: Sequence[int], want: Optional[Sequence[str]]
                   ) -> Tuple[Optional[np.ndarray], List[int]]:
    """Feature columns of the streams ``want`` (names among ``names``, the stored order with
    widths ``dims``), in ``want``'s order, and their widths. ``(None, dims)``: the features as
    stored (``want`` None or equal to ``names``, or a single stored stream)."""
    if not want or list(want) == list(names) or len(names) == 1:
        return None, [int(d) for d in dims]
    starts = np.concatenate([[0], np.cumsum(dims)]).astype(int)
    cols: List[int] = []
    out: List[int] = []
    for w in want:
        if list(names).count(w) != 1:
            raise ConfigError(f"the grounder reads the feature stream {w!r} but the index has {list(names)}")
        i = list(names).index(w)
        cols.extend(range(starts[i], starts[i] + int(dims[i])))
        out.append(int(dims[i]))
    return np.asarray(cols, dtype=np.int64), out


def _text_view(features: np.ndarray, columns: Optional[Tuple[int, int]]) -> np.ndarray:
    """The ``[a, b)`` columns of (L, D) features that live in the text space (None: all)."""
    return features if columns is None else features[:, columns[0]:columns[1]]


# =========================================================================== stage 1
class RankedLists:
    """Stage-1 lists given with the batch (one per query, in batch order)."""

    def __init__(self, lists: Sequence[Sequence[Sequence[Any]]]):
        self.lists = lists

    def rank(self, queries: Sequence[Query], k: int) -> List[Ranked]:
        if len(self.lists) != len(queries):
            raise ValueError(f"{len(self.lists)} stage-1 lists for {len(queries)} queries")
        return [[(str(v), float(s)) for v, s in lst] for lst in self.lists]


class IndexStage1:
    """A trained retriever searching a stage-1 index.

    Args:
        index: the :class:`StageOneIndex` (the retriever already attached).
        retriever: the stage-1 model (``encode_text``, ``text_input_dim``).
    """

    def __init__(self, index: StageOneIndex, retriever: Any):
        self.index, self.retriever = index, retriever

    def encode(self, queries: Sequence[Query]):
        """The retriever's ``TextEmbedding`` of the batch: L2-normalised pooled embeddings, and
        the token features (padded, masked) when their width is the retriever's input width.
        A batch is encoded as at least :data:`~lavis_c2f.ops.batching.GEMM_MIN_ROWS` rows (the last
        query repeated), so a query's embedding is the same alone and in a batch."""
        r = self.retriever
        n = len(queries)
        queries = [queries[i] for i in padded_index(n)]
        width = int(r.text_input_dim)
        use_tokens = all(q.tokens is not None and q.tokens.shape[-1] == width for q in queries)
        tok = mask = None
        if use_tokens:
            t_max = max(q.tokens.shape[0] for q in queries)
            tok = torch.zeros(len(queries), t_max, width)
            mask = torch.zeros(len(queries), t_max)
            for i, q in enumerate(queries):
                tok[i, : q.tokens.shape[0]] = torch.from_numpy(l2_normalize(q.tokens))
                mask[i, : q.tokens.shape[0]] = 1.0
        pooled = torch.from_numpy(np.stack([l2_normalize(q.pooled) for q in queries]))
        with torch.no_grad():
            return r.encode_text(tok, mask, pooled)[:n]

    def rank(self, queries: Sequence[Query], k: int) -> List[Ranked]:
        if not queries:
            return []
        return self.index.search(self.encode(queries), k=k)


class ZeroShotStage1:
    """Zero-shot retrieval over a corpus (module docstring).

    Args:
        corpus: the :class:`Corpus` searched.
        config: :class:`~lavis_c2f.models.zero_shot.ZeroShotConfig`.
        refuse: raise :class:`ConfigError` with this message when used.
        columns: the ``[a, b)`` feature columns in the text space (the CLIP stream of a
            CLIP+SlowFast corpus); None: all.
    """

    def __init__(self, corpus: Corpus, config: zs.ZeroShotConfig, refuse: Optional[str] = None,
                 columns: Optional[Tuple[int, int]] = None):
        self.corpus, self.config, self.refuse = corpus, config, refuse
        self.columns = None if columns is None else (int(columns[0]), int(columns[1]))
        self.dim = corpus.dim if columns is None else self.columns[1] - self.columns[0]
        self._bank: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._bank_checked = False

    def rank(self, queries: Sequence[Query], k: int) -> List[Ranked]:
        if self.refuse:
            raise ConfigError(self.refuse)
        return [self._rank_one(q.pooled, k) for q in queries]

    def _rank_one(self, text_pooled: np.ndarray, k: int) -> Ranked:
        corpus = self.corpus
        vids = corpus.vids
        if not vids:
            return []
        t = l2_normalize(np.asarray(text_pooled, np.float32).reshape(-1))
        if t.shape[0] != self.dim:
            raise ConfigError(f"the text embedding is {t.shape[0]}-d but the {corpus.kind}'s clip features are "
                              f"{self.dim}-d")
        scores = np.empty(len(vids), np.float64)
        bank = self._in_memory_bank()
        if bank is not None:
            flat, offsets = bank
            sims = flat @ t
            for i in range(len(vids)):
                scores[i] = zs.video_score(sims[offsets[i]:offsets[i + 1]], self.config)
        else:
            for s in range(0, len(vids), _ZS_BLOCK):
                feats = [_text_view(corpus.features(v), self.columns) for v in vids[s:s + _ZS_BLOCK]]
                scores[s:s + len(feats)] = zs.video_scores(t, feats, self.config)
        order = sorted(range(len(vids)), key=lambda i: (-scores[i], i))[:k]
        return [(vids[i], float(scores[i])) for i in order if np.isfinite(scores[i])]

    def _in_memory_bank(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(normalised clip features of every video back to back, offsets), or None when the
        clip counts are unknown or the bank would exceed :data:`ZERO_SHOT_BANK_BYTES`."""
        if not self._bank_checked:
            self._bank_checked = True
            corpus = self.corpus
            vids = corpus.vids
            counts = [corpus.n_clips(v) for v in vids]
            if any(c is None for c in counts) or sum(counts) * corpus.dim * 4 > ZERO_SHOT_BANK_BYTES:
                return None
            feats = [l2_normalize(_text_view(corpus.features(v), self.columns)) for v in vids]
            offsets = np.zeros(len(vids) + 1, np.int64)
            offsets[1:] = np.cumsum([f.shape[0] for f in feats])
            flat = np.concatenate(feats, 0) if feats else np.zeros((0, self.dim), np.float32)
            self._bank = (flat.astype(np.float32), offsets)
        return self._bank


# =========================================================================== stage 2
def _videos_of(corpus: Optional[Corpus], pairs: Sequence[Tuple[int, str]]) -> Dict[int, List[EncodedVideo]]:
    if corpus is None:
        raise ConfigError("grounding videos by id needs a corpus (an index of videos or the demo corpus)")
    out: Dict[int, List[EncodedVideo]] = {}
    for qi, vid in pairs:
        out.setdefault(qi, []).append(corpus.encoded(vid))
    return out


def _per_pair(queries: Sequence[Query], pairs: Sequence[Tuple[int, str]], corpus: Optional[Corpus],
              ground_videos) -> List[Grounding]:
    """Ground each query's videos in one call, back in pair order."""
    by_query = _videos_of(corpus, pairs)
    done = {qi: iter(ground_videos(queries[qi], videos)) for qi, videos in by_query.items()}
    return [next(done[qi]) for qi, _ in pairs]


class FeatureGrounder:
    """A trained grounder over per-clip features, long videos in chunks (module docstring).

    Args:
        grounder: the stage-2 model (``c2f_qd_detr`` / ``c2f_mesm_qd_detr`` or a bare QD-DETR).
        postprocess: its post-processing (default: the model's).
        stream_dims: widths of the feature streams the grounder reads, in its order (each is
            L2-normalised on its own; no TEF).
        corpus: the corpus whose videos :meth:`ground` reads (None: :meth:`ground_videos` only).
        columns: the feature columns of those streams in that order (:func:`select_streams`);
            None: the features as stored.
    """

    def __init__(self, grounder: Any, postprocess: Optional[PostProcessConfig], stream_dims: Sequence[int],
                 corpus: Optional[Corpus] = None, columns: Optional[np.ndarray] = None):
        self.grounder, self.postprocess, self.corpus = grounder, postprocess, corpus
        self.stream_dims, self.columns = [int(d) for d in stream_dims], columns
        self.detr = getattr(grounder, "detr", grounder)
        self._predictors: Dict[float, GrounderPredictor] = {}

    def predictor_for(self, clip_length: float) -> GrounderPredictor:
        """The :class:`GrounderPredictor` of features sampled every ``clip_length`` seconds."""
        key = float(clip_length)
        if key not in self._predictors:
            self._predictors[key] = GrounderPredictor(self.grounder, clip_length=key, postprocess=self.postprocess,
                                                      stream_dims=self.stream_dims, device=None)
        return self._predictors[key]

    def query_input(self, q: Query):
        """The text for a runtime text encoder, else the query's token features cut as the
        datasets cut them (``max_q_l``; SS-MESM appends one reconstruction token)."""
        if getattr(self.detr, "text_encoder", None) is not None:
            return q.text
        limit = int(getattr(self.detr, "max_q_l", 0) or q.tokens.shape[0]) - (1 if getattr(self.detr, "rec_ss", False)
                                                                              else 0)
        return q.tokens[: max(1, limit)]

    def ground(self, queries: Sequence[Query], pairs: Sequence[Tuple[int, str]]) -> List[Grounding]:
        """Every (query, video) pair of the batch in batched grounder calls (all queries together)."""
        if self.corpus is None:
            raise ConfigError("grounding videos by id needs a corpus (an index of videos or the demo corpus)")
        return self._ground_pairs([queries[qi] for qi, _ in pairs], [self.corpus.encoded(vid) for _, vid in pairs])

    def ground_videos(self, q: Query, videos: Sequence[EncodedVideo]) -> List[Grounding]:
        """Groundings of one query in several videos (batched)."""
        return self._ground_pairs([q] * len(videos), videos)

    def _ground_pairs(self, queries: Sequence[Query], videos: Sequence[EncodedVideo]) -> List[Grounding]:
        """Grounding of ``queries[i]`` in ``videos[i]`` for every i (grouped by clip length)."""
        res: List[Optional[Grounding]] = [None] * len(videos)
        by_cl: Dict[float, List[int]] = {}
        for i, v in enumerate(videos):
            by_cl.setdefault(float(v.clip_length), []).append(i)
        for cl, idx in by_cl.items():
            feats = [videos[i].features if self.columns is None else videos[i].features[:, self.columns] for i in idx]
            for i, g in zip(idx, self._ground_chunked([queries[i] for i in idx], [videos[i] for i in idx], feats, cl)):
                res[i] = g
        return res  # type: ignore[return-value]

    def _ground_chunked(self, queries: Sequence[Query], videos: Sequence[EncodedVideo],
                        features: Sequence[np.ndarray], clip_length: float) -> List[Grounding]:
        gp = self.predictor_for(clip_length)
        max_len = int(gp.max_v_l)
        inputs: Dict[int, Any] = {}
        chunks, durs, owner, chunk_q = [], [], [], []
        for vi, v in enumerate(videos):
            q = queries[vi]
            if id(q) not in inputs:                        # one prepared input per query object
                inputs[id(q)] = self.query_input(q)
            n = features[vi].shape[0]
            if n == 0:
                raise ValueError("a video has no clips")
            starts = [0]
            if n > max_len:
                stride = max(1, max_len // 2)
                starts = list(range(0, n - max_len + 1, stride))
                if starts[-1] + max_len < n:
                    starts.append(n - max_len)
            for s in starts:
                part = features[vi][s:s + max_len]
                chunks.append(part)
                durs.append(max(1e-3, min(part.shape[0] * clip_length, v.duration - s * clip_length)))
                owner.append((vi, s))
                chunk_q.append(inputs[id(q)])
        preds = gp.predict_pairs(chunk_q, chunks, durs)
        nms = gp.postprocess.nms_threshold if gp.postprocess.nms_threshold is not None else CHUNK_NMS
        parts_of: Dict[int, List[Tuple[int, Dict[str, List]]]] = {}
        for (o, s), p in zip(owner, preds):
            parts_of.setdefault(o, []).append((s, p))
        out = []
        for vi, v in enumerate(videos):
            n, duration = features[vi].shape[0], v.duration
            sal_sum, sal_cnt = np.zeros(n, np.float64), np.zeros(n, np.float64)
            rows: List[List[float]] = []
            parts = parts_of[vi]
            for s, p in parts:
                off = s * clip_length
                rows.extend([min(a + off, duration), min(b + off, duration), float(sc)] for a, b, sc in p["windows"])
                sal = np.asarray(p["saliency"], np.float64)
                sal_sum[s:s + len(sal)] += sal
                sal_cnt[s:s + len(sal)] += 1
            rows.sort(key=lambda r: -r[2])
            rows = _distinct_windows(rows)
            if len(parts) > 1:
                rows = nms_rows(rows, float(nms), max_keep=max(10, len(rows)))
            sal = np.where(sal_cnt > 0, sal_sum / np.maximum(sal_cnt, 1), 0.0).astype(np.float32)
            out.append(Grounding(windows=[[float(a), float(b), float(c)] for a, b, c in rows], saliency=sal,
                                 duration=float(duration)))
        return out


def _distinct_windows(rows: List[List[float]]) -> List[List[float]]:
    """Rows (best first) without empty windows (``end <= start``, which clip snapping can
    produce) and without repeats of a span already listed."""
    seen, out = set(), []
    for r in rows:
        key = (round(r[0], 6), round(r[1], 6))
        if r[1] > r[0] and key not in seen:
            seen.add(key)
            out.append(r)
    return out


class ZeroShotGrounder:
    """Zero-shot grounding (module docstring).

    Args:
        config: :class:`~lavis_c2f.models.zero_shot.ZeroShotConfig`.
        corpus: the corpus whose videos :meth:`ground` reads.
        refuse: raise :class:`ConfigError` with this message when used.
        columns: the ``[a, b)`` feature columns in the text space; None: all.
    """

    def __init__(self, config: zs.ZeroShotConfig, corpus: Optional[Corpus] = None, refuse: Optional[str] = None,
                 columns: Optional[Tuple[int, int]] = None):
        self.config, self.corpus, self.refuse, self.columns = config, corpus, refuse, columns

    def ground(self, queries: Sequence[Query], pairs: Sequence[Tuple[int, str]]) -> List[Grounding]:
        return _per_pair(queries, pairs, self.corpus, self.ground_videos)

    def ground_videos(self, q: Query, videos: Sequence[EncodedVideo]) -> List[Grounding]:
        if self.refuse:
            raise ConfigError(self.refuse)
        out = []
        for v in videos:
            g = zs.ground(q.pooled, _text_view(v.features, self.columns), v.clip_length, v.duration, self.config)
            out.append(Grounding(windows=[[float(a), float(b), float(c)] for a, b, c in g["windows"]],
                                 saliency=g["saliency"], duration=float(v.duration)))
        return out


__all__ = ["CHUNK_NMS", "FeatureGrounder", "IndexStage1", "RankedLists", "ZERO_SHOT_BANK_BYTES", "ZeroShotGrounder",
           "ZeroShotStage1", "check_input_widths", "select_streams"]
