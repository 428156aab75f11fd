"""The demo corpus text encoder (fidelity to the generator) and the demo-corpus predictor."""
import json
import logging

import numpy as np
import pytest

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import read_jsonl
from lavis_c2f.data.demo_text import DemoTextEncoder, tokenize
from lavis_c2f.predictor import C2FPredictor, DemoCorpus


@pytest.fixture(scope="module")
def encoder(demo):
    return DemoTextEncoder.from_corpus(demo["corpus"])


def _cos(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_reencoding_corpus_queries_matches_the_stored_features_up_to_the_noise(demo, encoder):
    root = demo["corpus"]
    noise = demo["meta"]["params"]["text_noise"]
    rows = read_jsonl(root / "annotations" / "train.jsonl") + read_jsonl(root / "annotations" / "test.jsonl")
    tok_cos, pool_cos, resid, cross = [], [], [], []
    for r in rows:
        with np.load(root / "clip_text_features" / f"qid{r['qid']}.npz") as z:
            tok, pooled = z["last_hidden_state"], z["pooler_output"]
        f = encoder.encode(r["query"])
        assert f.tokens.shape == tok.shape and f.pooled.shape == pooled.shape and not f.skipped
        assert f.words[0] == "<sos>" and f.words[-1] == "<eos>"
        tok_cos.append(_cos(tok, f.tokens).mean())
        pool_cos.append(_cos(pooled, f.pooled))
        resid.append(np.linalg.norm(tok - f.tokens, axis=1).mean())
    # the residual is exactly the generator's token noise: text_noise * eps, E||eps|| ~ 1
    assert np.mean(resid) == pytest.approx(noise, rel=0.1)
    assert min(tok_cos) > 0.9 and min(pool_cos) > 0.9
    # and a query's encoding is closer to its own stored features than to other queries'
    pooled_all = np.stack([np.load(root / "clip_text_features" / f"qid{r['qid']}.npz")["pooler_output"] for r in rows])
    enc_all = np.stack([encoder.encode(r["query"]).pooled for r in rows])
    sims = _cos(enc_all[:, None, :], pooled_all[None, :, :])
    assert (sims.argmax(1) == np.arange(len(rows))).mean() > 0.9


def test_unknown_words_are_skipped_with_a_warning(encoder, caplog):
    base = encoder.encode("a chef washes the bucket in the garage")
    caplog.set_level(logging.WARNING, logger="lavis_c2f.data.demo_text")
    f = encoder.encode("A chef, quickly washes the bucket in the garage!!")
    assert f.skipped == ["quickly"] and any("quickly" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(f.tokens, base.tokens)
    np.testing.assert_allclose(f.pooled, base.pooled)


def test_queries_without_known_or_content_words_are_errors(encoder):
    with pytest.raises(ConfigError, match="no word of the query .* e.g. "):
        encoder.encode("zebras juggling flamingos")
    with pytest.raises(ConfigError, match="no content word"):
        encoder.encode("the a in near")
    with pytest.raises(ConfigError, match="empty"):
        encoder.encode(" ... ")
    with pytest.raises(TypeError):
        encoder.encode_text("a chef")


def test_encoder_is_deterministic_and_names_its_corpus(demo, encoder, tmp_path):
    again = DemoTextEncoder.from_corpus(demo["corpus"])
    a, b = encoder.encode("the dog kicks a ball"), again.encode("the dog kicks a ball")
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert encoder.weights_id == again.weights_id == DemoCorpus(demo["corpus"]).weights_id
    assert encoder.dim == 24 and a.tokens.dtype == np.float32 and set(a.as_npz_fields()) == {
        "last_hidden_state", "pooler_output"}
    assert tokenize("The <sos> Dog's ball.") == ["the", "<sos>", "dog", "s", "ball"]
    with pytest.raises(DataFormatError, match="not a demo corpus"):
        DemoTextEncoder.from_corpus(tmp_path)
    meta = json.loads((demo["corpus"] / "corpus.json").read_text())
    meta["version"] = 99
    (tmp_path / "corpus.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="version 99"):
        DemoTextEncoder.from_corpus(tmp_path)


@pytest.fixture(scope="module")
def demo_predictor(demo):
    return C2FPredictor.for_demo_corpus(demo["run"], device="cpu")


def test_demo_predictor_searches_the_corpus_features(demo, demo_predictor):
    p = demo_predictor
    assert p.mode == {"stage1": "trained", "stage2": "trained", "stage3": "off"}
    assert p.fusion.weight == 0.5  # the run's fusion.json
    assert p.sources["retriever"] == demo["stage1"]["ckpt"] and p.sources["grounder"] == demo["stage2"]
    row = read_jsonl(demo["corpus"] / "annotations" / "test.jsonl")[0]
    res = p.search(row["query"], top_k=5)
    assert 1 <= len(res) <= 5 and len(res.stage1) == min(10, 12)
    durations = demo["meta"]["durations"]
    assert all(m.vid in durations and 0 <= m.start < m.end <= durations[m.vid] + 1e-6 for m in res)
    for vid, det in res.details.items():
        assert len(det.saliency) == round(durations[vid] / 2.0)
    assert p.ground_truth(row["query"]) == [(row["vid"], row["relevant_windows"])]
    assert p.ground_truth(row["query"].upper() + "!!") == p.ground_truth(row["query"])
    assert p.ground_truth("a chef juggles") == []
    v = p.video(row["vid"])
    assert v.path is None and v.features.shape[1] == 32
    m = p.predict(row["query"], v, top_k=3)
    assert len(m.windows) <= 3 and m.mode == "trained"


def test_demo_predictor_splits_and_refusals(demo):
    p = C2FPredictor.for_demo_corpus(demo["run"], splits=["test"], device="cpu")
    test_vids = set(demo["meta"]["splits"]["test"]["vids"])
    assert set(p.corpus.vids) == test_vids
    assert {v for v, _ in p.stage1("a dog kicks the ball", k=50)} <= test_vids
    with pytest.raises(ConfigError, match="unknown demo corpus split"):
        C2FPredictor.for_demo_corpus(demo["run"], splits=["dev"], device="cpu")
    with pytest.raises(ConfigError, match="no video backbone"):
        p.encode_video("x.mp4")

    class NeverCalled:
        def refine(self, *a, **k):
            raise AssertionError("the refiner must not run without frames")

    with_refiner = C2FPredictor.for_demo_corpus(demo["run"], splits=["test"], refiner=NeverCalled(), device="cpu")
    assert with_refiner.mode["stage3"] == "on"
    with pytest.raises(ConfigError, match="stage 3 needs the video file of .* the demo corpus has none"):
        with_refiner.predict("a dog kicks the ball", with_refiner.video(sorted(test_vids)[0]))


def test_demo_predictor_from_config_and_explicit_checkpoints(demo):
    p = C2FPredictor.from_config({"demo_corpus": str(demo["corpus"]), "retriever_ckpt": demo["stage1"]["ckpt"],
                                  "grounder_ckpt": demo["stage2"], "device": "cpu", "stage1_top_k": 3})
    assert p.stage1_top_k == 3 and p.fusion.weight == 1.0  # no run dir: the default fusion
    assert len(p.search("a tired chef washes the bucket").stage1) == 3
