"""Zero-shot scoring and window proposals on constructed similarity curves (pure numpy)."""
import numpy as np
import pytest

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.zero_shot import (ZeroShotConfig, ground, propose_windows, similarity_curve, smooth, video_score,
                                        video_scores)
from lavis_c2f.ops.spans import nms_rows


def two_bumps(n=40):
    """Baseline 0.1, a strong event on clips 10-15 (0.8) and a weak one on clips 30-33 (0.5)."""
    c = np.full(n, 0.1)
    c[10:16] = 0.8
    c[30:34] = 0.5
    return c


def contrast(u, a, b):
    return u[a:b].mean() - np.concatenate([u[:a], u[b:]]).mean()


def test_smooth_is_a_centred_moving_average_with_short_ends():
    c = np.array([0.0, 3.0, 6.0, 0.0, 3.0])
    np.testing.assert_allclose(smooth(c, 3), [1.5, 3.0, 3.0, 3.0, 1.5], rtol=1e-6)
    np.testing.assert_allclose(smooth(c, 1), c)
    np.testing.assert_allclose(smooth(c, 2), [1.5, 4.5, 3.0, 1.5, 3.0], rtol=1e-6)  # window [i, i + 1]


def test_windows_of_two_events_best_first_with_contrast_scores():
    cfg = ZeroShotConfig()
    sal = smooth(two_bumps(), cfg.smooth_clips)
    rows = propose_windows(sal, clip_length=2.0, duration=80.0, config=cfg)
    u = (sal - sal.min()) / (sal.max() - sal.min())
    # the strong event: its core (clips 11-14, u = 1) beats the run including the smoothed edges;
    # the run [10, 16) overlaps it with IoU 8/12 >= 0.5 and is suppressed
    assert rows[0][:2] == [22.0, 30.0]
    assert rows[0][2] == pytest.approx(contrast(u, 11, 15), abs=1e-6)
    assert [20.0, 32.0] not in [r[:2] for r in rows]
    # the weak event comes next, with a lower score
    assert rows[1][:2] == [62.0, 66.0]
    assert rows[1][2] == pytest.approx(contrast(u, 31, 33), abs=1e-6)
    scores = [r[2] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert len(rows) <= cfg.max_windows


def test_without_smoothing_the_event_edges_are_exact():
    c = two_bumps()
    rows = propose_windows(c, 2.0, 80.0, ZeroShotConfig(smooth_clips=1))
    u = (c - c.min()) / (c.max() - c.min())
    assert rows[0][:2] == [20.0, 32.0] and rows[0][2] == pytest.approx(contrast(u, 10, 16))
    assert rows[1][:2] == [60.0, 68.0]


def test_window_ends_are_clamped_to_the_duration_and_flat_curves_give_one_zero_window():
    rows = propose_windows(np.array([0.0, 0.0, 0.1, 0.9, 1.0]), 2.0, 9.3, ZeroShotConfig(smooth_clips=1))
    assert rows[0][:2] == [6.0, 9.3]
    assert propose_windows(np.full(6, 0.3), 2.0, 12.0) == [[0.0, 12.0, 0.0]]
    assert propose_windows(np.zeros(0), 2.0, 1.0) == []
    with pytest.raises(ValueError, match="positive"):
        propose_windows(np.ones(3), 0.0, 6.0)
    with pytest.raises(ValueError, match="NaN"):
        propose_windows(np.array([0.1, np.nan, 0.3]), 2.0, 6.0)


def test_min_window_clips_and_max_windows():
    c = np.zeros(30)
    c[[3, 10, 20]] = 1.0
    one = propose_windows(c, 1.0, 30.0, ZeroShotConfig(smooth_clips=1, max_windows=2))
    assert len(one) == 2
    assert propose_windows(c, 1.0, 30.0, ZeroShotConfig(smooth_clips=1, min_window_clips=2)) == []


def test_video_scores_max_and_topk_mean():
    curve = np.array([0.1, 0.9, 0.2, 0.5, 0.4])
    assert video_score(curve, ZeroShotConfig(video_score="max")) == pytest.approx(0.9)
    assert video_score(curve, ZeroShotConfig(video_topk=3)) == pytest.approx((0.9 + 0.5 + 0.4) / 3)
    assert video_score(np.array([0.2]), ZeroShotConfig(video_topk=3)) == pytest.approx(0.2)
    assert video_score(np.zeros(0)) == -np.inf
    rng = np.random.default_rng(0)
    t = rng.standard_normal(8)
    feats = [rng.standard_normal((n, 8)) for n in (3, 7, 1)]
    want = [video_score(similarity_curve(t, f)) for f in feats]
    np.testing.assert_allclose(video_scores(t, feats), want, rtol=1e-5)


def test_similarity_curve_is_the_cosine_and_checks_widths():
    t = np.array([1.0, 0.0])
    f = np.array([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    # the cosine up to the package's one L2 epsilon (1e-5 on each norm, lavis_c2f.ops.vectors)
    np.testing.assert_allclose(similarity_curve(t, f), [1.0, 0.0, np.sqrt(0.5)], atol=3e-5)
    with pytest.raises(ValueError, match="width"):
        similarity_curve(np.ones(3), f)
    g = ground(t, f, clip_length=2.0, duration=6.0, config=ZeroShotConfig(smooth_clips=1))
    np.testing.assert_allclose(g["saliency"], g["curve"])
    assert g["windows"][0][:2] == [0.0, 2.0]


def test_nms_rows_keeps_the_best_of_overlapping_windows():
    rows = [[0.0, 10.0, 0.9], [1.0, 10.0, 0.8], [20.0, 30.0, 0.5]]
    assert nms_rows(rows, 0.5, 10) == [rows[0], rows[2]]
    assert nms_rows(rows, 0.5, 1) == [rows[0]]


def test_config_validation():
    with pytest.raises(ConfigError, match="video_score"):
        ZeroShotConfig(video_score="mean")
    with pytest.raises(ConfigError, match="levels"):
        ZeroShotConfig(levels=(0.0, 0.5))
    with pytest.raises(ConfigError, match="smooth_clips"):
        ZeroShotConfig(smooth_clips=0)
    with pytest.raises(ConfigError, match="unknown key"):
        ZeroShotConfig.from_mapping({"smoothing": 3})
    cfg = ZeroShotConfig.from_mapping({"levels": [0.9, 0.5], "video_score": "max"})
    assert cfg.levels == (0.5, 0.9) and cfg.to_dict()["levels"] == [0.5, 0.9]
