"""QD-DETR against the official reference fixture, and official-checkpoint loading."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from grounder_helpers import assert_rows_close

from lavis_c2f.models.grounder import (CheckpointMismatchError, PostProcessConfig, QDDETR,
                                       load_qd_detr_checkpoint, postprocess_batch)
from lavis_c2f.models.grounder.checkpoint import qd_detr_kwargs_from_opt
from lavis_c2f.models.grounder.postprocess import rank_windows
from lavis_c2f.ops.linear import LINEAR_KERNELS

ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture(shared_dir):
    path = shared_dir / "fixtures" / "qd_detr_reference" / "qd_detr_clip_reference.pt"
    if not path.is_file():
        pytest.skip(f"reference fixture missing: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def official_ckpt(shared_dir):
    path = shared_dir / "fixtures" / "qd_detr_reference" / "qd_detr_clip_model_best.ckpt"
    if not path.is_file():
        pytest.skip(f"reference checkpoint missing: {path}")
    return str(path)


def _run(model, inputs, **kw):
    with torch.no_grad():
        return model(src_txt=inputs["src_txt"], src_txt_mask=inputs["src_txt_mask"],
                     src_vid=inputs["src_vid"], src_vid_mask=inputs["src_vid_mask"], **kw)


def _assert_outputs_match(out, ref, vid_mask):
    for key in ("pred_logits", "pred_spans"):
        torch.testing.assert_close(out[key], ref[key], atol=ATOL, rtol=0)
    valid = vid_mask.bool()
    for key in ("saliency_scores", "saliency_scores_neg"):
        torch.testing.assert_close(out[key][valid], ref[key][valid], atol=ATOL, rtol=0)
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == 1
    for a, b in zip(out["aux_outputs"], ref["aux_outputs"]):
        for key in ("pred_logits", "pred_spans"):
            torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["video_mask"], ref["video_mask"])


def test_state_dict_loads_strictly_and_outputs_match(fixture):
    kwargs = qd_detr_kwargs_from_opt(fixture["config"], fixture["model"])
    model = QDDETR(**kwargs, t2v_mask_mode="official")
    model.load_state_dict(fixture["model"], strict=True)
    model.eval()
    out = _run(model, fixture["inputs"], compute_neg=True)
    _assert_outputs_match(out, fixture["outputs"], fixture["inputs"]["src_vid_mask"])


def test_official_checkpoint_file_loads_and_matches(fixture, official_ckpt):
    model = load_qd_detr_checkpoint(official_ckpt)
    assert not model.training and model.t2v_mask_mode == "official"
    assert (model.txt_dim, model.vid_dim) == (512, 514)
    out = _run(model, fixture["inputs"], compute_neg=True)
    _assert_outputs_match(out, fixture["outputs"], fixture["inputs"]["src_vid_mask"])


def test_no_negative_pass_in_eval_unless_requested(official_ckpt, fixture):
    model = load_qd_detr_checkpoint(official_ckpt)
    out = _run(model, fixture["inputs"])
    assert "saliency_scores_neg" not in out
    model.train()
    torch.manual_seed(0)
    assert "saliency_scores_neg" in _run(model, fixture["inputs"])


@pytest.mark.parametrize("kernel", LINEAR_KERNELS)
def test_postprocessing_reproduces_official_rows(fixture, official_ckpt, kernel):
    """torch's products (the official code's) give the official rows exactly; oneDNN's (other
    float32 rounding) give them up to one rounding step of the post-processing."""
    model = load_qd_detr_checkpoint(official_ckpt, linear_kernel=kernel)
    out = _run(model, fixture["inputs"])
    metas = fixture["meta"]["query_metas"]
    pp = fixture["postprocessing"]
    assert pp["post_processor_kwargs"]["max_ts_val"] == 150 and pp["nms_thd"] == -1
    rows = postprocess_batch(out, qids=[m["qid"] for m in metas],
                             queries=[m["query"] for m in metas], vids=[m["vid"] for m in metas],
                             durations=[m["duration"] for m in metas],
                             clip_lengths=[pp["clip_length"]] * len(metas),
                             config=PostProcessConfig.official())
    if kernel == "torch":
        assert rows == fixture["postprocessed"]
    else:
        assert_rows_close(rows, fixture["postprocessed"])


def test_ranking_step_on_reference_outputs_is_exact(fixture):
    ref = fixture["outputs"]
    for i, meta in enumerate(fixture["meta"]["query_metas"]):
        got = rank_windows(ref["pred_logits"][i], ref["pred_spans"][i], meta["duration"])
        assert got == fixture["ranked_windows_before_postprocessing"][i]["pred_relevant_windows"]


def test_mask_modes_only_differ_through_batch_mixing(fixture, official_ckpt):
    model = load_qd_detr_checkpoint(official_ckpt)
    x = fixture["inputs"]
    official = _run(model, x)
    correct = _run(model, x, t2v_mask_mode="correct")
    diff = (official["pred_logits"] - correct["pred_logits"]).abs().amax(dim=(1, 2))
    assert diff[0] > 1e-3  # sample 0 received other samples' masks in the official code
    # run alone, the official mode equals the batch-independent one
    for i in range(3):
        n_v, n_t = x["video_lengths"][i], x["text_lengths"][i]
        single = {"src_txt": x["src_txt"][i:i + 1, :n_t], "src_txt_mask": x["src_txt_mask"][i:i + 1, :n_t],
                  "src_vid": x["src_vid"][i:i + 1, :n_v], "src_vid_mask": x["src_vid_mask"][i:i + 1, :n_v]}
        alone = _run(model, single)
        torch.testing.assert_close(alone["pred_logits"][0], correct["pred_logits"][i], atol=ATOL, rtol=0)
        torch.testing.assert_close(alone["pred_spans"][0], correct["pred_spans"][i], atol=ATOL, rtol=0)


def test_empty_text_raises_value_error(official_ckpt):
    model = load_qd_detr_checkpoint(official_ckpt)
    with pytest.raises(ValueError, match="no tokens"):
        model(src_txt=torch.zeros(1, 0, 512), src_txt_mask=torch.zeros(1, 0),
              src_vid=torch.zeros(1, 4, 514), src_vid_mask=torch.ones(1, 4))


def _official_opt(**kw) -> argparse.Namespace:
    opt = dict(hidden_dim=64, nheads=4, enc_layers=3, dec_layers=4, dim_feedforward=96,
               num_queries=6, dropout=0.1, input_dropout=0.5, n_input_proj=3, use_txt_pos=True,
               max_q_l=20, max_v_l=75, aux_loss=True, span_loss_type="l1", pre_norm=False,
               position_embedding="sine", contrastive_align_loss=False, contrastive_hdim=64,
               t_feat_dim=512, v_feat_dim=2818, a_feat_dir=None, a_feat_dim=None,
               device=torch.device("cpu"))
    opt.update(kw)
    return argparse.Namespace(**opt)


def test_official_style_checkpoint_with_other_options_loads_strictly(tmp_path):
    opt = _official_opt()
    torch.manual_seed(1)
    src = QDDETR(**qd_detr_kwargs_from_opt(opt))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "model_best.ckpt"
    torch.save({"model": src.state_dict(), "optimizer": {}, "epoch": 3, "opt": opt}, path)
    model = load_qd_detr_checkpoint(str(path))
    assert len(model.transformer.t2v_encoder.layers) == 3
    assert len(model.transformer.encoder.layers) == 3
    assert len(model.transformer.decoder.layers) == 4
    assert model.vid_dim == 2818 and model.use_txt_pos and model.num_queries == 6
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    g = torch.Generator().manual_seed(0)
    x = dict(src_txt=torch.randn(2, 9, 512, generator=g), src_txt_mask=torch.ones(2, 9),
             src_vid=torch.randn(2, 15, 2818, generator=g), src_vid_mask=torch.ones(2, 15))
    src.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**x)["pred_spans"], src(**x, t2v_mask_mode="official")["pred_spans"])


def test_bare_state_dict_with_opt_json_and_audio(tmp_path):
    opt = _official_opt(enc_layers=1, dec_layers=1, use_txt_pos=False, n_input_proj=1,
                        a_feat_dir="audio/", a_feat_dim=2048, v_feat_dim=514)
    src = QDDETR(**qd_detr_kwargs_from_opt(opt))
    torch.save(src.state_dict(), tmp_path / "model.ckpt")
    as_json = {k: v for k, v in vars(opt).items() if k != "device"}
    as_json["v_feat_dim"] = 512  # opt.json is written before the +2 TEF
    (tmp_path / "opt.json").write_text(json.dumps(as_json))
    model = load_qd_detr_checkpoint(str(tmp_path / "model.ckpt"))
    assert (model.vid_dim, model.aud_dim) == (514, 2048)
    out = model(torch.randn(1, 3, 512), torch.ones(1, 3), torch.randn(1, 5, 514), torch.ones(1, 5),
                src_aud=torch.randn(1, 5, 2048))
    assert out["pred_spans"].shape == (1, 6, 2) and out["aux_outputs"] == []  # 1 decoder layer


def test_mismatched_checkpoint_lists_keys(tmp_path):
    opt = _official_opt()
    src = QDDETR(**qd_detr_kwargs_from_opt(opt))
    path = tmp_path / "bad.ckpt"
    torch.save({"model": src.state_dict(), "opt": _official_opt(dec_layers=3, enc_layers=4)}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_qd_detr_checkpoint(str(path))
    assert any("decoder.layers.3" in k for k in err.value.unexpected)
    assert any("encoder.layers.3" in k for k in err.value.missing)
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value)


def test_unsupported_official_options_raise():
    with pytest.raises(ValueError, match="pre_norm"):
        qd_detr_kwargs_from_opt(_official_opt(pre_norm=True))
    with pytest.raises(ValueError, match="ce"):
        QDDETR(**qd_detr_kwargs_from_opt(_official_opt(span_loss_type="ce")))
