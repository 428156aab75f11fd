"""CALCE's key frames: DPC-KNN clustering, coarse-window guidance and the frame budget (torch).

Reproduces the official ``CTM`` / ``select_key_frame`` / stage-2 ``forward`` / ``compress_mask``
of tjhd1475/CALCE for one video (batch size 1, as CALCE trains and evaluates). Frames are
indexed ``0..T-1``; masks are int (T,) tensors with 1 = selected.

DPC-KNN (:func:`dpc_knn_labels`, features ``x`` (T, C), ``K`` clusters, ``k`` neighbours)::

    d       = cdist(x, x) / sqrt(C)                     (float32; masked columns -> max(d) + 1)
    density = exp(-mean(k smallest d^2)) + 1e-6 * rand(T)      (self included; masked -> 0)
    delta_i = min_{j: density_j > density_i} d_ij      (max d when i is the densest)
    centres = topk(delta * density, K);  label_i = argmin_c d_{i, centre_c}  (centres: own label)

The ``rand`` is **one** ``torch.rand((1, T))`` on the global generator per call: seed the global
RNG before a call (``torch.manual_seed``) to make it reproducible, as the official code does.

Stage 1 (:func:`stage1_key_frames`): features are the frame means of ``ln_vision(ViT)``; a frame
is key if its label differs from a neighbour's, plus frames 0 and T-1, dilated by ``bias1``. A
talk-relative query with subtitle durations replaces that by the union of
``[int(s*T/D), min(int(e*T/D), T-1)]`` (no dilation). Every frame is kept.

Stage 2 (:func:`stage2_key_frames`): features are the flattened, L2-normalised Q-Former tokens.
A first clustering gives labels; each coarse window ``[s, e]`` marks the frames
``[first i: round(ts_i) >= s, last i: round(ts_i) <= e)`` (end exclusive) and counts their
labels; the filter is (top-8 labels by count, zero counts dropped) OR marked, dilated by
``bias2``; a second clustering runs with ``mask = filter`` (labels outside it become -1); key =
label changes + frames 0 and T-1 (or the talk override), dilated by ``bias1``, AND filter;
non-key = filter AND NOT key; :func:`compress_mask` then brings key + non-key down to ``T // 2``.
Frames in neither mask are dropped.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lavis_c2f.models.refiner.calce_text import is_talk_relative

TOP_LABELS = 8
COMPRESS_MAX_TRIES = 1000
COMPRESS_P_KEY, COMPRESS_P_NON_KEY = 0.3, 0.7


@torch.no_grad()
def dpc_knn_labels(x: torch.Tensor, num_clusters: int = 12, k: int = 5,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cluster label of each of the T rows of ``x`` (T, C) (module doc; CALCE's ``CTM`` with
    ``sample_ratio = num_clusters``). ``mask`` (T,): 0 = row ignored. Draws one ``torch.rand``.

    ``num_clusters`` larger than T is reduced to T (the official code would fail)."""
    if x.dim() != 2:
        raise ValueError(f"features must be (T, C), got {tuple(x.shape)}")
    t, c = x.shape
    n_clusters = max(math.ceil(num_clusters), 1)
    if k > n_clusters:
        k = min(3, max(n_clusters // 2, 1))
    xb = x[None].float()
    dist = torch.cdist(xb, xb) / (c ** 0.5)
    m = None
    if mask is not None:
        m = (mask.reshape(1, t) > 0).to(x.device)
        dist = dist * m[:, None, :] + (dist.max() + 1) * (~m[:, None, :])
    k = min(k, t)
    nearest, _ = torch.topk(dist, k=k, dim=-1, largest=False)
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
    if m is not None:
        density = density * m
    denser = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    delta, _ = (dist * denser + dist_max * (1 - denser)).min(dim=-1)
    score = delta * density
    n_clusters = min(n_clusters, t)
    _, centres = torch.topk(score, k=n_clusters, dim=-1)
    to_centres = dist[0][centres[0]]                       # (K, T)
    labels = to_centres.argmin(dim=0)
    labels[centres[0]] = torch.arange(n_clusters, device=labels.device)
    return labels


def dilate(mask: torch.Tensor, bias: int) -> torch.Tensor:
    """``mask`` with every 1 spread ``bias`` frames to each side (CALCE's
    ``two_side_bias_padding``). int (T,)."""
    t = mask.shape[0]
    out = torch.zeros(t, dtype=torch.int, device=mask.device)
    for i in torch.nonzero(mask > 0).reshape(-1).tolist():
        out[max(0, i - bias):min(t, i + bias + 1)] = 1
    return out


def cluster_edges(labels: torch.Tensor) -> torch.Tensor:
    """1 at both frames of every label change and at frames 0 and T-1. int (T,)."""
    t = labels.shape[0]
    out = torch.zeros(t, dtype=torch.int, device=labels.device)
    for i in range(1, t):
        if labels[i - 1] != labels[i]:
            out[i - 1] = 1
            out[i] = 1
    out[0] = 1
    out[-1] = 1
    return out


def talk_mask(durations: Sequence[Sequence[float]], t: int, duration: float,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """1 on ``[int(s*T/D), min(int(e*T/D), T-1)]`` for every subtitle duration ``[s, e]``."""
    out = torch.zeros(t, dtype=torch.int, device=device)
    for s, e in durations:
        start = int(s * t / duration)
        end = min(int(e * t / duration), t - 1)
        if end >= start:
            out[start:end + 1] = 1
    return out


def _split(key: torch.Tensor, kept: torch.Tensor) -> Tuple[List[int], List[int]]:
    key_idx = torch.nonzero(key).reshape(-1).tolist()
    non_idx = torch.nonzero(kept & (1 - key)).reshape(-1).tolist()
    return key_idx, non_idx


def stage1_key_frames(features: torch.Tensor, query_prompt: str, subtitle_durations: Sequence[Sequence[float]],
                      duration: float, num_clusters: int = 12, k: int = 5, bias1: int = 1,
                      talk_keywords: Optional[Sequence[str]] = None) -> Dict[str, List[int]]:
    """Stage-1 key frames (module doc). ``features`` (T, C): frame means of ``ln_vision(ViT)``.

    Returns ``{key_frame_idx, non_key_frame_idx, kept_frame_idx}`` (sorted frame indices).
    """
    t = features.shape[0]
    kw = {} if talk_keywords is None else {"keywords": talk_keywords}
    labels = dpc_knn_labels(features, num_clusters, k)
    key = dilate(cluster_edges(labels), bias1)
    if is_talk_relative(query_prompt, **kw) and subtitle_durations:
        key = talk_mask(subtitle_durations, t, duration, key.device)
    key_idx, non_idx = _split(key, torch.ones_like(key))
    return {"key_frame_idx": key_idx, "non_key_frame_idx": non_idx, "kept_frame_idx": list(range(t))}


def coarse_window_filter(labels: torch.Tensor, timestamps: Sequence[float], coarse_windows: Sequence[Sequence[float]],
                         num_clusters: int, bias2: int, top_labels: int = TOP_LABELS) -> torch.Tensor:
    """The stage-2 frame filter from the first clustering's ``labels`` (module doc). int (T,)."""
    t = labels.shape[0]
    marked = torch.zeros(t, dtype=torch.int, device=labels.device)
    counts = torch.zeros(num_clusters, device=labels.device)
    rounded = [round(float(ts)) for ts in timestamps]
    for window in coarse_windows:
        start, end = window
        after = [i for i, r in enumerate(rounded) if r >= start]
        before = [i for i, r in enumerate(rounded) if r <= end]
        if not after or not before:
            raise ValueError(f"coarse window {list(window)} lies outside the frame times "
                             f"[{rounded[0]}, {rounded[-1]}] s")
        s_idx, e_idx = after[0], before[-1]
        marked[s_idx:e_idx] = 1
        for pos in range(s_idx, e_idx):
            counts[labels[pos]] += 1
    top = torch.argsort(counts)[-top_labels:]
    top = top[torch.where(counts[top] != 0)]
    keep = torch.isin(labels, top).to(torch.int) | marked
    return dilate(keep, bias2)


def compress_mask(key: torch.Tensor, non_key: torch.Tensor, target_count: int,
                  max_tries: int = COMPRESS_MAX_TRIES) -> Tuple[torch.Tensor, torch.Tensor]:
    """CALCE's frame budget: while ``sum(key) + sum(non_key) > target_count``, keep every other
    frame of the largest run of non-key frames (the first largest), stop if that suffices, then
    of the largest run of key frames. After ``max_tries`` rounds, the random fallback repeatedly
    picks one selected non-key frame (``torch.randint``) and drops it with p 0.7
    (``torch.rand``), then one key frame with p 0.3, on the global RNG."""
    def runs(mask: torch.Tensor) -> List[List[int]]:
        out, cur = [], []
        for i, v in enumerate(mask.tolist()):
            if v == 1:
                cur.append(i)
            elif cur:
                out.append(cur)
                cur = []
        if cur:
            out.append(cur)
        return out

    tries = 0
    while int(key.sum() + non_key.sum()) > target_count and tries < max_tries:
        tries += 1
        nk = runs(non_key)
        if nk:
            largest = max(nk, key=len)
            non_key = non_key.clone()
            non_key[largest] = 0
            non_key[largest[::2]] = 1
            if int(key.sum() + non_key.sum()) <= target_count:
                break
        kr = runs(key)
        if not kr:
            break
        largest = max(kr, key=len)
        key = key.clone()
        key[largest] = 0
        key[largest[::2]] = 1

    def drop_one(mask: torch.Tensor, p: float) -> None:
        idx = torch.nonzero(mask == 1)
        if idx.numel() > 0:
            pick = idx[torch.randint(0, idx.size(0), (1,)).item()]
            if torch.rand(1).item() < p:
                mask[pick] = 0

    while int(key.sum() + non_key.sum()) > target_count:
        drop_one(non_key, COMPRESS_P_NON_KEY)
        drop_one(key, COMPRESS_P_KEY)
    return key, non_key


def stage2_key_frames(features: torch.Tensor, timestamps: Sequence[float], coarse_windows: Sequence[Sequence[float]],
                      query_prompt: str, subtitle_durations: Sequence[Sequence[float]], duration: float,
                      num_clusters: int = 12, k: int = 5, bias1: int = 3, bias2: int = 1,
                      top_labels: int = TOP_LABELS, talk_keywords: Optional[Sequence[str]] = None
                      ) -> Dict[str, List[int]]:
    """Stage-2 key, non-key and kept frames guided by the coarse windows (module doc).
    ``features`` (T, C): flattened L2-normalised Q-Former tokens. Draws two ``torch.rand``
    (one per clustering) and, when the budget needs it, the fallback's draws."""
    t = features.shape[0]
    kw = {} if talk_keywords is None else {"keywords": talk_keywords}
    labels = dpc_knn_labels(features, num_clusters, k)
    keep = coarse_window_filter(labels, timestamps, coarse_windows, num_clusters, bias2, top_labels)
    labels2 = dpc_knn_labels(features, num_clusters, k, mask=keep).clone()
    labels2[keep == 0] = -1
    key = cluster_edges(labels2)
    if is_talk_relative(query_prompt, **kw) and subtitle_durations:
        key = talk_mask(subtitle_durations, t, duration, key.device)
    key = dilate(key, bias1) & keep
    non_key = (1 - key) & keep
    key, non_key = compress_mask(key, non_key, t // 2)
    key_idx = torch.nonzero(key).reshape(-1).tolist()
    non_idx = torch.nonzero(non_key).reshape(-1).tolist()
    return {"key_frame_idx": key_idx, "non_key_frame_idx": non_idx,
            "kept_frame_idx": sorted(key_idx + non_idx)}
