"""``lavis-c2f annotate``: fine-grained moment annotations from coarse video-level captions.

Input: a folder of videos and a JSON-lines file of captions, one row per caption::

    {"vid": "clip_001", "caption": "A man opens the fridge. He takes out a bottle of milk."}
    {"video": "kitchen/clip_002.mp4", "caption": "..."}

``vid`` is a video id of the folder (file stem, as ``lavis-c2f extract`` names them); ``video``
may instead give the file's path relative to the folder, its name, or its stem. A caption may
hold several sentences.

Process: each caption is split into sentences (at ``.``, ``!`` or ``?`` followed by white space,
and at line breaks; fragments without a letter are dropped); each sentence is grounded in its
video with :meth:`lavis_c2f.predictor.C2FPredictor.predict` (trained grounder, or the zero-shot
mode without one); windows scoring at least ``min_score`` are kept (at most ``max_windows``,
best first), overlapping kept windows are merged (QVHighlights windows do not overlap), and a
sentence without any such window is dropped. Scores are the grounder's foreground
probabilities in trained mode and in-video contrasts in [0, 1] in zero-shot mode
(:mod:`lavis_c2f.models.zero_shot`).

Output: QVHighlights rows (readable by :func:`lavis_c2f.data.readers.read_annotations`),
written atomically::

    {"qid": new unique int (qid_start, qid_start + 1, ... in input order),
     "query": the sentence, "vid", "duration": seconds,
     "relevant_windows": [[st, ed], ...],
     "relevant_clip_ids": clips whose centre lies in a window (or the clip holding the middle of
                          a window shorter than a clip),
     "saliency_scores": [[a1, a2, a3], ...] one triple per relevant clip,
     "confidence": best window score, "window_scores": [...], "caption_line": int, "mode": str}

Pseudo-annotator saliency: the per-clip saliency of the prediction ``s`` (grounder saliency, or
the smoothed similarity curve) is min-max normalised over the whole video, ``u = (s - min) /
(max - min)`` (0.5 when flat), and three pseudo-annotators quantise ``4 u`` to the 0-4 scale by
floor, round-half-up and ceil: ``a1 = floor(4u)``, ``a2 = floor(4u + 0.5)``, ``a3 = ceil(4u)``.
Their sum tracks ``12 u`` and their spread (at most 1) says how far ``4u`` is from an integer.

Errors: a caption line that is not JSON, lacks ``caption`` / ``vid`` | ``video``, or names a video
that is not in the folder raises :class:`~lavis_c2f.common.errors.DataFormatError` naming the
file, line and field (``skip_missing=True`` skips unknown videos instead, counted). A video that
cannot be decoded is reported and its sentences are dropped (counted as ``videos_failed``).
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from lavis_c2f.common.errors import DataFormatError, VideoDecodeError
from lavis_c2f.common.io import iter_jsonl, write_jsonl
from lavis_c2f.video.probe import list_videos
from lavis_c2f.video.extract import assign_vids

logger = logging.getLogger(__name__)

_SENT_RE = re.compile(r"(?<=[.!?])\s+|[\r\n]+")


def split_sentences(text: str) -> List[str]:
    """Sentences of a caption (module docstring)."""
    out = []
    for s in _SENT_RE.split(str(text)):
        s = " ".join(s.split())
        if any(c.isalpha() for c in s):
            out.append(s)
    return out


def pseudo_annotator_scores(saliency: Sequence[float], clip_ids: Sequence[int]) -> List[List[int]]:
    """Three 0-4 scores per clip of ``clip_ids`` from a per-clip saliency curve (module doc)."""
    s = np.asarray(saliency, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("empty saliency curve")
    span = s.max() - s.min()
    u = (s - s.min()) / span if span > 1e-12 else np.full_like(s, 0.5)
    out = []
    for c in clip_ids:
        x = 4.0 * float(u[int(c)])
        vals = (math.floor(x + 1e-9), math.floor(x + 0.5), math.ceil(x - 1e-9))
        out.append([int(min(4, max(0, v))) for v in vals])
    return out


def merge_windows(rows: Sequence[Sequence[float]]) -> List[List[float]]:
    """Union of overlapping ``[st, ed, score]`` rows (score = the max of the merged ones),
    sorted by start."""
    out: List[List[float]] = []
    for st, ed, sc in sorted(([float(r[0]), float(r[1]), float(r[2])] for r in rows), key=lambda r: (r[0], r[1])):
        if out and st < out[-1][1]:
            out[-1][1] = max(out[-1][1], ed)
            out[-1][2] = max(out[-1][2], sc)
        else:
            out.append([st, ed, sc])
    return out


def clip_ids_of(windows: Sequence[Sequence[float]], clip_length: float, n_clips: int) -> List[int]:
    """Clips whose centre lies in a window, plus the clip holding the middle of each window
    (so that even a window shorter than a clip has one); sorted."""
    ids = set()
    for w in windows:
        st, ed = float(w[0]), float(w[1])
        for c in range(n_clips):
            if st <= (c + 0.5) * clip_length <= ed:
                ids.add(c)
        ids.add(min(n_clips - 1, max(0, int(((st + ed) / 2) // clip_length))))
    return sorted(ids)


@dataclass
class CaptionRow:
    line: int
    vid: str
    path: str
    caption: str


@dataclass
class AnnotateSummary:
    """Counts of one ``annotate`` run."""

    captions: int = 0
    sentences: int = 0
    kept: int = 0
    dropped_low_score: int = 0
    dropped_video_failed: int = 0
    skipped_missing_video: int = 0
    videos: int = 0
    videos_failed: Dict[str, str] = field(default_factory=dict)
    windows: int = 0
    mode: str = ""
    out: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [f"annotate ({self.mode}): {self.captions} captions -> {self.sentences} sentences in {self.videos} "
                 f"videos; kept {self.kept} ({self.windows} windows), dropped {self.dropped_low_score} below "
                 f"--min-score" + (f", {self.dropped_video_failed} of undecodable videos" if self.dropped_video_failed
                                   else "")
                 + (f", skipped {self.skipped_missing_video} captions of missing videos" if self.skipped_missing_video
                    else "")]
        for vid, why in sorted(self.videos_failed.items()):
            lines.append(f"  failed: {vid}: {why}")
        if self.out:
            lines.append(f"wrote {self.kept} annotations to {self.out}")
        return "\n".join(lines)


def _video_lookup(video_dir: str) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """(vid -> path, other names (relative path, with and without extension, file name) -> paths)."""
    root = os.path.abspath(video_dir)
    paths = list_videos(root)
    if not paths:
        raise FileNotFoundError(f"no video files found under {root}")
    by_vid = {v: p for p, v in assign_vids(paths, root).items()}
    names: Dict[str, List[str]] = {}
    for p in paths:
        rel = os.path.relpath(p, root).replace(os.sep, "/")
        for key in {rel, os.path.splitext(rel)[0], os.path.basename(p), os.path.splitext(os.path.basename(p))[0]}:
            names.setdefault(key, []).append(p)
    return by_vid, names


def read_caption_rows(captions_path: str, video_dir: str, skip_missing: bool = False
                      ) -> Tuple[List[CaptionRow], int]:
    """Caption rows with their video file (module docstring); returns (rows, skipped)."""

    by_vid, names = _video_lookup(video_dir)
    vid_of_path = {p: v for v, p in by_vid.items()}
    rows, skipped = [], 0
    for line, obj in iter_jsonl(captions_path):
        if not isinstance(obj, dict):
            raise DataFormatError(f"expected a JSON object, got {type(obj).__name__}", path=captions_path, line=line)
        cap = obj.get("caption")
        if not isinstance(cap, str) or not cap.strip():
            raise DataFormatError("missing or empty 'caption' (a string)", path=captions_path, line=line,
                                  field="caption")
        key = "vid" if "vid" in obj else "video" if "video" in obj else None
        if key is None:
            raise DataFormatError("missing 'vid' (or 'video'): which video the caption describes",
                                  path=captions_path, line=line, field="vid")
        name = obj[key]
        if not isinstance(name, str) or not name.strip():
            raise DataFormatError(f"'{key}' must be a non-empty string, got {name!r}", path=captions_path, line=line,
                                  field=key)
        name = name.strip().replace("\\", "/")
        path = by_vid.get(name) if key == "vid" else None
        if path is None:
            cands = names.get(name, []) or names.get(name.lstrip("./"), [])
            if len(cands) > 1:
                raise DataFormatError(f"{name!r} matches several videos ({', '.join(sorted(cands)[:3])}); give the "
                                      "video's path relative to the folder", path=captions_path, line=line, field=key)
            path = cands[0] if cands else None
        if path is None:
            if skip_missing:
                skipped += 1
                continue
            known = ", ".join(sorted(by_vid)[:5]) + (" ..." if len(by_vid) > 5 else "")
            raise DataFormatError(f"no video {name!r} in {os.path.abspath(video_dir)} (video ids: {known})",
                                  path=captions_path, line=line, field=key)
        rows.append(CaptionRow(line=line, vid=vid_of_path[path], path=path, caption=cap))
    return rows, skipped


def annotate(predictor, video_dir: str, captions_path: str, out_path: str, *, min_score: float = 0.4,
             max_windows: int = 2, qid_start: int = 0, skip_missing: bool = False) -> AnnotateSummary:
    """Run the annotation (module docstring) and write ``out_path``; returns the summary."""
    if int(max_windows) < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    if not 0.0 <= float(min_score) <= 1.0:
        raise ValueError(f"min_score must be in [0, 1], got {min_score}")
    rows, skipped = read_caption_rows(captions_path, video_dir, skip_missing=skip_missing)
    summary = AnnotateSummary(captions=len(rows) + skipped, skipped_missing_video=skipped,
                              mode=f"stage 2 {predictor.mode['stage2']}")
    encoded: Dict[str, Any] = {}
    out_rows: List[Dict[str, Any]] = []
    qid = int(qid_start)
    for row in rows:
        sents = split_sentences(row.caption)
        summary.sentences += len(sents)
        if not sents:
            continue
        if row.vid not in encoded and row.vid not in summary.videos_failed:
            try:
                encoded[row.vid] = predictor.encode_video(row.path, vid=row.vid, captions=False)
                summary.videos += 1
            except VideoDecodeError as e:
                summary.videos_failed[row.vid] = e.reason
                logger.warning("annotate: %s: %s; its sentences are dropped", row.path, e.reason)
        video = encoded.get(row.vid)
        if video is None:
            summary.dropped_video_failed += len(sents)
            continue
        for sent in sents:
            m = predictor.predict(sent, video, top_k=max(10, int(max_windows)), refine=False)
            kept = [w for w in m.windows if float(w[2]) >= float(min_score) and w[1] > w[0]][: int(max_windows)]
            if not kept:
                summary.dropped_low_score += 1
                continue
            merged = merge_windows(kept)
            clips = clip_ids_of(merged, video.clip_length, video.n_clips)
            out_rows.append({
                "qid": qid, "query": sent, "vid": video.vid, "duration": round(float(video.duration), 4),
                "relevant_windows": [[round(a, 4), round(b, 4)] for a, b, _ in merged],
                "relevant_clip_ids": clips,
                "saliency_scores": pseudo_annotator_scores(m.saliency, clips),
                "confidence": round(max(float(w[2]) for w in kept), 4),
                "window_scores": [round(float(s), 4) for _, _, s in merged],
                "caption_line": row.line, "mode": m.mode})
            qid += 1
            summary.kept += 1
            summary.windows += len(merged)
    write_jsonl(out_rows, out_path)
    summary.out = os.fspath(out_path)
    return summary


__all__ = ["AnnotateSummary", "CaptionRow", "annotate", "clip_ids_of", "merge_windows", "pseudo_annotator_scores",
           "read_caption_rows", "split_sentences"]
