import pytest

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.refiner.prompt import (PromptConfig, align_captions, build_prompt, format_time,
                                             format_windows, refine_region, render_prompt, select_captions,
                                             target_windows)
from lavis_c2f.models.refiner.srt import Caption

TASK = ("Given the video frames with their timestamps and speech, find the windows relevant to the query."
        "\nRelevant windows:")
CAPS = [Caption(20, 22, "outside"), Caption(0, 3, "hello everyone"), Caption(7.6, 9, "now we cut the vegetables")]


def test_exact_prompt_with_interleaved_timestamps_and_captions():
    p = build_prompt("A man cuts  vegetables", [4.0, 8.0, 12.0], 150.0, (2.0, 14.0), PromptConfig(),
                     captions=CAPS, reference_windows=[[6.0, 10.0, 0.9]])
    assert p.segments[:3] == [0, "t=4s", 'speech: "hello everyone"']
    assert p.n_captions == 2
    assert p.text == ('<frame> t=4s speech: "hello everyone" <frame> t=8s speech: "now we cut the vegetables" '
                      '<frame> t=12s duration=150s Query: A man cuts vegetables\n'
                      'Coarse windows: [[6, 10]]\nSearch region: [[2, 14]]\n' + TASK)


def test_prompt_decimals_no_reference_no_region_no_captions():
    cfg = PromptConfig(time_decimals=1, include_reference=False, include_region=False, max_captions=0,
                       duration_template="")
    p = build_prompt("q", [0.25, 1.75], 3.0, (0.0, 3.0), cfg, captions=CAPS)
    assert p.text == "<frame> t=0.2s <frame> t=1.8s Query: q\n" + TASK
    assert p.n_captions == 0


def test_caption_words_are_cut_and_templates_apply():
    cfg = PromptConfig(max_caption_words=2, caption_template="({text})", frame_time_template="@{t}")
    p = build_prompt("q", [8.0], 20.0, (0.0, 20.0), cfg, captions=[Caption(7, 8, "one two three four")])
    assert render_prompt(p.segments).startswith("<frame> @8 (one two) duration=20s")


def test_region_margins_and_clipping():
    wins = [[10, 20, 0.5], [100, 110, 0.9]]
    assert refine_region(wins, 150, margin_s=4, margin_ratio=0.5, n_ref_windows=1) == (95.0, 115.0)
    assert refine_region(wins, 150, margin_s=4, margin_ratio=0.0, n_ref_windows=1) == (96.0, 114.0)
    assert refine_region(wins, 150, margin_s=4, margin_ratio=0.5, n_ref_windows=2) == (0.0, 150.0)
    assert refine_region([[2, 8, 1]], 10, margin_s=5) == (0.0, 10.0)
    assert refine_region([[2, 8]], 100, margin_s=1) == (1.0, 9.0)


def test_region_without_valid_windows_is_whole_video():
    assert refine_region(None, 30) == (0.0, 30.0)
    assert refine_region([[5, 5, 1], [float("nan"), 3, 1], [9, 2, 1]], 30, margin_s=2) == (0.0, 30.0)
    assert refine_region([[40, 50, 1]], 30, margin_s=0) == (0.0, 30.0)  # entirely outside the video
    with pytest.raises(ValueError):
        refine_region([[1, 2]], 0)


def test_target_windows_clipped_to_region():
    assert target_windows([[0, 10], [20, 30], [40, 50]], (5.0, 25.0)) == [(5.0, 10.0), (20.0, 25.0)]
    assert target_windows([[0, 4]], (5.0, 25.0)) == []
    assert target_windows([[30, 32], [0, 2], [10, 12]], (0.0, 40.0), max_windows=2) == [(0.0, 2.0), (10.0, 12.0)]


def test_select_and_align_captions():
    caps = [Caption(0, 1, "cooking pasta"), Caption(2, 3, "weather today"), Caption(4, 5, "more pasta sauce")]
    assert [c.text for c in select_captions(caps, (0, 10), "a man cooking pasta", 2)] == \
        ["cooking pasta", "more pasta sauce"]
    assert select_captions(caps, (0, 10), "x", 0) == []
    aligned = align_captions(caps, [0.0, 2.5, 5.0], (0.0, 10.0))
    assert [[c.text for c in a] for a in aligned] == [["cooking pasta"], ["weather today"], ["more pasta sauce"]]
    # tie between two frames goes to the earlier one
    assert align_captions([Caption(1, 2, "t")], [0.0, 2.0], (0.0, 3.0))[0][0].text == "t"


def test_format_helpers():
    assert format_time(12.5) == "12" and format_time(13.5) == "14"  # round half to even
    assert format_time(12.25, 1) == "12.2"
    assert format_windows([(12, 30), (40.4, 52.6)]) == "[[12, 30], [40, 53]]"
    assert format_windows([]) == "[]"
    with pytest.raises(ValueError):
        format_time(float("nan"))


def test_bad_prompt_inputs_and_config():
    with pytest.raises(ValueError, match="increasing"):
        build_prompt("q", [2.0, 1.0], 10.0, (0, 10), PromptConfig())
    with pytest.raises(ConfigError, match="unknown"):
        PromptConfig.from_mapping({"time_decimal": 1})
    with pytest.raises(ConfigError, match=r"\{t\}"):
        PromptConfig.from_mapping({"frame_time_template": "t="})
    with pytest.raises(ConfigError):
        PromptConfig.from_mapping({"max_captions": -1})
    assert PromptConfig.from_mapping({"time_decimals": 1}).time_decimals == 1


def test_long_query_is_cut_by_words_never_the_instruction():
    p = build_prompt(" ".join(["word"] * 100), [1.0], 2.0, (0.0, 2.0), PromptConfig(max_query_words=3))
    assert p.text.endswith("Query: word word word\nCoarse windows: []\nSearch region: [[0, 2]]\n" + TASK)
