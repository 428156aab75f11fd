"""Frame sampling for the refiner: candidate times in a region and key-frame selection.

CALCE selects key frames by clustering frame features and keeping cluster representatives, so
that a few frames cover the distinct visual events of a span. Here (numpy only, deterministic):

* :func:`candidate_times` samples ``n`` times uniformly in ``[start, end]`` (bin centres);
* :func:`kmeans` clusters ``(T, D)`` features into ``k`` clusters (k-means++ seeding from
  ``numpy.random.default_rng(seed)``, then Lloyd iterations; an empty cluster is re-seeded with
  the point farthest from its centroid);
* :func:`select_key_frames` returns, for each cluster, the member nearest to its centroid,
  sorted by time (index). With ``T <= k`` every frame is kept. When the features have fewer
  than ``k`` distinct rows the selection is completed with the frames that are farthest
  (in index) from the ones chosen, so it always returns ``min(k, T)`` distinct indices.
* :func:`thumbnail_features` turns frames into cheap features (down-sampled, standardised
  pixels) for clustering when no learned features are at hand.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def candidate_times(start: float, end: float, n: int) -> np.ndarray:
    """``n`` times (seconds) at the centres of ``n`` equal bins of ``[start, end]``. (n,)"""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not np.isfinite(start) or not np.isfinite(end) or end < start:
        raise ValueError(f"invalid span [{start}, {end}]")
    step = (end - start) / n
    return start + step * (np.arange(n, dtype=np.float64) + 0.5)


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(T, D), (K, D) -> (T, K) squared Euclidean distances (clipped at 0)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_iter: int = 50, tol: float = 1e-7
           ) -> Tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding.

    Args:
        x: (T, D) features, T >= k >= 1.
        k: number of clusters.
        seed: seed of the k-means++ draws (same seed, same result).
    Returns:
        centroids (k, D) float64 and labels (T,) int64.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (T, D), got shape {x.shape}")
    t = x.shape[0]
    if not 1 <= k <= t:
        raise ValueError(f"k must be in [1, T={t}], got {k}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    rng = np.random.default_rng(seed)
    centroids = np.empty((k, x.shape[1]), dtype=np.float64)
    centroids[0] = x[rng.integers(t)]
    closest = _sq_dists(x, centroids[:1])[:, 0]
    for j in range(1, k):
        total = closest.sum()
        if total <= 0:  # all remaining points coincide with a centroid
            idx = int(rng.integers(t))
        else:
            idx = int(rng.choice(t, p=closest / total))
        centroids[j] = x[idx]
        closest = np.minimum(closest, _sq_dists(x, centroids[j:j + 1])[:, 0])
    labels = np.zeros(t, dtype=np.int64)
    for _ in range(n_iter):
        d = _sq_dists(x, centroids)
        labels = d.argmin(1)
        new = centroids.copy()
        for j in range(k):
            members = labels == j
            if members.any():
                new[j] = x[members].mean(0)
            else:  # re-seed an empty cluster with the worst-served point
                far = int(d[np.arange(t), labels].argmax())
                new[j] = x[far]
                labels[far] = j
        shift = float(((new - centroids) ** 2).sum())
        centroids = new
        if shift <= tol:
            break
    labels = _sq_dists(x, centroids).argmin(1)
    return centroids, labels


def select_key_frames(features: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Indices of key frames: the frame nearest to each k-means centroid, sorted by time.

    Args:
        features: (T, D) one row per frame, frames in time order.
        n_clusters: N, the number of key frames wanted.
        seed: k-means seed.
    Returns:
        (min(N, T),) int64 distinct indices in increasing order.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be (T, D), got shape {features.shape}")
    t = features.shape[0]
    if n_clusters <= 0:
        raise ValueError(f"n_clusters must be positive, got {n_clusters}")
    if t <= n_clusters:
        return np.arange(t, dtype=np.int64)
    centroids, labels = kmeans(features, n_clusters, seed=seed)
    d = _sq_dists(features, centroids)
    chosen = []
    taken = np.zeros(t, dtype=bool)
    for j in range(n_clusters):
        members = np.flatnonzero((labels == j) & ~taken)
        if members.size == 0:
            continue
        best = int(members[np.argmin(d[members, j])])  # ties: the earliest frame
        chosen.append(best)
        taken[best] = True
    while len(chosen) < n_clusters:  # degenerate features: spread the rest in time
        idx = np.arange(t)
        gap = np.min(np.abs(idx[:, None] - np.asarray(chosen)[None, :]), axis=1) if chosen \
            else np.full(t, t)
        gap[taken] = -1
        best = int(np.argmax(gap))
        chosen.append(best)
        taken[best] = True
    return np.sort(np.asarray(chosen, dtype=np.int64))


def uniform_key_frames(t: int, n: int) -> np.ndarray:
    """``min(n, t)`` indices spread uniformly over ``t`` frames (bin centres), increasing."""
    if t <= n:
        return np.arange(t, dtype=np.int64)
    idx = np.floor((np.arange(n) + 0.5) * t / n).astype(np.int64)
    return np.unique(np.clip(idx, 0, t - 1))


def thumbnail_features(frames: np.ndarray, size: int = 8) -> np.ndarray:
    """Cheap clustering features of frames: area-averaged ``size x size`` colour thumbnails,
    each standardised (zero mean, unit norm) so brightness changes weigh less than content.

    Args:
        frames: (T, H, W, 3) uint8 or float.
    Returns:
        (T, size * size * 3) float64.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
    t, h, w, _ = frames.shape
    ys = np.linspace(0, h, size + 1).astype(int)
    xs = np.linspace(0, w, size + 1).astype(int)
    f = frames.astype(np.float64)
    out = np.empty((t, size, size, 3), dtype=np.float64)
    for i in range(size):
        for j in range(size):
            y0, y1 = ys[i], max(ys[i + 1], ys[i] + 1)
            x0, x1 = xs[j], max(xs[j + 1], xs[j] + 1)
            out[:, i, j] = f[:, y0:y1, x0:x1].mean(axis=(1, 2))
    out = out.reshape(t, -1)
    out -= out.mean(1, keepdims=True)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-8)
