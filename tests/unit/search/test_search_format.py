"""Clock times and the aligned result table of ``lavis-c2f search``."""
import math

import pytest

from lavis_c2f.search.format import format_table, format_time, moments_table


@pytest.mark.parametrize("seconds, text", [
    (0, "00:00"), (4.4, "00:04"), (59.4, "00:59"), (59.6, "01:00"), (65, "01:05"), (600, "10:00"),
    (3599.4, "59:59"), (3599.6, "1:00:00"), (3600, "1:00:00"), (3725, "1:02:05"), (36000, "10:00:00"),
])
def test_format_time(seconds, text):
    assert format_time(seconds) == text


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, None])
def test_format_time_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        format_time(bad)


def test_table_columns_are_aligned():
    rows = [{"rank": 1, "vid": "a", "start": 4.0, "end": 3725.0, "score": 1.23456, "stage1_score": 0.5,
             "stage2_score": None},
            {"rank": 10, "vid": "long_video_name", "start": 62.0, "end": 66.0, "score": 0.2, "stage1_score": -0.125,
             "stage2_score": 0.75}]
    lines = moments_table(rows).splitlines()
    assert lines[0].split() == ["rank", "video", "start", "end", "score", "stage1", "stage2"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    # right-aligned numbers end in the same column, the video column is left-aligned
    assert lines[2].split()[1:4] == ["a", "00:04", "1:02:05"] and lines[3].split()[2:4] == ["01:02", "01:06"]
    assert lines[2].index("1.235") + 5 == lines[3].index("0.200") + 5
    assert lines[2].index(" a ") + 1 == lines[3].index("long_video_name")
    assert lines[2].endswith("-") and lines[3].endswith("0.750")
    assert len({len(line) for line in lines[1:]}) == 1
    with pytest.raises(ValueError, match="one cell per header"):
        format_table(["a", "b"], [[1]])
