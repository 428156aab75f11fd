"""The embedded demo corpus: a small, seeded, *learnable* synthetic video-moment corpus.

It lets the whole chain (stage-1 retrieval training, stage-2 grounding training, coarse-to-
fine evaluation) run in minutes on a CPU with no download. The files use the Moment-DETR /
QVHighlights layout, so every reader, store and dataset of the package handles it unchanged::

    OUT/annotations/{train,val,test}.jsonl      QVHighlights rows (val and test have GT)
    OUT/clip_features/{vid}.npz                 'features' (L, Dv) float32, one row per clip
    OUT/clip_text_features/qid{qid}.npz         'last_hidden_state' (T, Dt), 'pooler_output' (Dt,)
    OUT/corpus.json                             meta: params, version, splits, vids, durations, dims
    OUT/README.md                               this description

Generative process
------------------
All randomness comes from one ``numpy.random.default_rng(seed)``; the output bytes depend only
on the parameters (npz files are written with fixed zip timestamps).

1. **Vocabulary and latents.** A fixed English vocabulary of subjects, adjectives, verbs,
   objects and places, plus function words (``a``, ``the``, ``in`` ...) and two special
   tokens (``<sos>``, ``<eos>``, like CLIP's). Every word ``w`` gets a latent vector
   ``z_w ~ N(0, I_k / k)`` (``k = latent_dim``, norm about 1).
2. **Two different modality maps.** ``A`` (Dt x k) for text and ``B`` (Dv x k) for video,
   independent Gaussian matrices scaled so that ``||A z|| ~ ||z||``, plus a constant offset
   per modality (``modality_offset``; CLIP-like features share a large common direction).
   Because ``A`` and ``B`` are unrelated, the raw cosine between a text and a video feature
   carries no information: a model has to *learn* the cross-modal map.
3. **Queries.** Each query is a concept tuple (subject, optional adjective, verb, object,
   place), unique in the corpus, rendered with one of a few templates, e.g. "A tired chef
   washes the bucket in the garage." With probability ``hard_negative_rate`` a query copies
   2-3 of its concepts from a query of *another* video (hard negatives for stage 1). The query
   meaning is ``m_q = normalise(sum of its concept latents)``.
4. **Text features.** Token ``j`` (word ``w_j``, special tokens included) is
   ``A (z_{w_j} + context_mix * m_q) + text_noise * eps + offset_t`` (eps ~ N(0, I/Dt));
   ``pooler_output`` is the mean of the content-word tokens plus ``text_noise / 2`` noise.
5. **Videos.** ``n_videos`` videos of ``U{min_clips..max_clips}`` clips of ``clip_length``
   seconds (duration = clips x clip_length). Each video has a background latent ``b_v`` and
   ``U{queries_per_video}`` queries; each query gets 1-3 non-overlapping windows
   (probabilities ``window_count_probs``) of ``U{min_window_clips..max_window_clips}``
   clips, aligned to clips. Windows of different queries of a video may overlap.
6. **Clip latents.** ``h_c = background_weight * b_v + sum over windows covering c of
   content_weight * s(c) * m_q``, where ``s`` is a bump (0.5 at the window edges, 1 in the
   middle). A clip covered by no window shows, with probability ``distractor_rate``, a
   *distractor*: 2 concepts of a random query of another video, weighted like content (so a
   video can contain some words of a query without being its answer). Clip features are
   ``B h_c + video_noise * eps + offset_v``.
7. **Saliency.** Each relevant clip (inside a window of the query) gets three annotator
   scores ``clip(round(4 * s(c) + N(0, saliency_noise)), 0, 4)``, as QVHighlights.
8. **Splits** are by *video* (``split_fractions`` of a seeded permutation); qids are
   0..N-1 in video order. Every split has ground truth.

Knobs for difficulty: ``text_noise``, ``video_noise``, ``distractor_rate``,
``hard_negative_rate``, ``background_weight``, ``content_weight``, ``context_mix``,
``latent_dim``. The defaults keep the corpus small (about 300 videos, 1350 queries,
60 MB) and make the ceiling high: a ridge-regression map fitted on train text -> GT clip
features ranks the GT video of val queries first far more often than chance, while the raw
cosine is at chance (see ``tests/unit/data/test_demo_corpus.py``).

A rerun into a complete ``OUT`` made with the same parameters is a no-op; different
parameters raise :class:`DemoCorpusExistsError` unless ``force=True``. Output is written into
a temporary folder beside ``OUT`` and renamed into place at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.cfg import check_keys
from lavis_c2f.data.features import save_npz_deterministic
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.paths import cache_root, resolve_path

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1
SPLITS = ("train", "val", "test")

SUBJECTS = ["man", "woman", "boy", "girl", "chef", "dog", "cat", "teacher", "student", "doctor",
            "farmer", "dancer", "singer", "driver", "baby", "player", "painter", "soldier",
            "tourist", "vlogger", "worker", "runner", "grandmother", "officer"]
ADJECTIVES = ["young", "old", "tall", "smiling", "tired", "happy", "angry", "small", "busy",
              "quiet", "curious", "nervous", "cheerful", "bearded", "sleepy", "calm"]
VERBS = ["opens", "closes", "holds", "throws", "washes", "cuts", "carries", "pushes", "paints",
         "cleans", "fixes", "drops", "kicks", "reads", "grabs", "lifts", "folds", "drags",
         "shakes", "sorts", "catches", "stirs", "wraps", "inspects"]
OBJECTS = ["door", "ball", "bottle", "box", "book", "phone", "bag", "cup", "chair", "laptop",
           "window", "towel", "plate", "knife", "guitar", "bicycle", "umbrella", "basket",
           "camera", "lamp", "bread", "apple", "blanket", "bucket", "hat", "ladder", "mirror",
           "pillow", "rope", "shoe"]
PLACES = ["kitchen", "garden", "street", "beach", "office", "park", "garage", "classroom",
          "bedroom", "market", "forest", "station", "library", "bakery", "gym", "river",
          "rooftop", "hallway", "studio", "farm"]
FUNCTION_WORDS = ["a", "an", "the", "in", "near", "at", "while", "again", "slowly", "<sos>", "<eos>"]
# {S} = subject phrase ("tired chef" or "chef")
TEMPLATES = [
    "a {S} {V} the {O} in the {P}",
    "the {S} {V} a {O} near the {P}",
    "in the {P} a {S} {V} the {O}",
    "at the {P} the {S} slowly {V} the {O}",
    "a {S} {V} the {O} again while in the {P}",
]
SLOTS = ("subject", "adjective", "verb", "object", "place")


class DemoCorpusExistsError(FileExistsError):
    """OUT holds something other than a demo corpus with the requested parameters."""


@dataclass(frozen=True)
class DemoCorpusParams:
    """Generator parameters (all recorded in ``corpus.json``)."""

    seed: int = 0
    n_videos: int = 300
    queries_per_video: Tuple[int, int] = (3, 6)          # inclusive range
    split_fractions: Tuple[float, float, float] = (0.7, 0.15, 0.15)
    clip_length: float = 2.0
    min_clips: int = 15
    max_clips: int = 75
    window_count_probs: Tuple[float, float, float] = (0.6, 0.3, 0.1)  # 1, 2, 3 windows
    min_window_clips: int = 2
    max_window_clips: int = 10
    video_dim: int = 512
    text_dim: int = 512
    latent_dim: int = 64
    adjective_rate: float = 0.5
    hard_negative_rate: float = 0.3
    distractor_rate: float = 0.35
    background_weight: float = 1.0
    content_weight: float = 1.2
    context_mix: float = 0.3
    text_noise: float = 0.3
    video_noise: float = 0.5
    modality_offset: float = 1.0
    saliency_noise: float = 0.6

    def __post_init__(self) -> None:
        errors = []
        if self.n_videos < 3:
            errors.append("n_videos must be >= 3 (one per split)")
        lo, hi = self.queries_per_video
        if not (1 <= lo <= hi):
            errors.append("queries_per_video must be (lo, hi) with 1 <= lo <= hi")
        if len(self.split_fractions) != 3 or any(f <= 0 for f in self.split_fractions):
            errors.append("split_fractions must be three positive numbers")
        if self.clip_length <= 0:
            errors.append("clip_length must be > 0")
        if not (1 <= self.min_clips <= self.max_clips):
            errors.append("need 1 <= min_clips <= max_clips")
        if not (1 <= self.min_window_clips <= self.max_window_clips <= self.min_clips):
            errors.append("need 1 <= min_window_clips <= max_window_clips <= min_clips")
        if len(self.window_count_probs) != 3 or abs(sum(self.window_count_probs) - 1) > 1e-6:
            errors.append("window_count_probs must be 3 probabilities summing to 1")
        for name in ("video_dim", "text_dim", "latent_dim"):
            if getattr(self, name) < 2:
                errors.append(f"{name} must be >= 2")
        for name in ("adjective_rate", "hard_negative_rate", "distractor_rate"):
            if not 0 <= getattr(self, name) <= 1:
                errors.append(f"{name} must be in [0, 1]")
        for name in ("background_weight", "content_weight", "context_mix", "text_noise",
                     "video_noise", "modality_offset", "saliency_noise"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0")
        if errors:
            raise ConfigError("DemoCorpusParams: " + "; ".join(errors))

    def split_sizes(self) -> Tuple[int, int, int]:
        """Videos of (train, val, test): ``split_fractions`` normalised to sum 1 (so they may be
        counts), ``n_val = max(1, round(f_val * n_videos))``, ``n_test`` alike, train the rest.

        Raises:
            ConfigError: no video left for training."""
        fr = np.asarray(self.split_fractions, dtype=float) / sum(self.split_fractions)
        n_val = max(1, int(round(fr[1] * self.n_videos)))
        n_test = max(1, int(round(fr[2] * self.n_videos)))
        n_train = self.n_videos - n_val - n_test
        if n_train < 1:
            raise ConfigError("DemoCorpusParams: split_fractions leave no training video")
        return n_train, n_val, n_test

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DemoCorpusParams":
        d = check_keys(d, {f.name for f in dataclasses.fields(cls)}, "demo corpus parameters")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)


@dataclass
class DemoCorpusData:
    """The generated corpus in memory (before writing).

    Attributes:
        records: split -> list of MomentRecord (QVHighlights fields filled).
        video_features: vid -> (L, Dv) float32.
        text_tokens: qid -> (T, Dt) float32 (``last_hidden_state``).
        text_pooled: qid -> (Dt,) float32 (``pooler_output``).
        durations: vid -> seconds.
        split_of_video: vid -> split.
    """

    params: DemoCorpusParams
    records: Dict[str, List[MomentRecord]]
    video_features: Dict[str, np.ndarray]
    text_tokens: Dict[int, np.ndarray]
    text_pooled: Dict[int, np.ndarray]
    durations: Dict[str, float]
    split_of_video: Dict[str, str]


# --------------------------------------------------------------------------- generation


def _tokens(text: str) -> List[str]:
    return text.replace(",", " ").replace(".", " ").lower().split()


def _render(concepts: Dict[str, Optional[str]], template: str) -> str:
    subj = f"{concepts['adjective']} {concepts['subject']}" if concepts["adjective"] else concepts["subject"]
    s = template.format(S=subj, V=concepts["verb"], O=concepts["object"], P=concepts["place"])
    words = s.split()
    for i in range(len(words) - 1):  # "a old man" -> "an old man"
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    s = " ".join(words)
    return s[0].upper() + s[1:] + "."


def _sample_concepts(rng: np.random.Generator, p: DemoCorpusParams) -> Dict[str, Optional[str]]:
    return {
        "subject": SUBJECTS[rng.integers(len(SUBJECTS))],
        "adjective": ADJECTIVES[rng.integers(len(ADJECTIVES))] if rng.random() < p.adjective_rate else None,
        "verb": VERBS[rng.integers(len(VERBS))],
        "object": OBJECTS[rng.integers(len(OBJECTS))],
        "place": PLACES[rng.integers(len(PLACES))],
    }


def _place_windows(rng: np.random.Generator, n_clips: int, n_windows: int,
                   p: DemoCorpusParams) -> List[Tuple[int, int]]:
    """Non-overlapping clip ranges [a, b) (at least one)."""
    out: List[Tuple[int, int]] = []
    taken = np.zeros(n_clips, dtype=bool)
    for _ in range(n_windows):
        for _attempt in range(20):
            length = int(rng.integers(p.min_window_clips, p.max_window_clips + 1))
            length = min(length, n_clips)
            a = int(rng.integers(0, n_clips - length + 1))
            if not taken[max(0, a - 1): a + length + 1].any():  # keep a gap between windows
                taken[a: a + length] = True
                out.append((a, a + length))
                break
    return sorted(out)


def _bump(length: int) -> np.ndarray:
    """(length,) weights 0.5 at the edges rising to 1 in the middle."""
    pos = (np.arange(length) + 0.5) / length
    return 0.5 + 0.5 * np.sin(np.pi * pos)


@dataclass
class DemoLatents:
    """The first draws of the generator: per-word latents, the two modality maps and offsets."""
    z: Dict[str, np.ndarray]
    A: np.ndarray
    B: np.ndarray
    offset_t: np.ndarray
    offset_v: np.ndarray


def demo_latents(p: DemoCorpusParams, rng: Optional[np.random.Generator] = None) -> DemoLatents:
    """Word latents ``z`` (vocabulary order), text map ``A`` (Dt x k), video map ``B`` (Dv x k)
    and the modality offsets, drawn first from ``rng`` (default: a fresh ``default_rng(p.seed)``).

    :func:`generate_demo_corpus` continues drawing from the same ``rng`` afterwards; the demo
    text encoder (:mod:`lavis_c2f.data.demo_text`) calls this to rebuild the text side.
    """
    rng = np.random.default_rng(p.seed) if rng is None else rng
    k, dt, dv = p.latent_dim, p.text_dim, p.video_dim
    vocab = SUBJECTS + ADJECTIVES + VERBS + OBJECTS + PLACES + FUNCTION_WORDS
    z = {w: rng.standard_normal(k) / np.sqrt(k) for w in vocab}
    # entries of A z have variance ||z||^2 / dt, so ||A z|| ~ ||z|| (same for B)
    A = rng.standard_normal((dt, k)) / np.sqrt(dt)
    B = rng.standard_normal((dv, k)) / np.sqrt(dv)
    offset_t = rng.standard_normal(dt) / np.sqrt(dt) * p.modality_offset
    offset_v = rng.standard_normal(dv) / np.sqrt(dv) * p.modality_offset
    return DemoLatents(z=z, A=A, B=B, offset_t=offset_t, offset_v=offset_v)


def generate_demo_corpus(params: Optional[DemoCorpusParams] = None) -> DemoCorpusData:
    """Generate the corpus in memory (deterministic in ``params``); see the module docstring."""
    p = params or DemoCorpusParams()
    rng = np.random.default_rng(p.seed)
    lat = demo_latents(p, rng)
    z, A, B, offset_t, offset_v = lat.z, lat.A, lat.B, lat.offset_t, lat.offset_v
    k, dt, dv = p.latent_dim, p.text_dim, p.video_dim

    def meaning(concepts: Dict[str, Optional[str]]) -> np.ndarray:
        m = sum(z[c] for c in concepts.values() if c is not None)
        return m / (np.linalg.norm(m) + 1e-12)

    # ---- videos and their queries (concepts + windows)
    n_clips_all = rng.integers(p.min_clips, p.max_clips + 1, size=p.n_videos)
    vids = [f"demo_v{i:04d}" for i in range(p.n_videos)]
    used_tuples: set = set()
    queries: List[Dict[str, Any]] = []  # in video order
    for vi, vid in enumerate(vids):
        nq = int(rng.integers(p.queries_per_video[0], p.queries_per_video[1] + 1))
        for _ in range(nq):
            for _attempt in range(100):
                c = _sample_concepts(rng, p)
                others = [q for q in queries if q["video_index"] != vi]
                if others and rng.random() < p.hard_negative_rate:
                    src = others[int(rng.integers(len(others)))]["concepts"]
                    n_copy = int(rng.integers(2, 4))
                    for slot in rng.permutation(["subject", "verb", "object", "place"])[:n_copy]:
                        c[str(slot)] = src[str(slot)]
                key = tuple(c[s] for s in SLOTS)
                if key not in used_tuples:
                    used_tuples.add(key)
                    break
            n_win = int(rng.choice(3, p=np.asarray(p.window_count_probs))) + 1
            windows = _place_windows(rng, int(n_clips_all[vi]), n_win, p)
            template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
            queries.append({"video_index": vi, "concepts": c, "windows": windows,
                            "text": _render(c, template), "meaning": meaning(c)})

    # ---- video features
    video_features: Dict[str, np.ndarray] = {}
    saliency_of: Dict[int, List[List[int]]] = {}
    by_video: Dict[int, List[int]] = {}
    for qi, q in enumerate(queries):
        by_video.setdefault(q["video_index"], []).append(qi)
    for vi, vid in enumerate(vids):
        L = int(n_clips_all[vi])
        h = np.tile(rng.standard_normal(k) / np.sqrt(k) * p.background_weight, (L, 1))
        covered = np.zeros(L, dtype=bool)
        for qi in by_video[vi]:
            q = queries[qi]
            scores: List[List[int]] = []
            for a, b in q["windows"]:
                s = _bump(b - a)
                h[a:b] += p.content_weight * s[:, None] * q["meaning"][None, :]
                covered[a:b] = True
                noisy = np.rint(4 * s[:, None] + rng.normal(0, p.saliency_noise, size=(b - a, 3)))
                scores.extend(np.clip(noisy, 0, 4).astype(int).tolist())
            saliency_of[qi] = scores
        other = [qi for qi, q in enumerate(queries) if q["video_index"] != vi]
        for c in np.flatnonzero(~covered):
            if rng.random() < p.distractor_rate:
                src = queries[other[int(rng.integers(len(other)))]]["concepts"]
                slots = [s for s in SLOTS if src[s] is not None]
                pick = rng.permutation(len(slots))[:2]
                m = sum(z[src[slots[i]]] for i in pick)
                m = m / (np.linalg.norm(m) + 1e-12)
                h[c] += p.content_weight * rng.uniform(0.5, 1.0) * m
        feats = h @ B.T + p.video_noise * rng.standard_normal((L, dv)) / np.sqrt(dv) + offset_v
        video_features[vid] = feats.astype(np.float32)

    # ---- text features
    text_tokens: Dict[int, np.ndarray] = {}
    text_pooled: Dict[int, np.ndarray] = {}
    content_words = set(SUBJECTS + ADJECTIVES + VERBS + OBJECTS + PLACES)
    for qi, q in enumerate(queries):
        words = ["<sos>"] + _tokens(q["text"]) + ["<eos>"]
        lat = np.stack([z[w] + p.context_mix * q["meaning"] for w in words])
        tok = lat @ A.T + p.text_noise * rng.standard_normal((len(words), dt)) / np.sqrt(dt) + offset_t
        content = [j for j, w in enumerate(words) if w in content_words]
        pooled = tok[content].mean(0) + 0.5 * p.text_noise * rng.standard_normal(dt) / np.sqrt(dt)
        text_tokens[qi] = tok.astype(np.float32)
        text_pooled[qi] = pooled.astype(np.float32)

    # ---- splits by video
    perm = rng.permutation(p.n_videos)
    n_train, n_val, _ = p.split_sizes()
    split_of_video = {}
    for rank, vi in enumerate(perm):
        split = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
        split_of_video[vids[vi]] = split

    records: Dict[str, List[MomentRecord]] = {s: [] for s in SPLITS}
    durations = {vid: float(n_clips_all[vi] * p.clip_length) for vi, vid in enumerate(vids)}
    for qi, q in enumerate(queries):
        vid = vids[q["video_index"]]
        cl = p.clip_length
        clip_ids = [c for a, b in q["windows"] for c in range(a, b)]
        records[split_of_video[vid]].append(MomentRecord(
            qid=qi, query=q["text"], vid=vid, duration=durations[vid],
            relevant_windows=[(a * cl, b * cl) for a, b in q["windows"]],
            relevant_clip_ids=clip_ids, saliency_scores=[list(map(float, s)) for s in saliency_of[qi]]))
    return DemoCorpusData(params=p, records=records, video_features=video_features,
                          text_tokens=text_tokens, text_pooled=text_pooled, durations=durations,
                          split_of_video=split_of_video)


# --------------------------------------------------------------------------- writing


def default_demo_root() -> str:
    """``$C2F_DEMO_ROOT``, else ``<cache_root>/demo_corpus`` (``$C2F_CACHE`` or
    ``~/.cache/lavis_c2f``); absolute."""
    env = os.environ.get("C2F_DEMO_ROOT")
    return resolve_path(env) if env else os.path.join(cache_root(), "demo_corpus")


def _row(rec: MomentRecord) -> Dict[str, Any]:
    row = rec.to_qvh_dict()
    row["relevant_windows"] = [[_num(s), _num(e)] for s, e in rec.relevant_windows]
    row["duration"] = _num(rec.duration)
    row["saliency_scores"] = [[int(v) for v in s] for s in rec.saliency_scores or []]
    return row


def _num(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else float(x)


def _readme(meta: Dict[str, Any]) -> str:
    lines = [
        "# lavis-c2f demo corpus",
        "",
        "Synthetic, seeded and learnable video-moment corpus generated by "
        "`lavis-c2f make-demo-corpus` (module `lavis_c2f.data.demo_corpus`). "
        "Nothing here comes from a real video.",
        "",
        "| split | videos | queries |",
        "|---|---|---|",
    ]
    for s in SPLITS:
        lines.append(f"| {s} | {len(meta['splits'][s]['vids'])} | {meta['splits'][s]['n_queries']} |")
    lines += [
        "",
        f"Clip length {meta['clip_length']} s; video features {meta['video_dim']}-d, text features "
        f"{meta['text_dim']}-d (float32). Corpus version {meta['version']}.",
        "",
        "## Generation (from the module docstring)",
        "",
        (__doc__ or "").strip(),
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(meta["params"], indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_demo_corpus(data: DemoCorpusData, out_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Write ``data`` into the (new or empty) folder ``out_dir``; returns the corpus meta.

    Not atomic by itself: :func:`make_demo_corpus` writes into a temporary folder.
    """
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "clip_features").mkdir(exist_ok=True)
    (out / "clip_text_features").mkdir(exist_ok=True)
    for split in SPLITS:
        with open(out / "annotations" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for rec in data.records[split]:
                f.write(json.dumps(_row(rec)) + "\n")
    for vid in sorted(data.video_features):
        save_npz_deterministic(out / "clip_features" / f"{vid}.npz", {"features": data.video_features[vid]})
    for qid in sorted(data.text_tokens):
        save_npz_deterministic(out / "clip_text_features" / f"qid{qid}.npz",
                               {"last_hidden_state": data.text_tokens[qid],
                                "pooler_output": data.text_pooled[qid]})
    p = data.params
    meta: Dict[str, Any] = {
        "name": "c2f_demo",
        "version": CORPUS_VERSION,
        "params": p.to_dict(),
        "clip_length": p.clip_length,
        "video_dim": p.video_dim,
        "text_dim": p.text_dim,
        "layout": {"annotations": "annotations/{split}.jsonl",
                   "video_features": "clip_features/{vid}.npz['features']",
                   "text_features": "clip_text_features/qid{qid}.npz['last_hidden_state'|'pooler_output']"},
        "splits": {s: {"vids": sorted({r.vid for r in data.records[s]}),
                       "n_queries": len(data.records[s])} for s in SPLITS},
        "durations": {vid: data.durations[vid] for vid in sorted(data.durations)},
    }
    with open(out / "README.md", "w", encoding="utf-8") as f:
        f.write(_readme(meta))
    digest = hashlib.sha256()
    n_files, n_bytes = 0, 0
    for path in sorted(out.rglob("*")):
        if path.is_file():
            rel = path.relative_to(out).as_posix()
            blob = path.read_bytes()
            digest.update(rel.encode() + b"\0" + hashlib.sha256(blob).digest())
            n_files += 1
            n_bytes += len(blob)
    meta["content"] = {"n_files": n_files, "n_bytes": n_bytes, "sha256": digest.hexdigest()}
    with open(out / "corpus.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return meta


def read_corpus_meta(out_dir: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The ``corpus.json`` of a complete demo corpus, or None when there is none."""
    p = Path(out_dir) / "corpus.json"
    if not p.is_file():
        return None
    try:
        with open(p, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("name") == "c2f_demo" else None


def make_demo_corpus(out_dir: Union[str, os.PathLike, None] = None,
                     params: Optional[DemoCorpusParams] = None, *, force: bool = False,
                     **overrides: Any) -> Dict[str, Any]:
    """Generate and write the demo corpus into ``out_dir`` (default :func:`default_demo_root`).

    Args:
        params: generator parameters (default :class:`DemoCorpusParams`()).
        force: replace an existing ``out_dir`` that holds something else.
        **overrides: individual parameters, e.g. ``n_videos=40`` (applied on top of ``params``).
    Returns:
        The corpus meta (``corpus.json``) plus ``"generated"``: False when an identical
        corpus was already there (no-op) and ``"seconds"``.
    Raises:
        DemoCorpusExistsError: ``out_dir`` exists with other parameters / other content and
            ``force`` is False.
    """
    t0 = time.perf_counter()
    p = params or DemoCorpusParams()
    if overrides:
        p = DemoCorpusParams.from_dict({**p.to_dict(), **overrides})
    out = Path(out_dir if out_dir is not None else default_demo_root()).expanduser().resolve()
    if out.exists():
        meta = read_corpus_meta(out)
        if meta is not None and meta.get("version") == CORPUS_VERSION and meta.get("params") == p.to_dict():
            return {**meta, "generated": False, "seconds": time.perf_counter() - t0, "path": str(out)}
        if not force:
            if meta is not None:
                diff = sorted(k for k in set(meta.get("params", {})) | set(p.to_dict())
                              if meta.get("params", {}).get(k) != p.to_dict().get(k))
                what = f"parameters {diff}" if diff else ""
                if meta.get("version") != CORPUS_VERSION:
                    what += (" and " if what else "") + f"version {meta.get('version')} (now {CORPUS_VERSION})"
                raise DemoCorpusExistsError(
                    f"{out} holds a demo corpus with other {what}; use force=True / --force to replace it")
            if not out.is_dir() or any(out.iterdir()):
                raise DemoCorpusExistsError(f"{out} exists and is not a demo corpus; use force=True / "
                                            "--force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    data = generate_demo_corpus(p)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent)))
    try:
        meta = write_demo_corpus(data, tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(str(tmp) + ".old")
            os.rename(out, old)
            os.rename(tmp, out)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.perf_counter() - t0
    logger.info("demo corpus written to %s in %.1f s (%d files, %.1f MB)", out, dt,
                meta["content"]["n_files"], meta["content"]["n_bytes"] / 1e6)
    return {**meta, "generated": True, "seconds": dt, "path": str(out)}
