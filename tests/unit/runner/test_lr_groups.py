"""Runner optimiser groups (run.lr_groups, weight_decay_scope, adam_eps) and the per-step
warm-up + cosine schedule (transformers' get_cosine_schedule_with_warmup, used by T-MASS)."""
import pytest
import torch
from omegaconf import OmegaConf

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.runners.c2f_runner import C2FRunner
from lavis_c2f.runners.schedulers import WarmupCosineLRScheduler


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.clip = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)
        self.norm = torch.nn.LayerNorm(2)


def _optimizer(**run):
    r = object.__new__(C2FRunner)          # only the optimiser part of the runner
    r.run_cfg = OmegaConf.create({"init_lr": 3e-5, **run})
    r._model, r._optimizer = _Net(), None
    return r._model, r.optimizer


def test_default_groups_are_unchanged():
    net, opt = _optimizer(weight_decay=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all("lr_scale" not in g for g in opt.param_groups) and opt.defaults["eps"] == 1e-8


def test_tmass_groups_two_learning_rates_decay_everything():
    net, opt = _optimizer(weight_decay=0.2, weight_decay_scope="all", adam_eps=1e-6,
                          lr_groups=[{"prefix": "clip.", "lr": 1e-6}])
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(net.clip.weight)]["lr"] == pytest.approx(1e-6)
    assert by_id[id(net.clip.bias)]["lr_scale"] == pytest.approx(1e-6 / 3e-5)
    assert by_id[id(net.head.bias)]["lr"] == pytest.approx(3e-5) and "lr_scale" not in by_id[id(net.head.bias)]
    assert all(g["weight_decay"] == 0.2 for g in opt.param_groups if g["params"])
    assert opt.defaults["eps"] == 1e-6
    sched = WarmupCosineLRScheduler(opt, max_epoch=2, init_lr=3e-5, warmup_proportion=0.1, iters_per_epoch=10)
    sched.step(1, 5)
    assert by_id[id(net.clip.weight)]["lr"] == pytest.approx(sched.lr_at(1, 5) * 1e-6 / 3e-5)
    with pytest.raises(ConfigError, match=r"run.lr_groups\[0\].prefix: no trainable parameter name starts with 'vis.'"):
        _optimizer(lr_groups=[{"prefix": "vis.", "lr": 1e-6}])
    with pytest.raises(ConfigError, match=r"run.lr_groups\[0\]: unknown key"):
        _optimizer(lr_groups=[{"name": "clip.", "lr": 1e-6}])


def test_warmup_cosine_equals_transformers_schedule():
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([p], lr=3e-5)
    ref = get_cosine_schedule_with_warmup(ref_opt, num_warmup_steps=int(0.1 * 5 * 7), num_training_steps=5 * 7)
    ours = WarmupCosineLRScheduler(torch.optim.SGD([p], lr=1.0), max_epoch=5, init_lr=3e-5, warmup_proportion=0.1,
                                   iters_per_epoch=7)
    for step in range(5 * 7):
        assert ours.lr_at(step // 7, step % 7) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        ref_opt.step()
        ref.step()
    with pytest.raises(ConfigError, match="steps per epoch"):
        WarmupCosineLRScheduler(ref_opt, max_epoch=5, init_lr=1.0)
