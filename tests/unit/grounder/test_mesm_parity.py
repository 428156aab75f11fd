"""MESM against the official reference fixture (../shared/fixtures/mesm_reference), official
MESM checkpoints of any size, and the official text tower."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from grounder_helpers import assert_rows_close

from lavis_c2f.models.grounder import (C2FMESMQDDETR, C2FQDDETR, CheckpointMismatchError,
                                       grounder_checkpoint_kind, load_mesm_checkpoint,
                                       load_official_grounder)
from lavis_c2f.models.grounder.checkpoint import (mesm_kwargs_from_opt, mesm_state_dict_to_official,
                                                  read_checkpoint)
from lavis_c2f.models.grounder.mesm import MESMQDDETR, choose_masked_words
from lavis_c2f.models.grounder.model import negative_text_index
from lavis_c2f.models.grounder.text_encoder import OpenAIClipTextTower, RuntimeTextEncoder

ATOL = 1e-5


@pytest.fixture(scope="module")
def ref_dir(reference_fixture):
    return reference_fixture("mesm_reference", "mesm_reference.pt", "mesm_model_best.ckpt")


@pytest.fixture(scope="module")
def fx(ref_dir):
    return torch.load(ref_dir / "mesm_reference.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ckpt_path(ref_dir):
    return str(ref_dir / "mesm_model_best.ckpt")


@pytest.fixture(scope="module")
def official(ckpt_path):
    return load_mesm_checkpoint(ckpt_path)


def _run(model, x, **kw):
    with torch.no_grad():
        return model(src_txt=x["src_txt"], src_txt_mask=x["src_txt_mask"], src_vid=x["src_vid"],
                     src_vid_mask=x["src_vid_mask"], **kw)


def _assert_match(out, ref, vid_mask):
    for key in ("pred_logits", "pred_spans"):
        torch.testing.assert_close(out[key], ref[key], atol=ATOL, rtol=0)
    valid = vid_mask.bool()
    torch.testing.assert_close(out["saliency_scores"][valid], ref["saliency_scores"][valid],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(out["saliency_scores_neg"][valid],
                               ref["saliency_scores_neg"][valid], atol=ATOL, rtol=0)
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == 1
    for a, b in zip(out["aux_outputs"], ref["aux_outputs"]):
        for key in ("pred_logits", "pred_spans"):
            torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0)
    for key in ("recon_feat", "projed_recon_feat"):
        torch.testing.assert_close(out[key], ref[key], atol=ATOL, rtol=0)


def test_official_checkpoint_loads_and_reproduces_the_outputs(fx, official, ckpt_path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert grounder_checkpoint_kind(ckpt) == "official_mesm"
    assert not official.training and official.t2v_mask_mode == "official"
    assert official.global_token_masked and official.ss_group_video == "concat"
    assert (official.txt_dim, official.vid_dim, official.num_word_classes) == (512, 2818, 5003)
    x = fx["inputs"]
    out = _run(official, x, vids=x["youtube_id"], neg_index=x["neg_index"], compute_neg=True)
    _assert_match(out, fx["outputs"], x["src_vid_mask"])
    # the un-normalised rows give the same result (the model takes them as they come; the
    # fixture's normalised rows differ by < 1e-7)
    torch.testing.assert_close(torch.nn.functional.normalize(x["src_txt_raw"], dim=-1, eps=1e-5),
                               x["src_txt"], atol=1e-7, rtol=0)


def test_grouped_batch_rebuilds_sentences_from_the_concatenated_segments(fx, official):
    x, g = fx["inputs"], fx["inputs_grouped"]
    assert g["num_clips"].tolist() == [2, 1]
    out = _run(official, x, vids=g["youtube_id"], neg_index=g["neg_index"], compute_neg=True)
    _assert_match(out, fx["outputs_grouped"], x["src_vid_mask"])
    # the group video matters: each query's own video gives another sentence token
    official.ss_group_video = "own"
    try:
        own = _run(official, x, vids=g["youtube_id"], neg_index=g["neg_index"], compute_neg=True)
    finally:
        official.ss_group_video = "concat"
    assert (own["recon_feat"][:2] - fx["outputs_grouped"]["recon_feat"][:2]).abs().max() > 1e-2


def test_negative_pairing_is_drawn_as_the_official_code_draws_it(fx):
    g = fx["inputs_grouped"]
    torch.manual_seed(int(g["neg_seed"]))
    index, valid = negative_text_index(3, "other_video", list(g["youtube_id"]))
    assert index.tolist() == g["neg_index"].tolist() == [2, 2, 1] and valid.all()
    torch.manual_seed(int(fx["inputs"]["neg_seed"]))
    index, _ = negative_text_index(3, "other_video", list(fx["inputs"]["youtube_id"]))
    assert index.tolist() == fx["inputs"]["neg_index"].tolist()
    _, valid = negative_text_index(2, "other_video", ["a", "a"])  # one group: no negative
    assert not valid.any()


def test_masked_word_reconstruction_logits(fx, official):
    x, m = fx["inputs"], fx["inputs_mlm"]
    np.random.seed(int(m["mlm_numpy_seed"]))  # the official draw, reproduced
    drawn = choose_masked_words(x["words_weight"], x["src_txt_mask"])
    assert torch.equal(drawn, m["masked_words"].bool())
    assert drawn.sum(1).tolist() == [20 // 3, 7 // 3, 32 // 3]
    out = _run(official, x, vids=x["youtube_id"], neg_index=m["neg_index"], compute_neg=True,
               compute_rec=True, gt_clip_mask=m["clip_mask"], fw_weights=x["words_weight"],
               fw_unknown=m["unknown_mask"], fw_masked=m["masked_words"])
    ref = fx["outputs_mlm"]["recfw_words_logit"]
    assert out["fw_logits"].shape == ref.shape == (3, 32, 5003)
    valid = x["src_txt_mask"].bool()
    torch.testing.assert_close(out["fw_logits"][valid], ref[valid], atol=ATOL, rtol=0)
    _assert_match(out, fx["outputs"], x["src_vid_mask"])  # the rest is the eval forward


def test_the_global_token_is_key_masked(fx, official):
    x = fx["inputs"]
    official.global_token_masked = False
    try:
        unmasked = _run(official, x, vids=x["youtube_id"], neg_index=x["neg_index"], compute_neg=True)
    finally:
        official.global_token_masked = True
    diff = (unmasked["pred_logits"] - fx["outputs"]["pred_logits"]).abs().max()
    assert diff > 1e-3  # QD-DETR's valid global token is not MESM


def test_wrapper_routing_and_official_inference_rows(fx, ckpt_path):
    model = C2FMESMQDDETR.from_checkpoint(ckpt_path)
    model.eval()
    assert model.config["eval_t2v_mask_mode"] == "official"
    x = fx["inputs"]
    samples = dict(src_txt=x["src_txt"], src_txt_mask=x["src_txt_mask"], src_vid=x["src_vid"],
                   src_vid_mask=x["src_vid_mask"], qid=list(x["qid"]),
                   query=[m["query"] for m in fx["meta"]["query_metas"]], vid=list(x["vid"]),
                   duration=torch.tensor([float(d) for d in x["duration"]]),
                   clip_length=torch.full((3,), 2.0))
    rows = model.predict_batch(samples)  # every query its own group, as in the fixture
    assert_rows_close(rows, fx["postprocessed"])  # rounded outputs: one rounding step apart
    with pytest.raises(ValueError, match="C2FMESMQDDETR"):
        C2FQDDETR.from_checkpoint(ckpt_path)
    # the same weights load into the model of our MESM YAML (same sizes)
    ours = C2FMESMQDDETR.from_pretrained("qvh_clip_slowfast")
    assert ours.load_checkpoint(ckpt_path)["kind"] == "official_mesm"
    assert isinstance(load_official_grounder(ckpt_path), MESMQDDETR)
    _, _, kind = read_checkpoint(ckpt_path)
    assert kind == "official_mesm"


def test_missing_and_unexpected_keys_are_listed(ckpt_path, tmp_path):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = dict(ckpt["model"])
    model.pop("ss_reconstructor.masked_sent_token")
    model["t2v_encoder.t2v_encoder.layers.5.norm1.weight"] = torch.zeros(256)
    path = tmp_path / "broken.ckpt"
    torch.save(dict(ckpt, model=model), path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_mesm_checkpoint(str(path))
    assert "ss_mask_token" in str(err.value)
    assert "transformer.t2v_encoder.layers.5.norm1.weight" in str(err.value)
    torch.save({"model": ckpt["model"], "opt": {**vars(ckpt["opt"]), "vocab_size": 4000}}, path)
    with pytest.raises(ValueError, match="word classes"):
        load_mesm_checkpoint(str(path))


# ---------------------------------------------------------------------- other sizes
def test_inverse_key_map_gives_exactly_the_official_layout(fx, official):
    ours = mesm_state_dict_to_official(official.state_dict())
    assert sorted(ours) == sorted(k for k, _ in fx["model_keys"])
    assert {k: list(v.shape) for k, v in ours.items()} == {k: list(s) for k, s in fx["model_keys"]}


OTHER_SIZES = [
    # share_MLP false (TwoMLP layers), GloVe classes (V + 1), Charades path (own video), text
    # positions, one input-projection layer, five different layer counts
    dict(hidden_dim=64, nheads=4, dim_feedforward=96, enc_layers=1, t2v_layers=3, dec_layers=3,
         num_recfw_layers=1, num_recss_layers=2, num_queries=7, vocab_size=20, share_MLP=False,
         tokenizer_type="GloVeNLTK", dataset_name="charades", t_feat_dim=30, v_feat_dim=22,
         max_words_l=16, max_video_l=40, n_input_proj=1, use_txt_pos=True, rec_fw=True, rec_ss=True),
    # no FW-MESM (its never-run enhancement encoder is still saved), three projection layers,
    # opt.json-style v_feat_dim (before the 2 TEF columns)
    dict(hidden_dim=32, nheads=2, dim_feedforward=40, enc_layers=2, t2v_layers=1, dec_layers=1,
         num_recfw_layers=2, num_recss_layers=1, num_queries=4, vocab_size=9, share_MLP=True,
         tokenizer_type="CLIP", dataset_name="qvhighlights", t_feat_dim=24, v_feat_dim=12,
         max_words_l=8, max_video_l=20, n_input_proj=3, use_txt_pos=False, rec_fw=False,
         rec_ss=True, aux_loss=False, _json_style=True),
]


@pytest.mark.parametrize("sizes", OTHER_SIZES)
def test_official_layout_checkpoint_with_other_sizes_loads_and_matches(sizes, tmp_path):
    sizes = dict(sizes)
    json_style = sizes.pop("_json_style", False)
    opt = dict(dict(dropout=0.1, input_dropout=0.5, aux_loss=True, span_loss_type="l1",
                    pre_norm=False, position_embedding="sine", use_tef=True), **sizes)
    # the weights come from a model built at these sizes; when rec_fw is off the official code
    # still builds (and saves) an enhancement encoder: add one
    torch.manual_seed(0)
    full_opt = dict(opt, v_feat_dim=opt["v_feat_dim"] + (2 if json_style else 0))
    kwargs = mesm_kwargs_from_opt(full_opt)
    source = MESMQDDETR(**kwargs).eval()
    for p in source.parameters():  # non-trivial values everywhere (zero-initialised tokens too)
        p.data.normal_(0.0, 0.2)
    state = mesm_state_dict_to_official(source.state_dict())
    if not opt["rec_fw"]:
        extra = MESMQDDETR(**dict(kwargs, rec_fw=True)).enhance_encoder.state_dict()
        state.update({f"enhance_encoder.t2v_encoder.{k}": v for k, v in extra.items()})
    path = tmp_path / "model_val_best.ckpt"
    torch.save({"model": state, "optimizer": {}, "epoch": 3,
                "opt": argparse.Namespace(**(opt if json_style else full_opt))}, path)

    model = load_mesm_checkpoint(str(path))
    assert model.hidden_dim == opt["hidden_dim"] and model.num_queries == opt["num_queries"]
    assert len(model.transformer.t2v_encoder.layers) == opt["t2v_layers"]
    assert len(model.transformer.decoder.layers) == opt["dec_layers"]
    assert model.vid_dim == opt["v_feat_dim"] + (2 if json_style else 0)
    assert model.num_word_classes == opt["vocab_size"] + (3 if opt["tokenizer_type"] == "CLIP" else 1)
    assert model.ss_group_video == ("concat" if opt["dataset_name"] == "qvhighlights" else "own")
    assert model.max_q_l == opt["max_words_l"] + 1
    g = torch.Generator().manual_seed(1)
    lv, lt = [9, 5, 7], [6, 3, 4]
    src_vid = torch.randn(3, 9, model.vid_dim, generator=g)
    src_txt = torch.randn(3, 6, model.txt_dim, generator=g)
    vid_mask = (torch.arange(9)[None] < torch.tensor(lv)[:, None]).float()
    txt_mask = (torch.arange(6)[None] < torch.tensor(lt)[:, None]).float()
    kw = dict(vids=["a", "a", "b"], neg_index=torch.tensor([2, 2, 0]), compute_neg=True,
              t2v_mask_mode="official")
    with torch.no_grad():
        got = model(src_txt, txt_mask, src_vid, vid_mask, **kw)
        want = source(src_txt, txt_mask, src_vid, vid_mask, **kw)
    for key in ("pred_logits", "pred_spans", "saliency_scores", "saliency_scores_neg", "recon_feat"):
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    assert ("aux_outputs" in got) == opt["aux_loss"]


# ---------------------------------------------------------------------- the text tower
def _official_tower_init(seed: int) -> OpenAIClipTextTower:
    """The random text tower of the fixture: MESM's ``CLIPTextEncoder(512, 77, 49408, 512, 8, 12)``
    right after ``torch.manual_seed(seed)``, with its ``initialize_parameters``, in fp16."""
    torch.manual_seed(seed)
    tower = OpenAIClipTextTower(vocab_size=49408, context_length=77, width=512, heads=8,
                                layers=12, embed_dim=512)
    torch.nn.init.normal_(tower.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(tower.positional_embedding, std=0.01)
    width, layers = 512, 12
    proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
    for block in tower.transformer.resblocks:
        torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    torch.nn.init.normal_(tower.text_projection, std=width ** -0.5)
    return tower


@pytest.mark.slow
def test_clip_text_encoder_pth_reproduces_the_official_word_features(fx, tmp_path):
    tower = _official_tower_init(int(fx["meta"]["text_encoder_seed"]))
    state = {k: v.half() for k, v in tower.state_dict().items()}  # saved in fp16, as released
    assert math.isclose(sum(float(v.double().sum()) for v in state.values()),
                        fx["meta"]["text_encoder_weight_sum"], rel_tol=1e-9)
    path = tmp_path / "clip_text_encoder.pth"
    torch.save(state, path)
    del tower
    enc = RuntimeTextEncoder(checkpoint=str(path), max_words_l=32)
    x = fx["inputs"]
    ids, mask = x["words_id"][:, :32], x["words_mask"][:, :32].float()
    with torch.no_grad():
        hidden = enc._hidden(ids, mask.long(), None, None, None)
        feats = enc.encode(ids, mask)
    valid = mask.bool()
    ref = x["text_last_hidden_state"][:, :32]
    # the official tower ran in fp16 arithmetic, ours in fp32 from the same fp16 weights
    assert (hidden[valid] - ref[valid]).abs().max() < 2e-2
    assert torch.nn.functional.cosine_similarity(hidden[valid], ref[valid], dim=-1).min() > 0.9999
    assert (feats - x["src_txt"]).abs().max() < 2e-3
    assert torch.equal(feats[~valid], torch.zeros_like(feats[~valid]))
