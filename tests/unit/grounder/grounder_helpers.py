"""Helpers of the grounder tests: tiny configs and synthetic Moment-retrieval batches."""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import torch

from lavis_c2f.ops.spans import seconds_to_normalized_cxw

TXT_DIM, RAW_VID_DIM = 12, 10
VID_DIM = RAW_VID_DIM + 2  # + TEF

TINY_QD = dict(txt_dim=TXT_DIM, vid_dim=VID_DIM, hidden_dim=32, nheads=4, enc_layers=1,
               dec_layers=2, dim_feedforward=48, num_queries=5, max_v_l=20)


def tiny_qd_config(**overrides: Any) -> Dict[str, Any]:
    cfg = dict(TINY_QD, arch="c2f_qd_detr", model_type="default", load_finetuned=False)
    cfg.update(overrides)
    return cfg


def tiny_mesm_config(**overrides: Any) -> Dict[str, Any]:
    cfg = dict(TINY_QD, arch="c2f_mesm_qd_detr", num_recfw_layers=1, num_recss_layers=1,
               vocab_size=8)
    cfg.update(overrides)
    return cfg


def _tef(n: int) -> torch.Tensor:
    st = torch.arange(n, dtype=torch.float32) / n
    return torch.stack([st, st + 1.0 / n], dim=1)


def make_batch(lengths: List[int], text_lengths: List[int], windows: List[List[List[float]]],
               clip_length: float = 2.0, seed: int = 0, vids: Optional[List[str]] = None,
               queries: Optional[List[str]] = None) -> Dict[str, Any]:
    """A collated Moment-retrieval batch (docs/ARCHITECTURE.md) with random features."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    bsz, lv, lt = len(lengths), max(lengths), max(text_lengths)
    src_vid = torch.zeros(bsz, lv, VID_DIM)
    src_vid_mask = torch.zeros(bsz, lv)
    src_txt = torch.zeros(bsz, lt, TXT_DIM)
    src_txt_mask = torch.zeros(bsz, lt)
    spans, pos, neg, all_labels, has = [], [], [], torch.zeros(bsz, lv), []
    durations = []
    for i, (n, t) in enumerate(zip(lengths, text_lengths)):
        feats = torch.nn.functional.normalize(torch.randn(n, RAW_VID_DIM, generator=g), dim=-1)
        src_vid[i, :n] = torch.cat([feats, _tef(n)], dim=1)
        src_vid_mask[i, :n] = 1
        src_txt[i, :t] = torch.nn.functional.normalize(torch.randn(t, TXT_DIM, generator=g), dim=-1)
        src_txt_mask[i, :t] = 1
        duration = n * clip_length
        durations.append(duration)
        win = torch.tensor(windows[i], dtype=torch.float32).reshape(-1, 2)
        spans.append(seconds_to_normalized_cxw(win, duration) if len(win) else torch.zeros(0, 2))
        rel = sorted({c for st, ed in windows[i] for c in range(int(st // clip_length),
                                                                  min(int(ed // clip_length), n))})
        has.append(bool(rel))
        if rel:
            for c in rel:
                all_labels[i, c] = float(rnd.randint(1, 12))
            outside = [c for c in range(n) if c not in rel] or rel
            pos.append([rel[0], rnd.choice(rel)])
            neg.append([rel[-1], rnd.choice(outside)])
        else:
            pos.append([0, 0])
            neg.append([0, 0])
    return {
        "src_vid": src_vid, "src_vid_mask": src_vid_mask, "src_txt": src_txt,
        "src_txt_mask": src_txt_mask,
        "qid": list(range(100, 100 + bsz)),
        "query": queries or [f"a person opens the door number {i}" for i in range(bsz)],
        "vid": vids or [f"vid{i}" for i in range(bsz)],
        "duration": torch.tensor(durations), "clip_length": torch.full((bsz,), clip_length),
        "span_labels": spans, "saliency_pos_labels": torch.tensor(pos),
        "saliency_neg_labels": torch.tensor(neg), "saliency_all_labels": all_labels,
        "relevant_windows": windows, "has_labels": torch.tensor(has),
    }


def assert_rows_close(got: List[Dict[str, Any]], want: List[Dict[str, Any]]) -> None:
    """Post-processed rows equal up to one rounding step of the official post-processing.

    The rows round model outputs (window scores to 4 decimals, saliency scores to float16), so
    two outputs within float32 rounding of each other (about 1e-6, e.g. another GEMM kernel)
    can still land one step apart when a value sits on a rounding boundary: allowed here are
    1e-4 for a window number and one float16 spacing for a saliency score; everything else
    (ids, the number of windows and scores) must be equal.
    """
    import numpy as np

    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in ("pred_relevant_windows", "pred_saliency_scores")} == \
            {k: v for k, v in w.items() if k not in ("pred_relevant_windows", "pred_saliency_scores")}
        gw, ww = np.asarray(g["pred_relevant_windows"]), np.asarray(w["pred_relevant_windows"])
        assert gw.shape == ww.shape
        np.testing.assert_allclose(gw, ww, atol=1e-4 + 1e-9, rtol=0)
        gs, ws = (np.asarray(g["pred_saliency_scores"], dtype=np.float64),
                  np.asarray(w["pred_saliency_scores"], dtype=np.float64))
        assert gs.shape == ws.shape
        step = np.spacing(np.maximum(np.abs(gs), np.abs(ws)).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(gs - ws) <= step), np.abs(gs - ws).max()
