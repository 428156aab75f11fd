"""Expected figures (lavis_c2f/pipeline/expected.py): statistics, the data file, the quickstart's
range lines, and the README's Results section agreeing with the data file."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.pipeline.expected import (TARGET, FigureStats, expected_path, load_expected, scaled_target,
                                         write_expected)
from lavis_c2f.pipeline.quickstart import COLUMNS, expected_lines

README = Path(__file__).resolve().parents[3] / "README.md"


def test_figure_stats_mean_sample_sd_and_range():
    st = FigureStats.of([70.0, 72.0, 74.0])
    assert (st.mean, st.sd, st.min, st.max) == (72.0, 2.0, 70.0, 74.0)     # sd with ddof 1
    assert (st.lo, st.hi) == (68.0, 76.0)                                     # mean -/+ 2 sd
    tight = FigureStats.of([50.0, 50.0])
    assert tight.sd == 0 and (tight.lo, tight.hi) == (49.0, 51.0)             # the 1-point floor
    assert FigureStats.of([3.0]).sd == 0.0
    assert (FigureStats.of([94.0, 100.0]).hi, FigureStats.of([0.0, 2.0]).lo) == (100.0, 0.0)   # percentages
    assert st.contains(68.0) and st.contains(76.0) and not st.contains(76.01)
    with pytest.raises(ValueError):
        FigureStats.of([])


def test_scaled_target_grows_as_one_over_sqrt_of_the_split():
    assert scaled_target(203, 203) == TARGET
    assert scaled_target(100, 400) == pytest.approx(2 * TARGET)
    assert scaled_target(400, 100, target=1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        scaled_target(0, 203)


def test_write_and_load_round_trip_keeps_other_jobs(tmp_path):
    path = str(tmp_path / "exp.yaml")
    write_expected({"a": {"measured": {"date": "2026-01-01"}, "settings": {"args": ["--x"]},
                          "runs": [{"label": "threads 1"}], "figures": {"m": FigureStats.of([1.0, 3.0])}}},
                   path=path, header="# header\n")
    write_expected({"b": {"figures": {"n": FigureStats.of([5.0])}}}, path=path)
    a, b = load_expected("a", path), load_expected("b", path)
    assert a.figures["m"] == FigureStats.of([1.0, 3.0]) and a.settings == {"args": ["--x"]}
    assert a.measured["date"] == "2026-01-01" and len(a.runs) == 1
    assert b.figures["n"].mean == 5.0
    assert load_expected("missing", path) is None
    assert [c[0] for c in a.check({"m": 2.0, "other": 1.0})] == ["m"]


def test_load_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  q:\n    figures:\n      m: {mean: 1}\n")
    with pytest.raises(DataFormatError) as e:
        load_expected("q", str(bad))
    assert "bad.yaml" in str(e.value) and "jobs.q.figures.m" in str(e.value)
    with pytest.raises(DataFormatError, match="not found"):
        load_expected("q", str(tmp_path / "none.yaml"))


def test_quickstart_expected_lines():
    exp = load_expected("quickstart")
    assert exp is not None and exp.figures, f"{expected_path()} has no quickstart figures"
    inside = {k: st.mean for k, st in exp.figures.items()}
    rows, lines, checks = expected_lines(inside, applies=True)
    assert [r[0] for r in rows] == ["expected low (README)", "expected high (README)"]
    assert "inside the README's expected range" in lines[0] and all(c["inside"] for c in checks.values())
    key = next(iter(exp.figures))
    outside = dict(inside, **{key: exp.figures[key].hi + 5})
    _, lines, checks = expected_lines(outside, applies=True)
    assert lines[0].startswith("OUTSIDE") and not checks[key]["inside"]
    rows, lines, checks = expected_lines(inside, applies=False)
    assert rows == [] and checks == {} and "not shown" in lines[0]


def _table_row(label_start: str) -> list:
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"| {label_start}"):
            return [c.strip() for c in line.strip().strip("|").split("|")][1:]
    raise AssertionError(f"README has no table row starting with '| {label_start}'")


def test_readme_results_agree_with_the_data_file():
    qs = load_expected("quickstart")
    keys = [key for _, key in COLUMNS]
    assert set(keys) <= set(qs.figures)
    assert _table_row(f"trained, mean ± sd of {len(qs.runs)} runs") == \
        [f"{qs.figures[k].mean:.1f} ± {qs.figures[k].sd:.1f}" for k in keys]
    assert _table_row("expected range") == [f"{qs.figures[k].lo:.1f}–{qs.figures[k].hi:.1f}" for k in keys]
    stage2 = ["MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "HL-min-VeryGood-mAP"]
    for job, label in (("demo_stage2", "QD-DETR |"), ("demo_stage2_mesm", "QD-DETR + MESM")):
        exp = load_expected(job)
        cells = _table_row(label)
        assert cells[:4] == [f"{exp.figures[k].mean:.1f} ± {exp.figures[k].sd:.1f}" for k in stage2], job
    text = README.read_text(encoding="utf-8")
    assert re.search(re.escape(qs.measured["date"]), text), "README Results: the bench's date"
