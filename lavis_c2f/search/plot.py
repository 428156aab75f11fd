"""The saliency plot of ``lavis-c2f search --plot``: one video's per-clip saliency with the
predicted windows and, when known, the ground-truth windows (matplotlib, Agg backend).

The PNG is written atomically (temporary file beside it, then renamed).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from lavis_c2f.common.clock import format_time
from lavis_c2f.common.io import atomic_path


def plot_saliency(path: "str | os.PathLike", saliency: Sequence[float], clip_length: float, duration: float,
                  windows: Sequence[Sequence[float]], gt_windows: Optional[Sequence[Sequence[float]]] = None,
                  title: str = "", ylabel: str = "saliency", max_windows: int = 5, dpi: int = 110) -> str:
    """Draw the saliency curve of one video and write a PNG; returns the path.

    Args:
        saliency: (L,) per-clip values, plotted at the clip centres ``(i + 0.5) * clip_length``.
        clip_length, duration: seconds.
        windows: predicted ``[[st, ed, score], ...]`` (best first); the best ``max_windows``
            are shaded (darker = higher rank) and labelled with their rank and score.
        gt_windows: ground-truth ``[[st, ed], ...]`` drawn as bars under the curve.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sal = np.asarray(saliency, dtype=np.float64).reshape(-1)
    if sal.size == 0:
        raise ValueError("no saliency values to plot")
    if not (clip_length > 0 and duration > 0):
        raise ValueError(f"clip_length and duration must be positive, got {clip_length}, {duration}")
    x = (np.arange(sal.size) + 0.5) * clip_length
    fig, ax = plt.subplots(figsize=(10, 3.2))
    try:
        ax.plot(x, sal, color="#1f4e79", lw=1.6, marker="o", ms=2.5, label=ylabel)
        lo, hi = float(sal.min()), float(sal.max())
        pad = 0.1 * (hi - lo if hi > lo else 1.0)
        ax.set_ylim(lo - pad * (3 if gt_windows else 1), hi + 3.2 * pad)
        shown = list(windows)[: int(max_windows)]
        for i, w in enumerate(shown):
            st, ed = float(w[0]), float(w[1])
            alpha = 0.35 * (1.0 - i / max(1, len(shown))) + 0.08
            ax.axvspan(st, ed, color="#f28e2b", alpha=alpha, lw=0, label="predicted" if i == 0 else None)
            score = f" {float(w[2]):.2f}" if len(w) > 2 else ""
            # labels on three staggered rows so that overlapping windows stay readable
            ax.text((st + ed) / 2, hi + (0.4 + 0.9 * (i % 3)) * pad, f"#{i + 1}{score}", ha="center", va="bottom",
                    fontsize=7)
        for j, g in enumerate(gt_windows or []):
            ax.hlines(lo - 2 * pad, float(g[0]), float(g[1]), color="#2ca02c", lw=5,
                      label="ground truth" if j == 0 else None)
        ax.set_xlim(0, max(float(duration), float(x[-1] + clip_length / 2)))
        ticks = ax.get_xticks()
        ax.set_xticks([t for t in ticks if 0 <= t <= duration])
        ax.set_xticklabels([format_time(t) for t in ax.get_xticks()])
        ax.set_xlabel("time")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, fontsize=9)
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, framealpha=0.8, borderaxespad=0.0)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return os.fspath(path)


__all__ = ["plot_saliency"]
