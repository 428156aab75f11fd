"""The registered LAVIS models: config handling, training/inference API, checkpoints."""
from __future__ import annotations

import os

import pytest
import torch

from grounder_helpers import assert_rows_close, make_batch, tiny_mesm_config, tiny_qd_config
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.grounder import C2FMESMQDDETR, C2FQDDETR, CheckpointMismatchError
from lavis_c2f.ops.linear import onednn_available


def test_registered_and_config_paths_are_absolute():
    from lavis.common.registry import registry

    assert registry.get_model_class("c2f_qd_detr") is C2FQDDETR
    assert registry.get_model_class("c2f_mesm_qd_detr") is C2FMESMQDDETR
    for cls in (C2FQDDETR, C2FMESMQDDETR):
        assert {"default", "qvh_clip", "demo"} <= set(cls.PRETRAINED_MODEL_CONFIG_DICT)
        for model_type, path in cls.PRETRAINED_MODEL_CONFIG_DICT.items():
            assert os.path.isabs(path) and os.path.isfile(path)
            assert cls.default_config_path(model_type) == path
    with pytest.raises(ConfigError, match="unknown model_type"):
        C2FQDDETR.default_config_path("nope")


@pytest.mark.parametrize("cls,model_type", [(C2FQDDETR, "qvh_clip"), (C2FQDDETR, "qvh_clip_slowfast"),
                                            (C2FQDDETR, "demo"), (C2FMESMQDDETR, "default")])
def test_shipped_yamls_build(cls, model_type):
    model = cls.from_pretrained(model_type)
    assert model.detr.vid_dim in (514, 2818) and model.detr.txt_dim == 512
    assert model.config["arch"] == cls.ARCH


def test_lavis_load_model_builds_in_eval_mode():
    from lavis.models import load_model

    model = load_model("c2f_qd_detr", "demo", is_eval=True)
    assert isinstance(model, C2FQDDETR) and not model.training
    assert model.postprocess.top_k == 5 and model.postprocess.nms_threshold == 0.7


@pytest.mark.parametrize("cls,cfg", [(C2FQDDETR, tiny_qd_config), (C2FMESMQDDETR, tiny_mesm_config)])
def test_kernel_keys_reach_every_layer(cls, cfg):
    """``linear_kernel`` / ``dropout_kernel`` are set on every product and dropout site (the
    attention modules included); the kernels change rounding only, not the outputs' meaning."""
    torch.manual_seed(0)
    fast = cls.from_config(cfg(hidden_dim=64, dim_feedforward=256))
    torch.manual_seed(0)
    plain = cls.from_config(cfg(hidden_dim=64, dim_feedforward=256, linear_kernel="torch",
                                dropout_kernel="torch"))
    kernels = {(type(m).__name__, getattr(m, "linear_kernel", None), getattr(m, "dropout_kernel", None))
               for m in fast.detr.modules() if hasattr(m, "linear_kernel") or hasattr(m, "dropout_kernel")}
    expect_linear = "onednn" if onednn_available() else "torch"
    assert {k[0] for k in kernels} >= {"Linear", "Dropout", "PackedMultiheadAttention",
                                       "ProjectionFreeMultiheadAttention"}
    assert {k[1] for k in kernels} - {None} == {expect_linear}
    assert {k[2] for k in kernels} - {None} == {"bits"}
    assert all(getattr(m, "linear_kernel", "torch") == "torch" and getattr(m, "dropout_kernel", "torch") == "torch"
               for m in plain.detr.modules())
    batch = make_batch([40, 33], [6, 4], [[[2.0, 10.0]], [[0.0, 4.0]]])
    fast.eval()
    plain.eval()
    with torch.no_grad():
        a, b = fast.detr(**fast._inputs(batch)), plain.detr(**plain._inputs(batch))
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="linear_kernel"):
        cls.from_config(cfg(linear_kernel="mkl"))


def test_from_config_rejects_unknown_and_bad_keys():
    with pytest.raises(ConfigError, match=r"model: unknown key\(s\) 'hiden_dim' \(did you mean 'hidden_dim'\?\)"):
        C2FQDDETR.from_config(tiny_qd_config(hiden_dim=3))
    with pytest.raises(ConfigError, match="model.vid_dim"):
        cfg = tiny_qd_config()
        del cfg["vid_dim"]
        C2FQDDETR.from_config(cfg)
    with pytest.raises(ConfigError, match="model.num_queries"):
        C2FQDDETR.from_config(tiny_qd_config(num_queries="ten"))
    with pytest.raises(ConfigError, match="t2v_mask_mode"):
        C2FQDDETR.from_config(tiny_qd_config(t2v_mask_mode="sometimes"))
    with pytest.raises(ConfigError, match=r"model\.postprocess: unknown key\(s\) 'nms'"):
        C2FQDDETR.from_config(tiny_qd_config(postprocess={"nms": 0.5}))
    with pytest.raises(ConfigError, match="contrastive_align_loss_coef"):
        C2FQDDETR.from_config(tiny_qd_config(contrastive_align_loss_coef=1.0))
    with pytest.raises(ConfigError, match="hidden_dim"):
        C2FQDDETR.from_config(tiny_qd_config(hidden_dim=30))  # not divisible by 4 heads
    model = C2FQDDETR.from_config(tiny_qd_config(pretrained=None, finetuned="", load_pretrained=False))
    assert model.detr.hidden_dim == 32


def test_omegaconf_node_is_accepted():
    from omegaconf import OmegaConf

    model = C2FQDDETR.from_config(OmegaConf.create(tiny_qd_config(postprocess={"top_k": 2})))
    assert model.postprocess.top_k == 2


def test_forward_returns_losses_and_backpropagates(batch):
    torch.manual_seed(0)
    model = C2FQDDETR.from_config(tiny_qd_config())
    model.train()
    out = model(batch)
    for key in ("loss", "loss_span", "loss_giou", "loss_label", "loss_saliency", "loss_span_0",
                "loss_giou_0", "loss_label_0"):
        assert key in out and torch.isfinite(out[key]).all(), key
    assert out["loss"].requires_grad and not out["loss_span"].requires_grad
    out["loss"].backward()
    assert model.detr.saliency_proj1.weight.grad is not None


def test_training_without_negative_pass(batch):
    torch.manual_seed(0)
    model = C2FQDDETR.from_config(tiny_qd_config(train_neg_pass=False))
    model.train()
    out = model(batch)
    assert "loss_saliency_neg_pair" not in out and "loss_saliency_rank" in out
    with_neg = C2FQDDETR.from_config(tiny_qd_config())
    with_neg.train()
    assert "loss_saliency_neg_pair" in with_neg(batch)


def test_predict_batch_rows_and_mode_check(batch):
    model = C2FQDDETR.from_config(tiny_qd_config())
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model.predict_batch(batch)
    model.eval()
    rows = model.predict_batch(batch)
    assert [r["qid"] for r in rows] == batch["qid"] and [r["vid"] for r in rows] == batch["vid"]
    for row, n, dur in zip(rows, batch["src_vid_mask"].sum(1).int().tolist(), batch["duration"].tolist()):
        assert len(row["pred_relevant_windows"]) == 5 and len(row["pred_saliency_scores"]) == n
        scores = [w[2] for w in row["pred_relevant_windows"]]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= st <= ed <= dur for st, ed, _ in row["pred_relevant_windows"])


def test_save_and_strict_load_round_trip(tmp_path, batch):
    torch.manual_seed(0)
    model = C2FQDDETR.from_config(tiny_qd_config(postprocess={"top_k": 3}))
    path = model.save_checkpoint(str(tmp_path / "ck.pth"), extra={"epoch": 4})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["arch"] == "c2f_qd_detr" and ckpt["epoch"] == 4 and ckpt["config"]["hidden_dim"] == 32
    other = C2FQDDETR.from_config(tiny_qd_config(postprocess={"top_k": 3}))
    report = other.load_checkpoint(path)
    assert report == {"kind": "ours", "missing": [], "unexpected": [], "mismatched": []}
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    rebuilt = C2FQDDETR.from_checkpoint(path)
    model.eval(), rebuilt.eval()
    assert rebuilt.predict_batch(batch) == model.predict_batch(batch)


def test_load_reports_missing_and_unexpected_keys(tmp_path):
    model = C2FQDDETR.from_config(tiny_qd_config(dec_layers=3))
    path = model.save_checkpoint(str(tmp_path / "ck.pth"))
    smaller = C2FQDDETR.from_config(tiny_qd_config(dec_layers=2, enc_layers=2))
    with pytest.raises(CheckpointMismatchError) as err:
        smaller.load_checkpoint(path)
    assert any(k.startswith("detr.transformer.decoder.layers.2.") for k in err.value.unexpected)
    assert any(k.startswith("detr.transformer.encoder.layers.1.") for k in err.value.missing)
    report = smaller.load_checkpoint(path, strict=False)
    assert report["unexpected"] and report["missing"]
    wider = C2FQDDETR.from_config(tiny_qd_config(dec_layers=3, num_queries=7))
    with pytest.raises(CheckpointMismatchError, match="shape mismatch for detr.query_embed.weight"):
        wider.load_checkpoint(path)


def test_runner_style_checkpoint(tmp_path):
    model = C2FQDDETR.from_config(tiny_qd_config())
    run_cfg = {"model": dict(model.config), "run": {"task": "c2f_moment_retrieval"}}
    path = str(tmp_path / "checkpoint_best.pth")
    torch.save({"model": model.state_dict(), "optimizer": {}, "config": run_cfg, "epoch": 1}, path)
    rebuilt = C2FQDDETR.from_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)
    finetuned = C2FQDDETR.from_config(tiny_qd_config(load_finetuned=True, finetuned=path))
    assert torch.equal(finetuned.detr.query_embed.weight, model.detr.query_embed.weight)


def test_official_checkpoint_through_the_wrapper(shared_dir):
    ref_dir = shared_dir / "fixtures" / "qd_detr_reference"
    fx = torch.load(ref_dir / "qd_detr_clip_reference.pt", map_location="cpu", weights_only=True)
    model = C2FQDDETR.from_checkpoint(str(ref_dir / "qd_detr_clip_model_best.ckpt"))
    assert model.detr.t2v_mask_mode == "official" and model.postprocess.max_ts_val == 150
    model.eval()
    metas = fx["meta"]["query_metas"]
    samples = dict(fx["inputs"], qid=[m["qid"] for m in metas], query=[m["query"] for m in metas],
                   vid=[m["vid"] for m in metas],
                   duration=torch.tensor([float(m["duration"]) for m in metas]),
                   clip_length=torch.full((3,), 2.0))
    assert_rows_close(model.predict_batch(samples), fx["postprocessed"])
    # the same weights also load into a model built from our YAML with matching widths
    ours = C2FQDDETR.from_pretrained("qvh_clip")
    assert ours.load_checkpoint(str(ref_dir / "qd_detr_clip_model_best.ckpt"))["kind"] == "official_qd_detr"


def test_batch_missing_keys_raise(batch):
    model = C2FQDDETR.from_config(tiny_qd_config())
    del batch["src_vid"]
    with pytest.raises(KeyError, match="src_vid"):
        model(batch)
    good = make_batch([4], [2], [[[0.0, 2.0]]])
    del good["span_labels"]
    model.train()
    with pytest.raises(KeyError, match="span_labels"):
        model(good)
