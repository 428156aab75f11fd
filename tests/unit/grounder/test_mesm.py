"""MESM on QD-DETR: every switch, both text variants, vocabulary CLI, reconstruction losses."""
from __future__ import annotations

import json

import pytest
import torch

from grounder_helpers import TXT_DIM, make_batch, tiny_mesm_config
from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.models.grounder import C2FMESMQDDETR, MESMCriterion, HungarianMatcher
from lavis_c2f.models.grounder.mesm import gt_clip_mask, merged_moments, video_groups
from lavis_c2f.models.grounder.text_encoder import REPLACE_MASK
from lavis_c2f.models.grounder.vocab import ReconstructionVocab


def _mesm_batch():
    return make_batch([10, 8, 12, 9], [5, 4, 7, 3],
                      [[[4.0, 10.0]], [[0.0, 4.0]], [[10.0, 20.0], [2.0, 4.0]], [[6.0, 12.0]]],
                      vids=["va", "va", "vb", "vc"])


@pytest.mark.parametrize("rec_fw,rec_ss,share", [(True, True, True), (True, True, False),
                                                 (True, False, True), (False, True, True),
                                                 (False, False, True)])
def test_variants_forward_backward(rec_fw, rec_ss, share, counts_file):
    torch.manual_seed(0)
    model = C2FMESMQDDETR.from_config(tiny_mesm_config(
        rec_fw=rec_fw, rec_ss=rec_ss, fw_share_ffn=share, vocab_counts=counts_file,
        fw_tokenizer="whitespace"))
    model.train()
    out = model(_mesm_batch())
    assert torch.isfinite(out["loss"])
    assert ("loss_rec_fw" in out) == rec_fw and ("loss_rec_ss" in out) == rec_ss
    out["loss"].backward()
    detr = model.detr
    if rec_fw:
        assert out["fw_aligned_frac"] == 1.0
        assert detr.enhance_encoder.layers[0].self_attn.in_proj_weight.grad.abs().sum() > 0
        assert detr.output_txt_proj[1].weight.grad.abs().sum() > 0
        assert detr.fw_mask_token.grad.abs().sum() > 0
        if not share:
            assert detr.enhance_encoder.layers[0].linear1_1.weight.grad.abs().sum() > 0
    else:
        assert not hasattr(detr, "enhance_encoder")
    if rec_ss:
        assert detr.ss_mask_token.grad.abs().sum() > 0
        assert detr.ss_reconstructor.layers[0].linear2.weight.grad.abs().sum() > 0
    model.eval()
    rows = model.predict_batch(_mesm_batch())
    assert len(rows) == 4 and all(len(r["pred_relevant_windows"]) == 5 for r in rows)


def test_inference_needs_no_vocabulary_but_training_does():
    model = C2FMESMQDDETR.from_config(tiny_mesm_config())
    model.eval()
    assert len(model.predict_batch(_mesm_batch())) == 4
    model.train()
    with pytest.raises(ConfigError, match="vocab_counts"):
        model(_mesm_batch())


def test_predictions_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = C2FMESMQDDETR.from_config(tiny_mesm_config())
    model.eval()
    b = _mesm_batch()
    together = model.predict_batch(b)
    for i in range(4):
        n_v, n_t = int(b["src_vid_mask"][i].sum()), int(b["src_txt_mask"][i].sum())
        one = {k: (v[i:i + 1] if torch.is_tensor(v) else v[i:i + 1]) for k, v in b.items()}
        one.update(src_vid=b["src_vid"][i:i + 1, :n_v], src_vid_mask=b["src_vid_mask"][i:i + 1, :n_v],
                   src_txt=b["src_txt"][i:i + 1, :n_t], src_txt_mask=b["src_txt_mask"][i:i + 1, :n_t])
        alone = model.predict_batch(one)[0]["pred_relevant_windows"]
        assert [w[:2] for w in alone] == [w[:2] for w in together[i]["pred_relevant_windows"]]
        for a, c in zip(alone, together[i]["pred_relevant_windows"]):
            assert abs(a[2] - c[2]) <= 2e-4


def test_prediction_has_no_negative_or_reconstruction_pass(counts_file):
    model = C2FMESMQDDETR.from_config(tiny_mesm_config(vocab_counts=counts_file,
                                                       fw_tokenizer="whitespace"))
    model.eval()
    b = _mesm_batch()
    out = model.detr(b["src_txt"], b["src_txt_mask"], b["src_vid"], b["src_vid_mask"], vids=b["vid"])
    assert not {"saliency_scores_neg", "fw_logits", "ss_clip_feat"} & set(out)


def test_feature_alignment_and_counts_checks(counts_file, tmp_path):
    model = C2FMESMQDDETR.from_config(tiny_mesm_config(vocab_counts=counts_file, fw_tokenizer="whitespace",
                                                       fw_text_special_tokens=False))
    model.train()
    b = _mesm_batch()
    b["query"] = ["a door", "a person opens the door", "the door opens now please", "x y z"]
    out = model(b)
    # feature rows: 5, 4, 7, 3; words: 2, 5, 5, 3 -> samples 0 and 2 have too few tokens
    assert out["fw_aligned_frac"] == pytest.approx(0.5)
    # features with start/end rows (the demo corpus): whitespace words are wrapped with sentinels,
    # tokens 4, 7, 7, 5 -> only sample 0 is too short
    wrapped = C2FMESMQDDETR.from_config(tiny_mesm_config(vocab_counts=counts_file, fw_tokenizer="whitespace",
                                                         fw_text_special_tokens=True))
    wrapped.train()
    out = wrapped(b)
    assert out["fw_aligned_frac"] == pytest.approx(0.75)
    labels, weights, _, aligned = wrapped._fw_targets(b, wrapped._text(b), b["src_txt_mask"].shape[1])
    vocab = wrapped.vocab
    assert labels[1, 0] == vocab.start_label and weights[1, 0] == 0  # row 0 = start token, never masked
    with pytest.raises(DataFormatError, match="tokenizer"):
        C2FMESMQDDETR.from_config(tiny_mesm_config(vocab_counts=counts_file, fw_tokenizer="clip"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(DataFormatError, match="format"):
        C2FMESMQDDETR.from_config(tiny_mesm_config(vocab_counts=str(bad), fw_tokenizer="whitespace"))


def test_vocab_labels_and_weights(counts_file):
    vocab = ReconstructionVocab.from_counts_file(counts_file, vocab_size=4)
    assert vocab.num_classes == 7 and set(vocab.label_of) == {"the", "a", "person", "opens"}
    labels, weights, unknown = vocab.encode(["the", "door", "a"])
    assert labels == [0, vocab.unknown_label, 1] and unknown == [False, True, False]
    assert weights[1] == 0 and weights[0] < weights[2]  # rarer tokens are masked more often


def test_vocab_cli_writes_counts(tmp_path):
    from lavis_c2f.cli import main

    ann = tmp_path / "train.jsonl"
    ann.write_text('{"qid": 1, "query": "A man opens the door."}\n'
                   '{"qid": 2, "query": "the man sits"}\n')
    out = tmp_path / "counts.json"
    assert main(["vocab", "--ann", str(ann), "--tokenizer", "whitespace", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["counts"][:2] == [["man", 2], ["the", 2]] and data["num_queries"] == 2
    clip_out = tmp_path / "clip_counts.json"
    assert main(["vocab", "--ann", str(ann), "--out", str(clip_out)]) == 0
    clip = json.loads(clip_out.read_text())
    assert clip["tokenizer"] == "clip" and all(isinstance(t, int) for t, _ in clip["counts"])
    assert max(c for _, c in clip["counts"]) == 2
    ann.write_text('{"qid": 1, "query": "ok"}\n{"qid": 2}\n')
    assert main(["vocab", "--ann", str(ann), "--out", str(tmp_path / "x.json")]) == 1
    assert not (tmp_path / "x.json").exists()


def test_runtime_text_encoder_variant(tiny_clip_dir, tmp_path):
    from lavis_c2f.models.grounder.vocab import count_tokens, write_counts

    b = _mesm_batch()
    counts, n = count_tokens(b["query"], "clip")
    counts_path = write_counts(counts, n, "clip", str(tmp_path / "clip_counts.json"))
    cfg = tiny_mesm_config(text_encoder={"model_dir": tiny_clip_dir, "max_words_l": 16},
                           vocab_counts=counts_path, fw_tokenizer="clip")
    del cfg["txt_dim"]
    torch.manual_seed(0)
    model = C2FMESMQDDETR.from_config(cfg)
    assert model.detr.txt_dim == TXT_DIM
    model.train()
    assert not model.detr.text_encoder.model.training  # the tower stays frozen in eval mode
    del b["src_txt"]
    out = model(b)
    assert torch.isfinite(out["loss"]) and out["fw_aligned_frac"] == 1.0
    out["loss"].backward()
    assert model.detr.fw_mask_token.grad.abs().sum() > 0  # flows through the frozen tower
    assert all(p.grad is None for p in model.detr.text_encoder.parameters())
    # token-level masking: a causal tower changes the masked and later positions only
    enc = model.detr.text_encoder
    ids, mask, _ = enc.tokenize(["a person opens the door"])
    codes = torch.zeros_like(ids)
    codes[0, 3] = REPLACE_MASK
    plain = enc.encode(ids, mask)
    masked = enc.encode(ids, mask, codes, model.detr.fw_mask_token + 1.0, None)
    assert torch.allclose(plain[0, :3], masked[0, :3])
    assert not torch.allclose(plain[0, 3], masked[0, 3])
    # checkpoints leave the frozen tower out and still load strictly
    path = model.save_checkpoint(str(tmp_path / "mesm.pth"))
    saved = torch.load(path, weights_only=True)["model"]
    assert not any(k.startswith("detr.text_encoder.") for k in saved)
    model.eval()
    rebuilt = C2FMESMQDDETR.from_checkpoint(path)
    rebuilt.eval()
    assert rebuilt.predict_batch(b) == model.predict_batch(b)


def test_runtime_text_encoder_config_errors(tiny_clip_dir):
    with pytest.raises(ConfigError, match="txt_dim"):
        C2FMESMQDDETR.from_config(tiny_mesm_config(text_encoder={"model_dir": tiny_clip_dir},
                                                   txt_dim=TXT_DIM + 1))
    with pytest.raises(ConfigError, match="text_encoder"):
        C2FMESMQDDETR.from_config(tiny_mesm_config(text_encoder={"model_dir": "/nonexistent"}))
    with pytest.raises(ConfigError, match=r"model\.text_encoder: unknown key\(s\) 'dir'"):
        C2FMESMQDDETR.from_config(tiny_mesm_config(text_encoder={"dir": tiny_clip_dir}))


def test_target_helpers():
    spans = [torch.tensor([[0.5, 0.2]]), torch.zeros(0, 2), torch.tensor([[0.05, 0.0]])]
    mask = gt_clip_mask(spans, [20.0, 20.0, 20.0], [2.0] * 3, [10, 10, 4], 10)
    assert mask[0].nonzero().flatten().tolist() == [4, 5]  # 8 s - 12 s
    assert not mask[1].any()
    assert mask[2].nonzero().flatten().tolist() == [0]  # zero-length window: its clip
    hull, valid = merged_moments([torch.tensor([[0.2, 0.2], [0.7, 0.2]]), torch.zeros(0, 2)])
    torch.testing.assert_close(hull[0], torch.tensor([0.1, 0.8]))
    assert valid.tolist() == [True, False]
    assert video_groups(["a", "b", "a"], 3) == [[0, 2], [1], [0, 2]]


def test_segment_sentence_loss_prefers_aligned_features():
    crit = MESMCriterion(matcher=HungarianMatcher())
    moments = torch.tensor([[0.1, 0.5], [0.1, 0.5], [0.6, 0.9]])
    feats = torch.eye(3, 8)
    aligned = {"ss_clip_feat": feats, "ss_words_feat": feats, "ss_valid": torch.ones(3, dtype=torch.bool)}
    shuffled = dict(aligned, ss_words_feat=feats[[2, 0, 1]])
    good = crit.loss_rec_ss(aligned, moments, ["v", "v", "w"])["loss_rec_ss"]
    bad = crit.loss_rec_ss(shuffled, moments, ["v", "v", "w"])["loss_rec_ss"]
    assert good < bad
    none = crit.loss_rec_ss(dict(aligned, ss_valid=torch.zeros(3, dtype=torch.bool)), moments, None)
    assert none["loss_rec_ss"].item() == 0.0


def test_initialisation_follows_mesm():
    """MESM resets its enhancement encoder with Xavier but leaves its sentence reconstructor at
    PyTorch's defaults (linear layers U(+-1/sqrt(fan_in)); attention in-projection Xavier)."""
    torch.manual_seed(0)
    detr = C2FMESMQDDETR.from_config(tiny_mesm_config(dim_feedforward=256)).detr.requires_grad_(False)
    ss, fw = detr.ss_reconstructor.layers[0], detr.enhance_encoder.layers[0]
    for linear in (ss.linear1, ss.linear2, ss.self_attn.out_proj):
        bound = linear.weight.shape[1] ** -0.5
        assert float(linear.weight.abs().max()) <= bound
        assert float(linear.weight.abs().max()) > 0.9 * bound
    xavier = (6.0 / sum(fw.linear2.weight.shape)) ** 0.5  # (32, 256): wider than U(+-1/16)
    assert fw.linear2.weight.shape[1] ** -0.5 < float(fw.linear2.weight.abs().max()) <= xavier
    assert float(ss.self_attn.in_proj_weight.abs().max()) <= (6.0 / sum(ss.self_attn.in_proj_weight.shape)) ** 0.5


def _fw_query_rows(detr, b, masked):
    """The word rows the FW reconstruction feeds its first layer (train mode, one forward)."""
    seen = []
    lt = b["src_txt"].shape[1]
    hook = detr.enhance_encoder.layers[0].register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().clone()) if args[0].shape[1] == lt else None)
    try:
        n_clips = b["src_vid_mask"].shape[1]
        gcm = torch.zeros(len(masked), n_clips, dtype=torch.bool)
        gcm[:, :2] = True
        out = detr(b["src_txt"], b["src_txt_mask"], b["src_vid"], b["src_vid_mask"], vids=b["vid"],
                   gt_clip_mask=gcm, fw_masked=masked, compute_neg=False, compute_rec=True)
    finally:
        hook.remove()
    return seen[-1], out


def test_mesm_input_dropout_shares_one_dropout_mask_per_batch():
    """MESM projects the learned mask token once per batch ((1, 1, D): one input-dropout mask for
    every masked word) and replaces rows of the grounding pass's projected words; the default
    replaces feature rows and projects them (a mask per row). Without dropout both are equal
    (also SS, whose group video MESM projects again)."""
    b = _mesm_batch()
    masked = torch.zeros(b["src_txt_mask"].shape, dtype=torch.bool)
    masked[:, 1] = True
    models = {}
    for flag in (False, True):
        torch.manual_seed(0)
        models[flag] = C2FMESMQDDETR.from_config(tiny_mesm_config(
            mesm_input_dropout=flag, input_dropout=0.5, dropout=0.0)).detr
    models[True].load_state_dict(models[False].state_dict())
    for detr in models.values():
        torch.nn.init.normal_(detr.fw_mask_token)
    models[True].fw_mask_token.data.copy_(models[False].fw_mask_token.data)
    rows = {}
    for flag, detr in models.items():
        detr.train()
        for m in detr.modules():  # input dropout on, the rest off: only the sites in question
            if isinstance(m, torch.nn.Dropout) and m.p != 0.5:
                m.p = 0.0
        torch.manual_seed(1)
        q, _ = _fw_query_rows(detr, b, masked)
        rows[flag] = q[masked]
    shared, per_row = rows[True], rows[False]
    assert torch.equal(shared, shared[:1].expand_as(shared))  # one projected token, one mask
    assert not torch.allclose(per_row, per_row[:1].expand_as(per_row))
    for detr in models.values():
        for m in detr.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    off, on = (_fw_query_rows(models[f], b, masked)[1] for f in (False, True))
    for key in ("fw_logits", "recon_feat", "pred_spans", "saliency_scores"):
        assert torch.allclose(off[key], on[key], atol=1e-6), key
    with pytest.raises(ConfigError, match="mesm_input_dropout"):
        C2FMESMQDDETR.from_config(tiny_mesm_config(mesm_input_dropout=True, fw_mask_level="tokens"))
