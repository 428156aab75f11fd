"""UCoFiA against the official code's outputs (../shared/fixtures/ucofia_reference, README points 1-9).

Tolerances: every output within 1e-5 x max(1, |official|); the training loss likewise; the
gradient to the pixels within 1e-4 relative to its largest entry (the issue's bound).
"""
import logging

import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.evaluation.retrieval import retrieval_metrics
from lavis_c2f.models.checkpoint import CheckpointMismatchError
from lavis_c2f.models.retriever import C2FUCoFiA, load_ucofia_checkpoint
from lavis_c2f.models.retriever.ucofia_checkpoint import _RENAME

LEVELS = ("video_sentence", "sentence_frame", "pixel_word")


def close(ours, ref, rel=1e-5):
    ours, ref = ours.detach(), ref.to(ours.dtype)
    tol = rel * max(1.0, float(ref.abs().max()))
    err = float((ours - ref).abs().max())
    assert err <= tol, f"max |diff| {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def ref_dir(reference_fixture):
    return reference_fixture("ucofia_reference", "ucofia_reference.pt")


@pytest.fixture(scope="module")
def fx(ref_dir):
    return torch.load(ref_dir / "ucofia_reference.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(ref_dir):
    return load_ucofia_checkpoint(str(ref_dir / "pytorch_model.bin.0"), str(ref_dir / "clip_pretrained.pt"))


@pytest.fixture(scope="module")
def encoded(model, fx):
    x = fx["inputs"]
    with torch.no_grad():
        te = model.encode_text(x["input_ids"][:, 0], x["attention_mask"][:, 0])
        bank = model.encode_text(x["bank_input_ids"][:, 0], x["bank_attention_mask"][:, 0])
        ve = model.encode_video(x["video"][:, 0, :, 0], x["video_mask"][:, 0], topk_noise=fx["noise"]["eval_topk"][0])
    return te, bank, ve


def test_loader_reads_every_size_from_the_weights(model, fx):
    arch, cfg = fx["clip_arch"], fx["config"]
    h = model.hparams
    assert (h["embed_dim"], h["vision_width"], h["vision_layers"], h["vision_patch_size"], h["image_resolution"],
            h["text_width"], h["text_layers"], h["context_length"], h["vocab_size"]) == (
        arch["embed_dim"], arch["vision_width"], arch["vision_layers"], arch["vision_patch_size"],
        arch["image_resolution"], arch["transformer_width"], arch["transformer_layers"], arch["context_length"],
        arch["vocab_size"])
    assert (h["max_words"], h["max_frames"], h["temporal_layers"], h["topk"]) == (
        cfg["max_words"], cfg["max_frames"], cfg["cross_num_hidden_layers"], 3)
    assert not model.training


def test_blocks_10_11_use_the_pretrained_attention_and_the_warning_names_the_keys(ref_dir, fx, caplog):
    clip = torch.load(ref_dir / "clip_pretrained.pt", map_location="cpu", weights_only=True)
    ckpt = torch.load(ref_dir / "pytorch_model.bin.0", map_location="cpu", weights_only=True)
    with caplog.at_level(logging.WARNING):
        official = load_ucofia_checkpoint(str(ref_dir / "pytorch_model.bin.0"), str(ref_dir / "clip_pretrained.pt"))
    text = caplog.text
    assert all(k in text for k in fx["meta"]["keys_not_from_checkpoint"])
    trained = load_ucofia_checkpoint(str(ref_dir / "pytorch_model.bin.0"), str(ref_dir / "clip_pretrained.pt"),
                                     shift_attention="checkpoint")
    for i in (10, 11):
        q_official = official.clip.model.vision_model.encoder.layers[i].self_attn.q_proj.weight
        q_trained = trained.clip.model.vision_model.encoder.layers[i].self_attn.q_proj.weight
        e = q_official.shape[0]
        pre = clip[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"][:e].float()
        net = ckpt[f"clip.visual.transformer.resblocks.{i}.attn.net.in_proj_weight"][:e].float()
        assert torch.equal(q_official, pre) and torch.equal(q_trained, net) and not torch.equal(pre, net)
    # the other blocks come from the checkpoint in both
    q9 = ckpt["clip.visual.transformer.resblocks.9.attn.in_proj_weight"][:e].float()
    assert torch.equal(official.clip.model.vision_model.encoder.layers[9].self_attn.q_proj.weight, q9)


def test_tokenisation_matches_the_official_loader(model, fx):
    x = fx["inputs"]
    ids, mask = model.tokenize(x["texts"])
    assert torch.equal(ids, x["input_ids"][:, 0]) and torch.equal(mask, x["attention_mask"][:, 0])
    bank_ids, _ = model.tokenize(x["bank_texts"])
    assert torch.equal(bank_ids, x["bank_input_ids"][:, 0])


def test_encoders_match(encoded, fx):
    te, bank, ve = encoded
    o = fx["outputs"]
    close(te.sentence, o["sequence_output"][:, 0])
    close(te.words, o["seq_features"])
    close(bank.sentence, o["bank_sequence_output"][:, 0])
    close(bank.words, o["bank_seq_features"])
    close(ve.frames, o["visual_output"])
    close(ve.patches, o["visual_pixel_output"])


def test_levels_sk_norm_and_scores_match(model, encoded, fx):
    te, bank, ve = encoded
    o = fx["outputs"]
    with torch.no_grad():
        lv, blv = model.level_logits(te, ve), model.level_logits(bank, ve)
        for i, name in enumerate(LEVELS):
            close(lv[i], o[f"logits_{name}"])
            close(blv[i], o[f"bank_logits_{name}"])
        bias = model.sinkhorn_video_bias(blv)
        close(bias, o["video_bias"])
        close(model.ucofia_scores(te, ve, bank=bank), o["sim_matrix"])
        close(model.ucofia_scores(te, ve, video_bias=bias), o["sim_matrix"])
        # the retrieval API: biases stored per video (V, 3), scores in blocks of any size
        vb = model.compute_video_bias(bank, ve)
        sim = model.score(te, ve, video_bias=vb, block_size=3)
        close(sim, o["sim_matrix"])
    # the official compute_metrics on sim and sim^T (MR = median rank)
    ours = retrieval_metrics(sim.numpy(), np.arange(len(sim)))
    for direction in ("t2v", "v2t"):
        ref = o[f"{direction}_metrics"]
        got = ours[direction]
        assert (got["R@1"], got["R@5"], got["R@10"], got["MdR"], got["MnR"]) == (
            ref["R1"], ref["R5"], ref["R10"], ref["MR"], ref["MeanR"])


def test_training_step_matches(ref_dir, fx):
    x, tr = fx["inputs"], fx["train"]
    model = load_ucofia_checkpoint(str(ref_dir / "pytorch_model.bin.0"), str(ref_dir / "clip_pretrained.pt")).train()
    pixels = x["video"][:, 0, :, 0].clone().requires_grad_(True)
    te = model.encode_text(x["input_ids"][:, 0], x["attention_mask"][:, 0])
    ve = model.encode_video(pixels, x["video_mask"][:, 0], topk_noise=tr["noise_topk"][0])
    loss = model.contrastive_loss(te, ve)
    close(loss, tr["loss"])
    loss.backward()
    ref = tr["grad_video"][:, 0, :, 0]
    assert float((pixels.grad - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    # parameter gradients pass through the double softmax (temperature 0.01), which amplifies
    # float32 rounding: the official float32 run is itself up to 5e-4 (pixel_mat_weight) from the
    # float64 gradient, so these are checked at 1e-3
    params = dict(model.named_parameters())
    names = {**_RENAME, "clip.logit_scale": "clip.model.logit_scale"}
    for key, g in tr["grads"].items():
        ours = params[names[key]].grad
        assert float((ours - g).abs().max()) <= 1e-3 * max(float(g.abs().max()), 1e-12), key


def test_seeded_noise_repeats_and_fresh_noise_moves_the_patches(model, fx):
    x = fx["inputs"]
    px, mask = x["video"][:2, 0, :, 0], x["video_mask"][:2, 0]
    with torch.no_grad():
        a = model.encode_video(px, mask, generator=torch.Generator().manual_seed(3))
        b = model.encode_video(px, mask, generator=torch.Generator().manual_seed(3))
        c = model.encode_video(px, mask, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.patches, b.patches) and torch.equal(a.video, b.video)
    assert not torch.equal(a.patches, c.patches)
    assert torch.equal(a.frames, c.frames) and torch.equal(a.video, c.video)   # only the selection is noisy


def test_sizes_follow_a_smaller_checkpoint(ref_dir, tmp_path):
    """Fewer temporal layers and words in the weights -> a model of those sizes."""
    sd = torch.load(ref_dir / "pytorch_model.bin.0", map_location="cpu", weights_only=True)
    drop = ("transformerClip.resblocks.2.", "transformerClip.resblocks.3.")
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    for k in ("word_logit_weight", "word_mat_weight", "word_mat_weight2", "word_mat_weight_for_pixel"):
        sd[k] = sd[k][:16, :16].clone()
    path = tmp_path / "pytorch_model.bin.1"
    torch.save(sd, path)
    m = load_ucofia_checkpoint(str(path), str(ref_dir / "clip_pretrained.pt"))
    assert (m.temporal_layers, m.max_words, len(m.temporal.layers)) == (2, 16, 2)
    ids, mask = m.tokenize(["two dogs run across the beach and a child laughs while the waves crash behind"])
    assert ids.shape == (1, 16) and int(ids[0, 15]) == 49407 and int(ids[0, 0]) == 49406


# ---------------------------------------------------------------------------------------- bad input

def test_a_checkpoint_that_is_not_ucofia_is_refused(ref_dir, tmp_path):
    path = tmp_path / "tmass.pth"
    torch.save({"pool.q_proj.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(DataFormatError, match="not an official UCoFiA checkpoint"):
        load_ucofia_checkpoint(str(path), str(ref_dir / "clip_pretrained.pt"))
    torch.save({"model": {}, "config": {"model": {}}}, path)
    with pytest.raises(DataFormatError, match="checkpoint of this package"):
        load_ucofia_checkpoint(str(path), str(ref_dir / "clip_pretrained.pt"))
    with pytest.raises(FileNotFoundError):
        load_ucofia_checkpoint(str(tmp_path / "nope.bin"), str(ref_dir / "clip_pretrained.pt"))


def test_unexpected_and_missing_keys_are_listed(ref_dir, tmp_path):
    sd = torch.load(ref_dir / "pytorch_model.bin.0", map_location="cpu", weights_only=True)
    extra = dict(sd, **{"cross.pooler.dense.weight": torch.zeros(2, 2)})
    torch.save(extra, tmp_path / "extra.bin")
    with pytest.raises(CheckpointMismatchError, match="cross.pooler.dense.weight"):
        load_ucofia_checkpoint(str(tmp_path / "extra.bin"), str(ref_dir / "clip_pretrained.pt"))
    missing = {k: v for k, v in sd.items() if k != "global_mat_weight_1"}
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(CheckpointMismatchError, match="global_mat_weight_1"):
        load_ucofia_checkpoint(str(tmp_path / "missing.bin"), str(ref_dir / "clip_pretrained.pt"))


def test_a_clip_file_of_other_sizes_is_refused(ref_dir, tmp_path):
    clip = torch.load(ref_dir / "clip_pretrained.pt", map_location="cpu", weights_only=True)
    clip["token_embedding.weight"] = clip["token_embedding.weight"][:1000].clone()
    torch.save(clip, tmp_path / "ViT-B-32.pt")
    with pytest.raises(DataFormatError, match="vocab_size: CLIP file 1000, checkpoint 49408"):
        load_ucofia_checkpoint(str(ref_dir / "pytorch_model.bin.0"), str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(FileNotFoundError, match="CLIP weights"):
        load_ucofia_checkpoint(str(ref_dir / "pytorch_model.bin.0"), str(tmp_path / "none.pt"))


def test_frames_that_do_not_match_max_frames_and_an_empty_bank(model, encoded, fx):
    te, _, ve = encoded
    px = fx["inputs"]["video"][:1, 0, :8, 0]
    with pytest.raises(ValueError, match="max_frames=12"):
        model.encode_video(px, torch.ones(1, 8))
    empty = te[torch.zeros(0, dtype=torch.long)]
    with pytest.raises(ValueError, match="bank"):
        model.ucofia_scores(te, ve, bank=empty)
    with pytest.raises(ValueError, match="bank"):
        model.compute_video_bias(empty, ve)
    with pytest.raises(ValueError, match="max_words"):
        model.encode_text(torch.ones(1, 40, dtype=torch.long))


def test_the_model_is_registered():
    from lavis.common.registry import registry

    assert registry.get_model_class("c2f_ucofia_retriever") is C2FUCoFiA
