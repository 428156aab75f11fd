"""``lavis-c2f search``: table, JSON and plot output on an index of generated clips and on a demo corpus."""
import json
import re

import numpy as np
import pytest

from lavis_c2f.common.io import read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_ok(path):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # atomic write left no temporary file


def test_table_output_zero_shot(cli, zs_index):
    code, out, err = cli("search", zs_index, "a red screen", "--top-k", "4")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("mode: stage 1: ZERO-SHOT") and "stage 2: ZERO-SHOT" in lines[0]
    assert lines[1].startswith('query: "a red screen"  (3 videos searched, 3 grounded')
    header, rule, rows = lines[2], lines[3], lines[4:]
    assert header.split() == ["rank", "video", "start", "end", "score", "stage1", "stage2"]
    assert 1 <= len(rows) <= 4 and [r.split()[0] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    for r in rows:
        cells = r.split()
        assert cells[1] in {"pattern", "redblue", "gray"}
        assert re.fullmatch(r"\d\d:\d\d", cells[2]) and re.fullmatch(r"\d\d:\d\d", cells[3])
        assert len(r) == len(rule)  # right-aligned last column: every row as wide as the rule


def test_json_output(cli, zs_index):
    code, out, err = cli("search", zs_index, "a red screen", "--json", "--top-k", "3", "--stage1-top-k", "2")
    assert code == 0, err
    d = json.loads(out)
    assert d["query"] == "a red screen" and d["mode"] == {"stage1": "zero-shot", "stage2": "zero-shot",
                                                          "stage3": "off"}
    assert "ZERO-SHOT" in d["mode_description"] and d["plot"] is None
    assert len(d["stage1"]) == 2 and 1 <= len(d["moments"]) <= 3
    m = d["moments"][0]
    assert set(m) >= {"rank", "vid", "start", "end", "start_hms", "end_hms", "score", "stage1_score",
                      "stage2_score", "duration", "path"}
    assert m["rank"] == 1 and m["vid"] in {v for v, _ in d["stage1"]} and m["end"] > m["start"]
    scores = [x["score"] for x in d["moments"]]
    assert scores == sorted(scores, reverse=True)


def test_plot_is_a_valid_png(cli, zs_index, tmp_path):
    png = tmp_path / "plots" / "top.png"
    code, out, err = cli("search", zs_index, "a blue screen", "--plot", png)
    assert code == 0, err
    assert f"written to {png}" in out
    _png_ok(png)


def test_trained_checkpoints_from_the_command_line(cli, zs_index, ckpts, tmp_path):
    code, out, err = cli("search", zs_index, "a red screen", "--grounder-ckpt", ckpts["grounder"], "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["mode"]["stage1"] == "zero-shot" and d["mode"]["stage2"] == "trained"
    # a retriever that the (zero-shot) index was not built with is refused, with a hint
    code, out, err = cli("search", zs_index, "q", "--retriever-ckpt", ckpts["retriever"])
    assert code == 1 and "built without a trained retriever" in err and "Traceback" not in err


def test_demo_corpus_run_dir_with_ground_truth_plot(cli, demo, tmp_path):
    row = read_jsonl(demo["corpus"] / "annotations" / "val.jsonl")[0]
    png = tmp_path / "demo.png"
    code, out, err = cli("search", "--run-dir", demo["run"], row["query"], "--plot", png, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["mode"] == {"stage1": "trained", "stage2": "trained", "stage3": "off"} and d["plot"] == str(png)
    _png_ok(png)
    # INDEX may be the corpus folder itself, with explicit checkpoints
    code, out, err = cli("search", demo["corpus"], row["query"], "--retriever-ckpt", demo["stage1"]["ckpt"],
                         "--grounder-ckpt", demo["stage2"], "--splits", "val", "--top-k", "2")
    assert code == 0, err
    assert "12 videos" not in out and re.search(r"\(\d+ videos searched", out)


def test_plot_draws_the_ground_truth_of_the_top_video(demo, monkeypatch, tmp_path):
    """The plot gets the GT windows of the annotation when the top video is its video."""
    from lavis_c2f.predictor import C2FPredictor
    from lavis_c2f.search import cli as search_cli

    row = read_jsonl(demo["corpus"] / "annotations" / "val.jsonl")[0]
    p = C2FPredictor.for_demo_corpus(demo["run"], device="cpu", stage1_top_k=12)  # every video is grounded
    res = p.search(row["query"], top_k=1000)
    seen = {}

    def fake_plot(path, saliency, clip_length, duration, windows, gt_windows=None, title="", ylabel=""):
        seen.update(gt=gt_windows, title=title, n=len(saliency))
        return str(path)

    monkeypatch.setattr(search_cli, "plot_saliency", fake_plot)

    class Args:
        plot = str(tmp_path / "x.png")

    # put the annotated video first (the tiny random models need not rank it first)
    top = next(m for m in res if m.vid == row["vid"])
    res[:] = [top] + [m for m in res if m is not top]
    search_cli._plot(Args, p, res)
    assert seen["gt"] == [[float(a), float(b)] for a, b in row["relevant_windows"]]
    assert seen["n"] == len(res.details[row["vid"]].saliency) and row["vid"] in seen["title"]


@pytest.mark.parametrize("argv, message", [
    (["search", "a query"], "search needs INDEX"),
    (["search", "/nonexistent/index", "q"], "index folder not found"),
    (["search", "--run-dir", "/nonexistent/run", "q"], "run directory not found"),
    (["search", "INDEX", "q", "--refine"], "--refine needs --refiner-cfg"),
    (["search", "INDEX", "q", "--top-k", "0"], "--top-k and --stage1-top-k must be >= 1"),
])
def test_errors_are_one_line_messages(cli, zs_index, argv, message):
    argv = [zs_index if a == "INDEX" else a for a in argv]
    code, out, err = cli(*argv)
    assert code == 1 and message in err and "Traceback" not in err


def test_demo_options_are_checked(cli, demo, zs_index):
    code, _, err = cli("search", "--run-dir", demo["run"], "q", "--backbone", "random")
    assert code == 1 and "--backbone is not used with the demo corpus" in err
    code, _, err = cli("search", zs_index, "q", "--splits", "test")
    assert code == 1 and "--splits is only used with the demo corpus" in err
    code, _, err = cli("search", "--run-dir", demo["run"], "zebras juggling")
    assert code == 1 and "demo corpus vocabulary" in err


def test_empty_query(cli, zs_index):
    code, _, err = cli("search", zs_index, "   ")
    assert code == 1 and "query is empty" in err


def test_same_numbers_as_the_api(cli, zs_index):
    from lavis_c2f.predictor import C2FPredictor

    code, out, _ = cli("search", zs_index, "gray", "--json")
    d = json.loads(out)
    res = C2FPredictor.from_checkpoints(index=zs_index, backbone="random", device="cpu").search("gray")
    np.testing.assert_allclose([m["score"] for m in d["moments"]], [m.score for m in res])


def test_refine_with_a_refiner_yaml(cli, zs_index, tmp_path):
    """Stage 3 from the command line: the refiner config is a YAML (a 'refiner:' node), imported lazily."""
    import yaml

    from lavis_c2f.testing.tiny_refiner import TINY_VIT, make_tiny_assets

    root = tmp_path / "tiny"
    make_tiny_assets(str(root))
    cfg = {"refiner": {"model": {"arch": "c2f_tiny_caption_refiner", "model_type": "tiny", "variant": "interleaved",
                                 "tiny_assets": str(root), "vit_arch": TINY_VIT, "image_size": 32, "vit_precision": "fp32", "t5_precision": "fp32",
                                 "num_query_token": 4, "generation": {"num_beams": 1, "max_new_tokens": 8}},
                       "sampler": {"n_candidates": 8, "n_frames": 2}, "video_fps": 1.0}}
    (tmp_path / "refiner.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = cli("search", zs_index, "a red screen", "--refine", "--refiner-cfg", tmp_path / "refiner.yaml",
                         "--json", "--stage1-top-k", "2")
    assert code == 0, err
    d = json.loads(out)
    assert d["mode"]["stage3"] == "on" and "stage3_s" in d["timings"]
    assert len(d["stage1"]) == 2 and d["moments"]
    assert all(m["refined"] for m in d["moments"])  # refine_videos = 3 >= 2 grounded: every video is refined
    assert all(0 <= m["start"] < m["end"] <= m["duration"] + 1e-6 for m in d["moments"])
    # without --refine the refiner is not even built
    code, out, err = cli("search", zs_index, "a red screen", "--refiner-cfg", tmp_path / "refiner.yaml", "--json")
    assert code == 0 and json.loads(out)["mode"]["stage3"] == "off"


def test_queries_file_json_lines_equal_single_searches(cli, zs_index, tmp_path):
    qfile = tmp_path / "queries.txt"
    qfile.write_text("a red screen\n\n  a   gray screen \nblack\n", encoding="utf-8")
    code, out, err = cli("search", zs_index, "--queries-file", qfile, "--json", "--top-k", "3")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["line"] for d in lines] == [1, 3, 4]
    assert [d["query"] for d in lines] == ["a red screen", "a gray screen", "black"]
    for d in lines:
        code, one, err = cli("search", zs_index, d["query"], "--json", "--top-k", "3")
        assert code == 0, err
        single = json.loads(one)
        assert d["stage1"] == single["stage1"]
        assert [(m["vid"], m["start"], m["end"]) for m in d["moments"]] == \
            [(m["vid"], m["start"], m["end"]) for m in single["moments"]]
        np.testing.assert_allclose([m["score"] for m in d["moments"]], [m["score"] for m in single["moments"]],
                                   rtol=1e-6)
    code, out, err = cli("search", zs_index, "--queries-file", qfile, "--top-k", "2")
    assert code == 0, err
    assert "3 queries from" in out and 'line 3: "a gray screen"' in out


@pytest.mark.parametrize("content, message", [(None, "queries file not found"),
                                              ("\n  \n", "the queries file has no query")])
def test_queries_file_errors_name_the_file(cli, zs_index, tmp_path, content, message):
    qfile = tmp_path / "q.txt"
    if content is not None:
        qfile.write_text(content, encoding="utf-8")
    code, out, err = cli("search", zs_index, "--queries-file", qfile)
    assert code == 1 and out == ""
    assert str(qfile) in err and message in err and len(err.strip().splitlines()) == 1


def test_queries_file_and_query_are_exclusive(cli, zs_index, tmp_path):
    qfile = tmp_path / "q.txt"
    qfile.write_text("x\n", encoding="utf-8")
    code, _, err = cli("search", zs_index, "a query", "--queries-file", qfile)
    assert code == 1 and "either QUERY or --queries-file" in err
