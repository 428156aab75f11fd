"""Official-recipe switches: weight decay on every parameter, kept last batch, T2V mask in training only."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.runners.c2f_runner import C2FRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grounder"))
from grounder_helpers import make_batch, tiny_qd_config  # noqa: E402


def _runner(tmp_path: Path, model: torch.nn.Module, **run) -> C2FRunner:
    run_cfg = OmegaConf.create(dict(dict(device="cpu", output_dir=str(tmp_path), job_id="t", init_lr=1e-3,
                                         weight_decay=0.1), **run))
    cfg = SimpleNamespace(run_cfg=run_cfg, config=OmegaConf.create({"run": run_cfg}))
    return C2FRunner(cfg, SimpleNamespace(), model, datasets={})


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.act = torch.nn.PReLU()


def _decay_of(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> float:
    return next(g["weight_decay"] for g in opt.param_groups if any(p is param for p in g["params"]))


def test_weight_decay_scope_all_decays_every_parameter(tmp_path):
    net = Net()
    opt = _runner(tmp_path, net, weight_decay_scope="all").optimizer
    assert all(_decay_of(opt, p) == pytest.approx(0.1) for p in net.parameters())


def test_weight_decay_scope_matrices_exempts_biases_norms_and_1d(tmp_path):
    net = Net()
    opt = _runner(tmp_path, net).optimizer  # default: matrices
    assert _decay_of(opt, net.proj.weight) == pytest.approx(0.1)
    for p in (net.proj.bias, net.norm.weight, net.norm.bias, net.act.weight):
        assert _decay_of(opt, p) == 0.0


def test_unknown_weight_decay_scope_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="run.weight_decay_scope"):
        _runner(tmp_path, Net(), weight_decay_scope="some").optimizer


def test_official_training_mask_and_batch_independent_prediction():
    from lavis_c2f.models.grounder.lavis_models import C2FQDDETR

    torch.manual_seed(0)
    model = C2FQDDETR.from_config(tiny_qd_config(dropout=0.0, input_dropout=0.0)).eval()
    assert model.config["t2v_mask_mode"] == "official" and model.config["eval_t2v_mask_mode"] == "correct"
    batch = make_batch([20, 9, 14, 6], [7, 3, 5, 2], [[[2, 8]], [[0, 4]], [[4, 10]], [[2, 6]]], seed=3)
    x = model._inputs(batch)
    train_mask_out = model.detr(**x, compute_neg=False)  # the model's training mask (official)
    correct_out = model.detr(**x, compute_neg=False, t2v_mask_mode="correct")
    # the official mask mixes the padding of the batch's samples: outputs differ on this padded batch
    assert not torch.allclose(train_mask_out["pred_spans"], correct_out["pred_spans"], atol=1e-6)
    # predictions use the batch-independent mask: each row equals the sample predicted alone
    rows = model.predict_batch(batch)
    for i, row in enumerate(rows):
        alone = model.predict_batch(_single(batch, i))[0]
        np.testing.assert_allclose(alone["pred_relevant_windows"], row["pred_relevant_windows"], atol=1e-4)
        np.testing.assert_allclose(alone["pred_saliency_scores"], row["pred_saliency_scores"], atol=1e-4)


def _single(batch, i):
    """Sample ``i`` of a collated batch as a batch of one, its padding cut off."""
    nv, nt = int(batch["src_vid_mask"][i].sum()), int(batch["src_txt_mask"][i].sum())
    one = {k: (v[i:i + 1] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
    one["src_vid"], one["src_vid_mask"] = one["src_vid"][:, :nv], one["src_vid_mask"][:, :nv]
    one["src_txt"], one["src_txt_mask"] = one["src_txt"][:, :nt], one["src_txt_mask"][:, :nt]
    one["saliency_all_labels"] = one["saliency_all_labels"][:, :nv]
    return one
