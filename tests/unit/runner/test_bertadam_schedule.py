"""``c2f_bertadam_warmup_cosine`` on ``torch.optim.AdamW`` computes CLIP4Clip / UCoFiA's BertAdam.

The reference below is BertAdam's update written from its definition: no bias correction,
decoupled weight decay inside the learning rate, the ``warmup_cosine`` factor of
``step / t_total`` evaluated before the step counter moves (so the first step has lr 0).
"""
import math

import pytest
import torch

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.runners.schedulers import BertAdamWarmupCosineScheduler, bert_warmup_cosine


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64))]


def _groups(ps):
    # decayed, not decayed, decayed with a CLIP-style lr scale
    return [{"params": [ps[0]], "weight_decay": 0.2}, {"params": [ps[1]], "weight_decay": 0.0},
            {"params": [ps[2]], "weight_decay": 0.2, "lr_scale": 1e-3}]


def bertadam_reference(ps, grads, lr, t_total, warmup=0.1, b1=0.9, b2=0.98, e=1e-6):
    scales, decays = [1.0, 1.0, 1e-3], [0.2, 0.0, 0.2]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    ps = [p.detach().clone() for p in ps]
    for step, gs in enumerate(grads):
        x = step / t_total
        f = x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))
        for i, (p, g) in enumerate(zip(ps, gs)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            update = m[i] / (v[i].sqrt() + e) + decays[i] * p
            p -= lr * scales[i] * f * update
    return ps


def _run_adamw(grads, lr, iters_per_epoch, max_epoch, bias_correction=False):
    ps = _params()
    opt = torch.optim.AdamW(_groups(ps), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    sched = BertAdamWarmupCosineScheduler(opt, max_epoch=max_epoch, init_lr=lr, iters_per_epoch=iters_per_epoch,
                                          warmup_proportion=0.1, adam_bias_correction=bias_correction)
    lrs = []
    for step, gs in enumerate(grads):
        sched.step(cur_epoch=step // iters_per_epoch, cur_step=step % iters_per_epoch)
        lrs.append(opt.param_groups[0]["lr"])
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return ps, lrs


def test_adamw_with_the_schedule_is_bertadam():
    iters, epochs, lr = 7, 3, 0.05                    # 21 steps, warm-up over the first 2.1
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in _params()] for _ in range(iters * epochs)]
    ours, lrs = _run_adamw(grads, lr, iters, epochs)
    ref = bertadam_reference(_params(), grads, lr, t_total=iters * epochs)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12)
    assert lrs[0] == 0.0                               # BertAdam's first step has lr 0
    # with Adam's bias correction (plain AdamW + the same lr factor) the result differs
    plain, _ = _run_adamw(grads, lr, iters, epochs, bias_correction=True)
    assert max(float((a.detach() - b).abs().max()) for a, b in zip(plain, ref)) > 1e-4


def test_the_factor_and_its_steps():
    assert bert_warmup_cosine(0.0, 0.1) == 0.0
    assert bert_warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    assert bert_warmup_cosine(0.1, 0.1) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))   # the jump
    assert bert_warmup_cosine(1.0, 0.1) == pytest.approx(0.0)
    opt = torch.optim.AdamW(_groups(_params()), lr=1.0)
    sched = BertAdamWarmupCosineScheduler(opt, max_epoch=2, init_lr=1.0, iters_per_epoch=5, accum_grad_iters=2,
                                          adam_bias_correction=True)
    assert sched.total_steps == 6 and sched.optimizer_step(1, 4) == 5 and sched.optimizer_step(0, 1) == 0
    sched.step(1, 0)
    assert opt.param_groups[2]["lr"] == pytest.approx(1e-3 * bert_warmup_cosine(3 / 6, 0.1))
    with pytest.raises(ConfigError, match="steps per epoch"):
        BertAdamWarmupCosineScheduler(opt, max_epoch=2, init_lr=1.0, iters_per_epoch=None)
