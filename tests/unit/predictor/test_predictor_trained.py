"""C2FPredictor with (tiny, randomly initialised) trained-path checkpoints saved by the model APIs."""
import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.checkpoint import load_retriever, save_checkpoint
from lavis_c2f.models.grounder import load_grounder
from lavis_c2f.models.grounder.lavis_models import C2FQDDETR
from lavis_c2f.models.grounder.predictor import GrounderPredictor
from lavis_c2f.predictor import C2FPredictor
from predictor_helpers import GROUNDER_CFG, OFFICIAL_MESM, OFFICIAL_QD, random_backbone, save_tiny_grounder, save_tiny_retriever


@pytest.fixture(scope="module")
def predictor(trained_index, ckpts):
    return C2FPredictor.from_checkpoints(grounder_ckpt=ckpts["grounder"], backbone="random", index=trained_index,
                                         device="cpu")


def _l2(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-5)


def test_trained_mode_uses_the_index_retriever(predictor, ckpts):
    assert predictor.mode == {"stage1": "trained", "stage2": "trained", "stage3": "off"}
    d = predictor.describe_mode()
    assert "trained T-MASS" in d and ckpts["retriever"] in d and "trained c2f_qd_detr" in d and "ZERO" not in d


def test_stage1_is_the_index_search_of_the_retriever(predictor):
    q = predictor.encode_query("a blue screen")
    r = predictor.retriever
    with torch.no_grad():
        emb = r.encode_text(torch.from_numpy(_l2(q.tokens))[None], torch.ones(1, q.tokens.shape[0]),
                            torch.from_numpy(_l2(q.pooled))[None])
    want = predictor.corpus.index.search_exhaustive(emb, k=3)[0]
    got = predictor.stage1("a blue screen", k=3)
    assert [v for v, _ in got] == [v for v, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)


def test_short_video_equals_the_grounder_predictor(predictor, videos):
    v = predictor.encode_video(videos["gray"])
    assert v.n_clips <= GROUNDER_CFG["max_v_l"]
    m = predictor.predict("a gray screen", v, top_k=10)
    gp = GrounderPredictor(predictor.grounder, clip_length=2.0)
    want = gp.predict(predictor.encode_query("a gray screen").tokens, v.features, v.duration)
    distinct = []
    for w in want["windows"]:  # the predictor leaves out empty windows and repeated spans
        if w[1] > w[0] and w[:2] not in [d[:2] for d in distinct]:
            distinct.append(list(map(float, w)))
    assert m.windows == distinct and len(distinct) >= 1
    np.testing.assert_allclose(m.saliency, np.asarray(want["saliency"], np.float32), rtol=1e-6)
    assert m.mode == "trained"


def test_long_videos_are_grounded_in_overlapping_chunks(predictor, videos):
    v = predictor.encode_video(videos["pattern"])  # 6 clips > max_v_l = 4: chunks [0, 4) and [2, 6)
    assert v.n_clips == 6
    m = predictor.predict("a test pattern", v, top_k=50)
    tok = predictor.encode_query("a test pattern").tokens
    gp = GrounderPredictor(predictor.grounder, clip_length=2.0)
    c0, c1 = gp.predict_many(tok, [v.features[0:4], v.features[2:6]], [8.0, 8.0])
    s0, s1 = np.asarray(c0["saliency"], np.float64), np.asarray(c1["saliency"], np.float64)
    want = np.array([s0[0], s0[1], (s0[2] + s1[0]) / 2, (s0[3] + s1[1]) / 2, s1[2], s1[3]])
    np.testing.assert_allclose(m.saliency, want, rtol=1e-5, atol=1e-6)
    pool = [[a, b, s] for a, b, s in c0["windows"]]
    pool += [[min(a + 4.0, v.duration), min(b + 4.0, v.duration), s] for a, b, s in c1["windows"]]
    assert m.windows and all(w in pool for w in m.windows)
    assert [w[2] for w in m.windows] == sorted((w[2] for w in m.windows), reverse=True)
    assert all(0.0 <= a < b <= v.duration + 1e-6 for a, b, _ in m.windows)


def test_search_grounds_the_top_videos_in_one_call(predictor, monkeypatch):
    calls = []
    orig = GrounderPredictor.predict_pairs

    def spy(self, qs, vids, durs):
        calls.append(len(vids))
        return orig(self, qs, vids, durs)

    monkeypatch.setattr(GrounderPredictor, "predict_pairs", spy)
    res = predictor.search("a red screen", top_k=5)
    assert len(calls) == 1 and calls[0] >= len(res.stage1) == 3
    assert 1 <= len(res) <= 5 and all(m.stage2_score is not None for m in res)
    assert all(0.0 <= m.start < m.end <= m.duration + 1e-6 for m in res)


def test_grounder_dims_must_match_the_backbone(tmp_path, videos):
    bad_vid = save_tiny_grounder(tmp_path / "v.pth", vid_dim=30)
    with pytest.raises(ConfigError, match=r"expects 30-d clip features .* c2f_feature_random backbone gives 16-d "
                                          r"features \(\+2 TEF = 18\)"):
        C2FPredictor.from_checkpoints(grounder_ckpt=bad_vid, backbone="random", device="cpu")
    bad_txt = save_tiny_grounder(tmp_path / "t.pth", txt_dim=12)
    with pytest.raises(ConfigError, match="expects 12-d query token features .* gives 16-d tokens"):
        C2FPredictor.from_checkpoints(grounder_ckpt=bad_txt, backbone="random", device="cpu")
    # a grounder without TEF columns (vid_dim = D) is fine
    no_tef = save_tiny_grounder(tmp_path / "n.pth", vid_dim=16)
    p = C2FPredictor.from_checkpoints(grounder_ckpt=no_tef, backbone="random", device="cpu")
    m = p.predict("gray", p.encode_video(videos["gray"]))
    assert p.stage2.predictor_for(2.0).use_tef is False and m.mode == "trained" and len(m.saliency) == 3


def test_retriever_dims_must_match_the_backbone(tmp_path):
    r = save_tiny_retriever(tmp_path, video_input_dim=20)
    with pytest.raises(ConfigError, match=r"retriever expects 20-d clip features .* gives 16-d"):
        C2FPredictor.from_checkpoints(retriever_ckpt=r["ckpt"], backbone="random", device="cpu")
    r = save_tiny_retriever(tmp_path, text_input_dim=24)
    with pytest.raises(ConfigError, match=r"retriever expects 24-d query features"):
        C2FPredictor.from_checkpoints(retriever_ckpt=r["ckpt"], backbone="random", device="cpu")


def test_a_retriever_other_than_the_index_ones_is_refused(trained_index, zs_index, tmp_path):
    other = save_tiny_retriever(tmp_path, seed=5)
    with pytest.raises(ConfigError, match=r"does not match the index .*built with .*tmass_0"):
        C2FPredictor.from_checkpoints(retriever_ckpt=other["ckpt"], retriever_cfg=other["yaml"], backbone="random",
                                      index=trained_index, device="cpu")
    with pytest.raises(ConfigError, match="built without a trained retriever"):
        C2FPredictor.from_checkpoints(retriever_ckpt=other["ckpt"], backbone="random", index=zs_index, device="cpu")


def test_checkpoints_without_config_need_a_model_yaml(tmp_path, ckpts):
    sd = torch.load(ckpts["retriever"], weights_only=True)["model"]
    bare = tmp_path / "bare_r.pth"
    save_checkpoint({"model": sd}, bare)
    with pytest.raises(ConfigError, match="stores no model config; pass retriever_cfg"):
        load_retriever(bare)
    assert load_retriever(bare, ckpts["retriever_yaml"]).video_input_dim == 16
    g = C2FQDDETR.from_config(GROUNDER_CFG)
    gbare = tmp_path / "bare_g.pth"
    torch.save(g.state_dict(), gbare)
    with pytest.raises(ConfigError, match="without a model config; pass grounder_cfg"):
        load_grounder(gbare)
    model, post = load_grounder(gbare, {"model": GROUNDER_CFG})
    assert torch.equal(model.detr.query_embed.weight, g.detr.query_embed.weight) and post is model.postprocess


def test_official_qd_detr_checkpoint(videos):
    if not OFFICIAL_QD.is_file():
        pytest.skip(f"../shared not found: {OFFICIAL_QD} is missing")
    with pytest.raises(ConfigError, match=r"expects 514-d clip features .* gives 16-d"):
        C2FPredictor.from_checkpoints(grounder_ckpt=OFFICIAL_QD, backbone="random", device="cpu")
    p = C2FPredictor.from_checkpoints(grounder_ckpt=OFFICIAL_QD, backbone="random",
                                      backbone_cfg={"dim": 512, "text_dim": 512}, device="cpu")
    assert p.mode["stage2"] == "trained" and p.stage2.postprocess.max_ts_val is None
    v = p.encode_video(videos["redblue"])
    m = p.predict("a red screen", v, top_k=5)
    assert 1 <= len(m.windows) <= 5 and len(m.saliency) == v.n_clips
    assert all(0.0 <= a <= b <= v.duration + 1e-6 for a, b, _ in m.windows)


def test_official_mesm_checkpoint_is_routed_to_mesm(videos):
    if not OFFICIAL_MESM.is_file():
        pytest.skip(f"../shared not found: {OFFICIAL_MESM} is missing")
    from lavis_c2f.models.grounder.mesm import MESMQDDETR

    grounder, _post = load_grounder(OFFICIAL_MESM)
    assert isinstance(grounder, MESMQDDETR) and grounder.vid_dim == 2818  # not taken for QD-DETR
    p = C2FPredictor.from_checkpoints(grounder_ckpt=OFFICIAL_MESM, backbone="random",
                                      backbone_cfg={"dim": 2816, "text_dim": 512}, device="cpu")
    assert p.mode["stage2"] == "trained"
    v = p.encode_video(videos["redblue"])
    m = p.predict("a red screen", v, top_k=5)
    assert 1 <= len(m.windows) <= 5 and len(m.saliency) == v.n_clips


def test_stage3_refiner_runs_on_the_best_videos(trained_index, ckpts, tmp_path_factory, monkeypatch):
    pytest.importorskip("transformers")
    from lavis_c2f.models.refiner.data import SamplerConfig
    from lavis_c2f.models.refiner.hook import CaptionRefiner
    from lavis_c2f.testing.tiny_refiner import build_tiny_refiner, make_tiny_assets

    root = str(tmp_path_factory.mktemp("tiny_refiner"))
    make_tiny_assets(root)
    refiner = CaptionRefiner(build_tiny_refiner(root).eval(),
                             SamplerConfig(n_candidates=8, n_frames=2, margin_s=2.0, margin_ratio=0.0))
    p = C2FPredictor.from_checkpoints(grounder_ckpt=ckpts["grounder"], backbone="random", index=trained_index,
                                      refiner=refiner, refine_videos=1, device="cpu")
    assert p.mode["stage3"] == "on" and "caption refiner" in p.describe_mode()
    monkeypatch.setattr(refiner.model, "generate_text", lambda batch: (["[[2, 4]]"], [0.9]))
    res = p.search("a red screen", top_k=5)
    top = res[0].vid if res else None
    assert res.details[top].refined and sum(d.refined for d in res.details.values()) == 1
    assert [2.0, 4.0] == res.details[top].windows[0][:2] and "stage3_s" in res.timings
    assert refiner.stats.n_total == 1
    v = p.video("redblue")
    m = p.predict("a red screen", v)
    assert m.refined and m.windows[0][:2] == [2.0, 4.0]
    assert not p.predict("a red screen", v, refine=False).refined


def test_mesm_grounder_checkpoint(tmp_path, videos):
    from lavis_c2f.models.grounder.lavis_models import C2FMESMQDDETR

    cfg = dict(GROUNDER_CFG, arch="c2f_mesm_qd_detr", num_recfw_layers=1, num_recss_layers=1, vocab_size=8,
               max_q_l=6, use_txt_pos=True)
    torch.manual_seed(0)
    path = C2FMESMQDDETR.from_config(cfg).save_checkpoint(str(tmp_path / "mesm.pth"))
    p = C2FPredictor.from_checkpoints(grounder_ckpt=path, backbone="random", device="cpu")
    assert "trained c2f_mesm_qd_detr" in p.describe_mode()
    q = "one two three four five six seven eight"  # 8 tokens: cut to max_q_l - 1 (SS token) = 5
    assert p.stage2.query_input(p.encode_query(q)).shape == (5, 16)
    m = p.predict(q, p.encode_video(videos["pattern"]), top_k=3)
    assert 1 <= len(m.windows) <= 3 and len(m.saliency) == 6


def test_the_index_retriever_passed_explicitly_uses_the_index_model_yaml(trained_index, ckpts):
    p = C2FPredictor.from_checkpoints(retriever_ckpt=ckpts["retriever"], backbone="random", index=trained_index,
                                      device="cpu")
    assert p.mode["stage1"] == "trained" and len(p.stage1("red", k=2)) == 2


def test_refine_without_refiner_is_an_error(predictor, videos):
    v = predictor.encode_video(videos["gray"])
    with pytest.raises(ConfigError, match="stage 3 is not configured"):
        predictor.predict("gray", v, refine=True)


def test_random_backbone_dims_of_the_helpers():
    assert random_backbone().dim == GROUNDER_CFG["txt_dim"] == GROUNDER_CFG["vid_dim"] - 2


def test_checkpoint_weights_replace_an_official_tmass_start_point(tmp_path, ckpts):
    """A run started from official T-MASS weights stores model.tmass_checkpoint in its config;
    loading the run's checkpoint does not need that file any more."""
    ck = torch.load(ckpts["retriever"], weights_only=True)
    ck["config"]["model"]["tmass_checkpoint"] = str(tmp_path / "gone" / "model_best.pth")
    path = tmp_path / "from_official.pth"
    save_checkpoint(ck, path)
    model = load_retriever(path)
    assert model.video_input_dim == 16 and model.tmass_checkpoint is None
