"""The official T-MASS fixture (../shared/fixtures/tmass_reference): an official checkpoint loads
and the public methods reproduce the official numbers within 1e-5 given the same inputs and
noise. Each method has its own test; the last ones cover the official evaluation's index mix
and bad checkpoints."""
import pytest
import torch

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.models.checkpoint import CheckpointMismatchError, save_checkpoint
from lavis_c2f.models.retriever import C2FTMassRetriever, load_tmass_checkpoint

ATOL = 1e-5


@pytest.fixture(scope="module")
def ref_dir(reference_fixture):
    return reference_fixture("tmass_reference", "tmass_reference.pt")


@pytest.fixture(scope="module")
def fx(ref_dir):
    return torch.load(ref_dir / "tmass_reference.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(ref_dir, fx):
    return load_tmass_checkpoint(ref_dir / "tmass_model_best.pth", fx["clip_config"])


@pytest.fixture(scope="module")
def emb(model, fx):
    x = fx["inputs"]
    with torch.no_grad():
        return (model.encode_text(input_ids=x["input_ids"], attention_mask=x["attention_mask"]),
                model.encode_video(pixel_values=x["pixel_values"]))


def _close(got, want):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_loads_in_eval_mode_with_a_clip_tower(model):
    assert not model.training and model.clip is not None
    assert (model.embed_dim, model.num_frames, model.num_heads) == (512, 12, 1)
    assert model.logit_scale_source == "clip" and not hasattr(model, "logit_scale")
    assert model.inference_noise == "per_pair" and model.num_trials == 20
    assert float(model.log_logit_scale().detach()) == pytest.approx(2.6592, abs=1e-4)


def test_encode_text(emb, fx):
    _close(emb[0].sentence, fx["outputs"]["text_features"])


def test_encode_video(emb, fx):
    assert emb[1].mask.eq(1).all()
    _close(emb[1].frames, fx["outputs"]["video_features"])


def test_pooled_video(model, emb, fx):
    with torch.no_grad():
        got = model.pooled_video(*emb)                                   # (T, V, D)
    _close(got, fx["outputs"]["video_features_pooled"].transpose(0, 1))  # official [video, text]


def test_log_radius(model, emb, fx):
    with torch.no_grad():
        got = model.log_radius(*emb)
    _close(got, fx["outputs"]["log_var"].transpose(0, 1))
    _close(got.exp(), fx["outputs"]["text_std"].transpose(0, 1))       # the radius is exp(log_var)


def test_score_with_the_official_noise(model, emb, fx):
    noise = fx["noise"]["noise_grid"].permute(2, 0, 1, 3)               # [video, trial, text] -> [text, video, trial]
    got = model.score(*emb, noise=noise)
    _close(got, fx["outputs"]["sims_t2v"])
    torch.testing.assert_close(model.score(*emb, noise=noise, block_size=2), got, atol=1e-6, rtol=0)


def test_contrastive_losses(model, emb, fx):
    pairs, tr = fx["meta"]["eval_pairs"], fx["train"]
    with torch.no_grad():
        out = model.contrastive_losses(emb[0][pairs], emb[1][pairs], vids=None, noise=fx["noise"]["noise_train"])
    _close(out["loss_nce"], tr["loss"])
    _close(out["loss_support"], tr["loss_support"])
    _close(out["loss"], tr["loss_all"])
    assert float(out["loss"]) == pytest.approx(tr["loss_train_reported"], abs=ATOL)


def test_official_similarity_matrix_mixes_indices(model, emb, fx):
    """official_eval.sims[c, 0, j] scores caption c against video j pooled for video j's own
    caption; the trial selection used the right pooling. Rebuilt here from our pieces, and
    only its diagonal equals the correct score (docs/tmass.md)."""
    ev, noise = fx["official_eval"], fx["noise"]["noise_grid"].permute(2, 0, 1, 3)[:3, :3]
    te, ve = emb[0][[0, 1, 2]], emb[1][[0, 1, 2]]
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(model.pooled_video(te, ve), dim=-1)       # [text c, video j]
        radius = model.log_radius(te, ve).exp()
        trials = torch.nn.functional.normalize(te.sentence[:, None, None] + noise * radius[:, :, None], dim=-1)
        best = (trials * pooled[:, :, None]).sum(-1).argmax(-1)                            # (c, j)
        sel = trials.gather(2, best[..., None, None].expand(-1, -1, 1, 512))[:, :, 0]    # [c, j]
        mixed = torch.einsum("cjd,jd->cj", sel, pooled[torch.arange(3), torch.arange(3)])
        correct = model.score(te, ve, noise=noise)
    _close(mixed, ev["sims"][:, 0, :])
    _close(torch.diagonal(correct), torch.diagonal(ev["sims"][:, 0, :]))
    assert (correct - ev["sims"][:, 0, :]).abs().max() > 1e-4                # off-diagonal entries differ


def test_loads_from_a_clip_folder_and_from_yaml(ref_dir, fx, emb, tmp_path):
    from transformers import CLIPConfig

    CLIPConfig(**fx["clip_config"]).save_pretrained(str(tmp_path))           # config.json only, no weights
    m = load_tmass_checkpoint(str(ref_dir / "tmass_model_best.pth"), clip_path=str(tmp_path), num_trials=5)
    assert m.num_trials == 5
    x = fx["inputs"]
    with torch.no_grad():
        _close(m.encode_text(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).sentence,
               emb[0].sentence)
    node = {"arch": "c2f_tmass_retriever", "text_input_dim": 512, "video_input_dim": 512, "embed_dim": 512,
            "text_proj": "none", "video_proj": "none", "num_heads": 1, "logit_scale_source": "clip",
            "clip_config": fx["clip_config"], "tmass_checkpoint": str(ref_dir / "tmass_model_best.pth")}
    y = C2FTMassRetriever.from_config(node).eval()
    with torch.no_grad():
        _close(y.pooled_video(*emb), fx["outputs"]["video_features_pooled"].transpose(0, 1))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_checkpoints_raise_one_clear_error(ref_dir, fx, tmp_path):
    good = ref_dir / "tmass_model_best.pth"
    with pytest.raises(ConfigError, match="stores no CLIP architecture"):
        load_tmass_checkpoint(good)
    narrow = dict(fx["clip_config"], projection_dim=256)
    with pytest.raises(ConfigError, match="T-MASS modules are 512-wide but the given CLIP architecture "
                                          "projects to 256"):
        load_tmass_checkpoint(good, narrow)
    deeper = dict(fx["clip_config"], vision_config=dict(fx["clip_config"]["vision_config"], num_hidden_layers=3))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(16\).*vision_model.encoder.layers.2"):
        load_tmass_checkpoint(good, deeper)
    sd = dict(torch.load(good, map_location="cpu", weights_only=True)["state_dict"])
    sd.pop("pool_frames.linear_proj.bias")
    sd["pool_frames.extra.weight"] = torch.zeros(1)
    save_checkpoint({"epoch": 1, "state_dict": sd, "optimizer": {}}, tmp_path / "edited.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_tmass_checkpoint(tmp_path / "edited.pth", fx["clip_config"])
    assert e.value.missing == ["pool.linear_proj.bias"] and e.value.unexpected == ["pool.extra.weight"]
    assert "edited.pth" in str(e.value)
    save_checkpoint({"model": {"w": torch.zeros(1)}, "config": {}, "arch": "c2f_qd_detr"}, tmp_path / "ours.pth")
    with pytest.raises(DataFormatError, match=r"ours.pth: not an official T-MASS checkpoint.*lavis-c2f checkpoint"):
        load_tmass_checkpoint(tmp_path / "ours.pth", fx["clip_config"])
    save_checkpoint({"state_dict": {"encoder.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(DataFormatError, match=r"other.pth: 'state_dict' lacks the T-MASS keys"):
        load_tmass_checkpoint(tmp_path / "other.pth", fx["clip_config"])
    (tmp_path / "pickle.pth").write_bytes(b"\x80\x04not a torch file")
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*pickle.pth"):
        load_tmass_checkpoint(tmp_path / "pickle.pth", fx["clip_config"])
