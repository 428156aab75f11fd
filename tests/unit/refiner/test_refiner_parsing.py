import time

import pytest

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.refiner.parsing import ParseConfig, RefineStats, parse_windows, windows_with_scores

D = 150.0


@pytest.mark.parametrize("text,windows", [
    ("[[12, 30]]", [(12.0, 30.0)]),
    ("[[12.5, 30.0], [40, 52]]", [(12.5, 30.0), (40.0, 52.0)]),
    ("  [ [ 12 ,30 ] ,[40,52]]  ", [(12.0, 30.0), (40.0, 52.0)]),
    ("[[12, 30], [40, 5", [(12.0, 30.0)]),              # cut by max_new_tokens
    ("[[12, 30]] blah [[12, 30]]", [(12.0, 30.0)]),     # duplicates removed
    ("[[-0.5, 10], [140, 150.8]]", [(0.0, 10.0), (140.0, 150.0)]),  # within tolerance: clamped
    ("Relevant windows: [[2, 4]]</s>", [(2.0, 4.0)]),
])
def test_valid_generations(text, windows):
    r = parse_windows(text, D)
    assert r.ok and r.windows == windows and r.reason is None


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("   ", "empty"), ("[]", "empty"), ("[ ]", "empty"), ("[", "empty"),
    ("the man is cooking", "no_windows"), ("[[12, ", "no_windows"), ("[[12 30]]", "no_windows"),
    ("[[1.2.3, 4]]", "no_windows"), ("[[nan, 5]]", "no_windows"), ("[[inf, 5]]", "no_windows"),
    ("[[30, 12]]", "invalid"), ("[[12, 12]]", "invalid"), ("[[12, 900]]", "invalid"),
    ("[[-5, 10]]", "invalid"), ("[[200, 300]]", "invalid"),
    ("\x00\uffff[[\u0663, \u0664]]", "no_windows"),
])
def test_malformed_generations_fall_back(text, reason):
    r = parse_windows(text, D)
    assert not r.ok and r.windows == [] and r.reason == reason


def test_mixed_valid_and_invalid_keeps_valid_and_counts_dropped():
    r = parse_windows("[[30, 12], [12, 30], [900, 901]]", D)
    assert r.ok and r.windows == [(12.0, 30.0)] and r.n_dropped == 2


def test_options():
    assert parse_windows("[[30, 12]]", D, ParseConfig(swap_reversed=True)).windows == [(12.0, 30.0)]
    assert not parse_windows("[[10, 11]]", D, ParseConfig(min_length_s=2.0)).ok
    assert not parse_windows("[[140, 150.8]]", D, ParseConfig(tolerance_s=0.0)).ok
    many = " ".join(f"[[{i}, {i + 1}]]" for i in range(20))
    assert len(parse_windows(many, D, ParseConfig(max_windows=3)).windows) == 3


def test_extremely_long_and_non_string_inputs():
    long = "[[1, 2]]" + "9" * 5_000_000
    t0 = time.perf_counter()
    r = parse_windows(long, D)
    assert r.ok and r.windows == [(1.0, 2.0)] and time.perf_counter() - t0 < 1.0
    assert not parse_windows("x" * 3000 + "[[1, 2]]", D).ok  # beyond max_chars
    for bad in (None, 12, b"[[1, 2]]", ["[[1, 2]]"]):
        assert parse_windows(bad, D).reason == "no_windows"
    assert not parse_windows("[[1, 2]]", float("nan")).ok
    assert not parse_windows("[[1, 2]]", 0.0).ok


def test_stats_counting_and_summary():
    s = RefineStats()
    for text in ("[[1, 2]]", "garbage", "[]", "[[5, 1]]", "[[3, 4]]"):
        s.record(parse_windows(text, D))
    s.record_fallback("frames_unavailable")
    assert (s.n_refined, s.n_fallback, s.n_total) == (2, 4, 6)
    assert s.as_dict()["fallback_reasons"] == {"empty": 1, "frames_unavailable": 1, "invalid": 1, "no_windows": 1}
    assert s.n_dropped_windows == 1
    assert s.summary().startswith("refiner: 2/6 refined, 4 fell back to stage 2 (empty=1,")
    t = RefineStats()
    t.merge(s)
    assert t.as_dict() == s.as_dict()
    s.reset()
    assert s.n_total == 0 and not s.fallback_reasons


def test_windows_with_scores():
    out = windows_with_scores([(10, 20), (30, 40)], 0.9, [[11, 20, 0.8], [50, 60, 0.5], [70, 80, 0.4]],
                              keep_stage2_tail=True)
    assert [w[:2] for w in out] == [[10, 20], [30, 40], [50, 60], [70, 80]]
    scores = [w[2] for w in out]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(0.9)
    assert windows_with_scores([(1, 2)], float("nan"), [], False) == [[1.0, 2.0, 1e-6]]
    assert len(windows_with_scores([(i, i + 1) for i in range(5)], 1.0, [[50, 60, 1]] * 3, True, max_windows=4)) == 4


def test_parse_config_validation():
    with pytest.raises(ConfigError, match="unknown"):
        ParseConfig.from_mapping({"max_window": 3})
    with pytest.raises(ConfigError):
        ParseConfig.from_mapping({"max_windows": 0})
    with pytest.raises(ConfigError):
        ParseConfig.from_mapping({"tolerance_s": -1})
    assert ParseConfig.from_mapping({"tolerance_s": 2}).tolerance_s == 2.0
