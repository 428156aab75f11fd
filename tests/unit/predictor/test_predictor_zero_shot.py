"""C2FPredictor without checkpoints: the labelled zero-shot mode on generated clips."""
import logging

import numpy as np
import pytest

from lavis_c2f.models import zero_shot as zs
from lavis_c2f.pipeline import stages
from lavis_c2f.pipeline.fusion import FusionConfig, fuse_candidates
from lavis_c2f.predictor import C2FPredictor, EncodedVideo
from predictor_helpers import CHARADES


@pytest.fixture(scope="module")
def predictor(zs_index):
    return C2FPredictor.from_checkpoints(index=zs_index, backbone="random", device="cpu")


def test_mode_is_zero_shot_and_logged(zs_index, caplog):
    caplog.set_level(logging.INFO, logger="lavis_c2f.predictor")
    logging.getLogger("lavis_c2f.predictor").setLevel(logging.INFO)
    p = C2FPredictor.from_checkpoints(index=zs_index, backbone="random", device="cpu")
    assert p.mode == {"stage1": "zero-shot", "stage2": "zero-shot", "stage3": "off"}
    assert "ZERO-SHOT" in p.describe_mode() and p.describe_mode().count("ZERO-SHOT") == 2
    assert any("ZERO-SHOT" in r.getMessage() for r in caplog.records)


def test_encode_video_features_duration_and_sidecar_captions(predictor, videos, backbone):
    v = predictor.encode_video(videos["redblue"])
    assert isinstance(v, EncodedVideo) and v.vid == "redblue"
    assert v.features.shape == (7, backbone.dim) and v.features.dtype == np.float32
    assert v.duration == pytest.approx(14.0, abs=0.15) and v.clip_length == 2.0
    assert v.weights_id == backbone.weights_id and v.path == str(videos["redblue"])
    assert [c.text for c in v.captions] == ["the screen is red", "now it is blue"]
    assert predictor.encode_video(videos["pattern"]).captions is None
    # red clips are identical frames, so their features are too; blue ones differ from them
    np.testing.assert_allclose(v.features[0], v.features[1], atol=1e-5)
    assert np.abs(v.features[0] - v.features[5]).max() > 1e-2


def test_predict_saliency_is_the_smoothed_cosine_curve(predictor, videos):
    v = predictor.encode_video(videos["pattern"])
    m = predictor.predict("a colourful test pattern", v, top_k=3)
    q = predictor.encode_query("a colourful test pattern")
    want = zs.smooth(zs.similarity_curve(q.pooled, v.features), 3)
    np.testing.assert_allclose(m.saliency, want, rtol=1e-5)
    assert m.windows == [list(map(float, w)) for w in zs.propose_windows(want, 2.0, v.duration)[:3]]
    assert m.mode == "zero-shot" and not m.refined and m.vid == "pattern"
    assert all(0.0 <= a < b <= v.duration + 1e-6 for a, b, _ in m.windows)
    assert m.to_dict()["windows"] == m.windows and len(m.to_dict()["saliency"]) == v.n_clips


def test_search_ranks_videos_by_their_best_clips_and_fuses(predictor, zs_index):
    query = "a red screen"
    res = predictor.search(query, top_k=20)
    q = predictor.encode_query(query)
    corpus = predictor.corpus
    want = sorted(((v, zs.video_score(zs.similarity_curve(q.pooled, corpus.features(v)))) for v in corpus.vids),
                  key=lambda x: -x[1])
    assert [v for v, _ in res.stage1] == [v for v, _ in want]
    np.testing.assert_allclose([s for _, s in res.stage1], [s for _, s in want], rtol=1e-5)
    # fused exactly as the pipeline fuses stage-1 and stage-2 scores
    cands = [[v, s, res.details[v].windows] for v, s in res.stage1]
    fused = fuse_candidates(cands, FusionConfig())
    assert [[m.vid, m.start, m.end, m.score] for m in res] == [list(f) for f in fused[:20]]
    assert [m.rank for m in res] == list(range(1, len(res) + 1))
    for m in res:
        assert m.stage1_score == pytest.approx(dict(res.stage1)[m.vid])
        assert [m.start, m.end, m.stage2_score] in res.details[m.vid].windows
        assert m.path.endswith(f"{m.vid}.mp4") and m.duration == pytest.approx(corpus.duration(m.vid))
    for vid, det in res.details.items():
        assert len(det.saliency) == corpus.n_clips(vid)
    assert set(res.timings) >= {"stage1_s", "stage2_s", "total_s"}
    d = res.to_dict()
    assert d["mode"]["stage1"] == "zero-shot" and d["moments"][0]["start_hms"].count(":") == 1


def test_search_top_k_and_stage1_top_k(predictor):
    res = predictor.search("gray", top_k=2, stage1_top_k=1)
    assert len(res.stage1) == 1 and len(res) <= 2 and {m.vid for m in res} == {res.stage1[0][0]}


def test_streaming_zero_shot_equals_the_in_memory_bank(zs_index, monkeypatch):
    a = C2FPredictor.from_checkpoints(index=zs_index, backbone="random", device="cpu").stage1("blue", k=3)
    monkeypatch.setattr(stages, "ZERO_SHOT_BANK_BYTES", 0)
    b = C2FPredictor.from_checkpoints(index=zs_index, backbone="random", device="cpu").stage1("blue", k=3)
    assert [v for v, _ in a] == [v for v, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5)


def test_stateless_calls_in_any_order(predictor, videos):
    v = predictor.encode_video(videos["gray"])
    first = predictor.predict("gray", v)
    predictor.search("something else")
    again = predictor.predict("gray", v)
    assert first.windows == again.windows
    np.testing.assert_array_equal(first.saliency, again.saliency)


def test_max_video_score_option(zs_index):
    p = C2FPredictor.from_checkpoints(index=zs_index, backbone="random", device="cpu",
                                      zero_shot={"video_score": "max"})
    q = p.encode_query("blue")
    got = dict(p.stage1("blue", k=3))
    for vid, s in got.items():
        assert s == pytest.approx(float(zs.similarity_curve(q.pooled, p.corpus.features(vid)).max()), rel=1e-5)


def test_real_charades_clip(tmp_path):
    if not CHARADES.is_file():
        pytest.skip(f"../shared not found: {CHARADES} is missing")
    p = C2FPredictor.from_checkpoints(backbone="random", device="cpu")
    v = p.encode_video(CHARADES)
    assert v.n_clips == 15 and v.duration == pytest.approx(30.7, abs=0.2)
    m = p.predict("a person opens a door", v, top_k=5)
    assert 1 <= len(m.windows) <= 5 and len(m.saliency) == 15
    assert all(0.0 <= a < b <= v.duration + 1e-6 and 0.0 <= s <= 1.0 for a, b, s in m.windows)
