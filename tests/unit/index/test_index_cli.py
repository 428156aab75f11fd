"""``lavis-c2f index build|add|remove|info|search`` on a tiny npz feature store, and the list of
index sub-commands the ``lavis-c2f index VIDEO_DIR`` shorthand relies on."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from lavis_c2f import cli
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.index import CorpusIndex
from lavis_c2f.index import cli as index_cli

D = 12


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    feats = tmp_path / "clip_features"
    feats.mkdir()
    vids = [f"vid_{i}_{i * 10.0}_{i * 10.0 + 30}" for i in range(30)]   # dots in ids, like QVHighlights
    for v in vids:
        np.savez(feats / f"{v}.npz", features=rng.standard_normal((int(rng.integers(3, 10)), D)).astype(np.float32))
    ann = tmp_path / "val.jsonl"
    with open(ann, "w") as f:
        for i, v in enumerate(vids[:20]):
            f.write(json.dumps({"qid": i, "query": f"query {i}", "vid": v, "duration": 150,
                                "relevant_windows": [[0, 2]]}) + "\n")
    qdir = tmp_path / "text"
    qdir.mkdir()
    for q in range(3):
        np.savez(qdir / f"qid{q}.npz", last_hidden_state=rng.standard_normal((6, D)).astype(np.float32),
                 pooler_output=rng.standard_normal(D).astype(np.float32))
    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"model": {
        "arch": "c2f_tmass_retriever", "text_input_dim": D, "video_input_dim": D, "embed_dim": 8, "num_frames": 4,
        "num_heads": 1, "num_trials": 3, "pool_dropout": 0.0}}))
    return {"root": tmp_path, "feats": str(feats), "ann": str(ann), "vids": vids, "cfg": str(cfg),
            "queries": [str(qdir / f"qid{q}.npz") for q in range(3)]}


def test_build_info_search_add_remove(corpus, capsys):
    out = str(corpus["root"] / "ix")
    assert cli.main(["index", "build", "--features", corpus["feats"], "--ann", corpus["ann"], "--only-ann-vids",
                     "--model-cfg", corpus["cfg"], "--out", out, "--no-progress", "--batch-size", "7"]) == 0
    assert "indexed 20 videos" in capsys.readouterr().out
    ix = CorpusIndex.load(out)
    assert len(ix) == 20 and ix.duration(corpus["vids"][0]) == 150.0

    assert cli.main(["index", "info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["videos"] == 20 and info["dim"] == 8 and info["ann"]["kind"] == "flat" and info["version"] == 1
    assert cli.main(["index", "info", out]) == 0
    assert "pre-filter flat" in capsys.readouterr().out

    # building over an existing folder needs --overwrite
    assert cli.main(["index", "build", "--features", corpus["feats"], "--model-cfg", corpus["cfg"],
                     "--out", out, "--no-progress"]) == 1
    capsys.readouterr()

    rank = str(corpus["root"] / "rank.jsonl")
    assert cli.main(["index", "search", out, "--query-features", *corpus["queries"], "--model-cfg", corpus["cfg"],
                     "-k", "4", "--out", rank]) == 0
    rows = [json.loads(x) for x in open(rank)]
    assert [r["qid"] for r in rows] == ["0", "1", "2"] and all(len(r["ranked_vids"]) == 4 for r in rows)

    # the CLI ranking equals the model's exhaustive ranking over the same normalised features
    from lavis_c2f.data.features import l2_normalize
    from lavis_c2f.index.cli import load_retriever

    model = load_retriever(corpus["cfg"])
    z = np.load(corpus["queries"][0])
    with torch.no_grad():
        t = model.encode_text(torch.from_numpy(l2_normalize(z["last_hidden_state"]))[None], None,
                              torch.from_numpy(l2_normalize(z["pooler_output"]))[None])
    exh = CorpusIndex.load(out, model=model).search_exhaustive(t, k=4)[0]
    assert [v for v, _ in exh] == [v for v, _ in rows[0]["ranked_vids"]]

    assert cli.main(["index", "add", out, "--features", corpus["feats"], "--model-cfg", corpus["cfg"],
                     "--no-progress"]) == 0
    assert "added 10 videos; 30 videos" in capsys.readouterr().out
    assert cli.main(["index", "remove", out, corpus["vids"][0], corpus["vids"][1], "--compact"]) == 0
    assert "28 videos left" in capsys.readouterr().out
    assert cli.main(["index", "remove", out, "not-a-vid"]) == 1
    assert "not in the index" in capsys.readouterr().err


def test_shards_and_checkpoint(corpus, capsys, tmp_path):
    from lavis_c2f.index.cli import load_retriever
    from lavis_c2f.models.checkpoint import save_checkpoint

    model = load_retriever(corpus["cfg"])
    with torch.no_grad():
        model.pool.q_proj.weight.add_(0.05)
    ckpt = str(tmp_path / "ckpt.pth")
    save_checkpoint({"model": model.state_dict()}, ckpt)
    dirs = []
    for i in range(2):
        d = str(tmp_path / f"shard{i}")
        assert cli.main(["index", "build", "--features", corpus["feats"], "--model-cfg", corpus["cfg"],
                         "--checkpoint", ckpt, "--out", d, "--shard", f"{i}/2", "--no-progress"]) == 0
        dirs.append(d)
    capsys.readouterr()
    sizes = [len(CorpusIndex.load(d)) for d in dirs]
    assert sum(sizes) == 30 and min(sizes) > 0
    # an index built from the checkpoint refuses the untrained model
    assert cli.main(["index", "search", dirs[0], "--query-features", corpus["queries"][0],
                     "--model-cfg", corpus["cfg"]]) == 1
    assert "weights_hash" in capsys.readouterr().err
    assert cli.main(["index", "search", *dirs, "--query-features", corpus["queries"][0], "--model-cfg",
                     corpus["cfg"], "--checkpoint", ckpt, "-k", "30", "-m", "100"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["ranked_vids"]) == 30 and {v for v, _ in row["ranked_vids"]} == set(corpus["vids"])
    scores = [s for _, s in row["ranked_vids"]]
    assert scores == sorted(scores, reverse=True)


def test_index_subcommands_are_all_listed_for_the_shorthand():
    """``lavis-c2f index VIDEO_DIR`` expands unless the word is a sub-command: the list is complete."""
    parser = cli.build_parser()
    index = next(a for a in parser._actions if a.dest == "command").choices["index"]
    registered = set(next(a for a in index._actions if a.dest == "index_command").choices)
    assert registered == set(index_cli.SUBCOMMANDS) and "videos" in registered


def test_width_mismatches_are_clear_errors(corpus, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(open(corpus["cfg"]))
    cfg["model"]["video_input_dim"] = 16
    bad.write_text(yaml.safe_dump(cfg))
    assert cli.main(["index", "build", "--features", corpus["feats"], "--model-cfg", str(bad),
                     "--out", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "video_input_dim is 16" in capsys.readouterr().err
    out = str(tmp_path / "ix")
    assert cli.main(["index", "build", "--features", corpus["feats"], "--model-cfg", corpus["cfg"],
                     "--out", out, "--no-progress", "--limit", "5"]) == 0
    q = tmp_path / "qid9.npz"
    np.savez(q, pooler_output=np.ones(7, np.float32))
    assert cli.main(["index", "search", out, "--query-features", str(q), "--model-cfg", corpus["cfg"]]) == 1
    assert "qid9.npz" in capsys.readouterr().err


def test_load_retriever_merges_model_type_defaults(tmp_path):
    """A YAML naming only ``arch`` + ``model_type`` gets that type's defaults; its own keys win."""
    from lavis_c2f.index.cli import load_retriever

    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  arch: c2f_tmass_retriever\n  model_type: demo\n  num_trials: 3\n")
    model = load_retriever(str(cfg))
    assert model.embed_dim == 256          # from c2f_tmass_demo.yaml (the class default is 512)
    assert model.num_trials == 3           # the user's key wins
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: c2f_tmass_retriever\n  model_type: nope\n")
    with pytest.raises(ConfigError, match="model_type.*nope.*known"):
        load_retriever(str(bad))
