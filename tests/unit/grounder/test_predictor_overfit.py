"""GrounderPredictor (API, batch independence, misuse errors) and a tiny overfit run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grounder_helpers import RAW_VID_DIM, TXT_DIM, make_batch, tiny_mesm_config, tiny_qd_config
from lavis_c2f.models.grounder import C2FMESMQDDETR, C2FQDDETR, GrounderPredictor
from lavis_c2f.ops.vectors import tef_columns


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = C2FQDDETR.from_config(tiny_qd_config(postprocess={"top_k": 4}))
    m.train()  # the predictor must not depend on (nor change) the caller's mode
    return m


def _inputs(seed=0, n_clips=(9, 14, 6)):
    g = np.random.default_rng(seed)
    query = g.standard_normal((5, TXT_DIM)).astype(np.float32)
    videos = [g.standard_normal((n, RAW_VID_DIM)).astype(np.float32) for n in n_clips]
    return query, videos, [2.0 * n for n in n_clips]


def test_predict_matches_the_model_and_keeps_its_mode(model):
    query, videos, durations = _inputs()
    pred = GrounderPredictor(model, clip_length=2.0)
    res = pred.predict(query, videos[0], durations[0])
    assert set(res) == {"windows", "saliency"} and len(res["windows"]) == 4
    assert len(res["saliency"]) == 9 and model.training
    # the same numbers through the batch API of the LAVIS model
    q = torch.from_numpy(query)
    v = torch.from_numpy(videos[0])
    samples = {"src_txt": (q / (q.norm(dim=1, keepdim=True) + 1e-5))[None],
               "src_txt_mask": torch.ones(1, 5),
               "src_vid": torch.cat([v / (v.norm(dim=1, keepdim=True) + 1e-5),
                                     torch.from_numpy(tef_columns(9))], 1)[None],
               "src_vid_mask": torch.ones(1, 9), "qid": [0], "query": ["q"], "vid": ["v"],
               "duration": torch.tensor([18.0]), "clip_length": torch.tensor([2.0])}
    model.eval()
    try:
        row = model.predict_batch(samples)[0]
    finally:
        model.train()
    assert row["pred_relevant_windows"] == res["windows"]
    assert row["pred_saliency_scores"] == res["saliency"]


def test_predict_many_is_batch_independent(model):
    query, videos, durations = _inputs(1)
    pred = GrounderPredictor(model, clip_length=2.0, batch_size=2)
    many = pred.predict_many(query, videos, durations)
    single = [pred.predict(query, v, d) for v, d in zip(videos, durations)]
    assert len(many) == 3
    for a, b in zip(many, single):
        assert [w[:2] for w in a["windows"]] == [w[:2] for w in b["windows"]]
        np.testing.assert_allclose([w[2] for w in a["windows"]], [w[2] for w in b["windows"]], atol=2e-4)
        np.testing.assert_allclose(a["saliency"], b["saliency"], atol=2e-3)
    assert pred.predict_many(query, [], []) == []


def test_long_videos_are_cut_and_windows_stay_inside(model):
    query, _, _ = _inputs()
    long_video = np.random.default_rng(3).standard_normal((50, RAW_VID_DIM)).astype(np.float32)
    res = GrounderPredictor(model, clip_length=2.0).predict(query, long_video, 100.0)
    assert len(res["saliency"]) == 20  # max_v_l of the tiny config
    assert all(0.0 <= st <= ed <= 40.0 for st, ed, _ in res["windows"])


def test_misuse_raises_clear_errors(model):
    query, videos, durations = _inputs()
    pred = GrounderPredictor(model, clip_length=2.0)
    with pytest.raises(ValueError, match="txt_dim"):
        pred.predict(query[:, :5], videos[0], 10.0)
    with pytest.raises(ValueError, match="vid_dim"):
        pred.predict(query, videos[0][:, :4], 10.0)
    with pytest.raises(ValueError, match="empty query"):
        pred.predict(query[:0], videos[0], 10.0)
    with pytest.raises(ValueError, match="no clips"):
        pred.predict(query, videos[0][:0], 10.0)
    bad = query.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pred.predict(bad, videos[0], 10.0)
    with pytest.raises(ValueError, match="durations"):
        pred.predict(query, videos[0], -1.0)
    with pytest.raises(ValueError, match="2 durations"):
        pred.predict_many(query, videos, durations[:2])
    with pytest.raises(ValueError, match="dimensions"):
        pred.predict(query[0], videos[0], 10.0)
    with pytest.raises(TypeError, match="sequence"):
        pred.predict_many(query, videos[0], [10.0])
    with pytest.raises(TypeError, match="not text"):
        pred.predict("a query", videos[0], 10.0)
    with pytest.raises(TypeError, match="QDDETR"):
        GrounderPredictor(torch.nn.Linear(2, 2), clip_length=2.0)
    with pytest.raises(ValueError, match="clip_length"):
        GrounderPredictor(model, clip_length=0)
    with pytest.raises(ValueError, match="stream_dims"):
        GrounderPredictor(model, clip_length=2.0, stream_dims=[4, 4]).predict(query, videos[0], 10.0)


def test_predictor_with_runtime_text_encoder(tiny_clip_dir):
    cfg = tiny_mesm_config(text_encoder={"model_dir": tiny_clip_dir, "max_words_l": 16})
    del cfg["txt_dim"]
    model = C2FMESMQDDETR.from_config(cfg)
    pred = GrounderPredictor(model, clip_length=2.0)
    _, videos, durations = _inputs()
    res = pred.predict_many("a person opens the door", videos, durations)
    assert len(res) == 3 and all(len(r["windows"]) == 5 for r in res)
    with pytest.raises(TypeError, match="text"):
        pred.predict(np.zeros((3, TXT_DIM), np.float32), videos[0], 10.0)
    with pytest.raises(ValueError, match="empty"):
        pred.predict("   ", videos[0], 10.0)


@pytest.mark.parametrize("arch", ["qd_detr", "mesm"])
def test_tiny_overfit_reduces_the_loss(arch, counts_file, single_thread):
    torch.manual_seed(0)
    np.random.seed(0)  # FW-MESM draws the masked words with numpy's global generator (as MESM)
    if arch == "qd_detr":
        model = C2FQDDETR.from_config(tiny_qd_config(dropout=0.0, input_dropout=0.0))
    else:
        model = C2FMESMQDDETR.from_config(tiny_mesm_config(
            dropout=0.0, input_dropout=0.0, vocab_counts=counts_file, fw_tokenizer="whitespace",
            fw_text_special_tokens=False))  # make_batch's text rows are words only
    batch = make_batch([10, 12], [4, 5], [[[4.0, 10.0]], [[12.0, 20.0]]], seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    losses = []
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1 if arch == "qd_detr" else 1.0)
        opt.step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    model.eval()
    rows = model.predict_batch(batch)
    best = rows[0]["pred_relevant_windows"][0]
    assert best[0] < 10.0 and best[1] > 4.0  # the top window overlaps the ground truth
