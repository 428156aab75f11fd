"""lavis_c2f/ops/linear.py: the oneDNN linear kernel against F.linear, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lavis_c2f.ops import linear as L
from lavis_c2f.ops.linear import Linear, linear, set_linear_kernel

needs_onednn = pytest.mark.skipif(not L.onednn_available(), reason="torch built without oneDNN")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@needs_onednn
@pytest.mark.parametrize("shape,bias", [((4, 40, 256), True), ((300, 128), False), ((2, 30, 5, 64), True)])
def test_onednn_matches_torch_forward_and_backward(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(96, shape[-1], generator=g, requires_grad=True)
    b = torch.randn(96, generator=g, requires_grad=True) if bias else None
    assert L._on_onednn(x, w)  # large enough for the oneDNN path
    y = linear(x, w, b, "onednn")
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    got = [x.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if bias else [])
    for t in (x, w) + ((b,) if bias else ()):
        t.grad = None
    ref = F.linear(x, w, b)
    ref.backward(grad)
    want = [x.grad, w.grad] + ([b.grad] if bias else [])
    assert y.shape == ref.shape
    assert _rel(y.detach(), ref.detach()) < 1e-5  # float32 rounding, another summation order
    for a, e in zip(got, want):
        assert _rel(a, e) < 1e-5


@needs_onednn
def test_small_products_and_other_dtypes_stay_on_torch():
    w = torch.randn(256, 256)
    assert not L._on_onednn(torch.randn(3, 256), w)  # 3 x 256 x 256 multiply-adds: too few
    assert L._on_onednn(torch.randn(16, 256), w)
    assert not L._on_onednn(torch.randn(4096, 256), torch.randn(2, 256))  # 2 output columns
    x64, w64 = torch.randn(512, 256, dtype=torch.float64), torch.randn(256, 256, dtype=torch.float64)
    assert not L._on_onednn(x64, w64)
    torch.testing.assert_close(linear(x64, w64, None, "onednn"), F.linear(x64, w64), rtol=0, atol=0)
    x = torch.randn(3, 256)
    torch.testing.assert_close(linear(x, w, None, "onednn"), F.linear(x, w), rtol=0, atol=0)


@needs_onednn
def test_no_grad_and_frozen_weight_paths():
    x = torch.randn(200, 64, requires_grad=True)
    w, b = torch.randn(32, 64), torch.randn(32)  # frozen weight: only dL/dx
    y = linear(x, w, b, "onednn")
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(200, 32) @ w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = linear(x, w, b, "onednn")
    assert not out.requires_grad
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_module_is_a_drop_in_for_nn_linear():
    torch.manual_seed(0)
    ours = Linear(64, 32)
    torch.manual_seed(0)
    theirs = torch.nn.Linear(64, 32)
    assert isinstance(ours, torch.nn.Linear) and ours.linear_kernel == "torch"
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=0)
    x = torch.randn(100, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)  # torch kernel: bit for bit


def test_set_linear_kernel_sets_every_linear_and_rejects_unknown_names():
    model = torch.nn.Sequential(Linear(8, 8), torch.nn.ReLU(), torch.nn.Sequential(Linear(8, 4)))
    if L.onednn_available():
        assert set_linear_kernel(model, "onednn") == 2
        assert {m.linear_kernel for m in model.modules() if isinstance(m, Linear)} == {"onednn"}
    assert set_linear_kernel(model, "torch") == 2
    with pytest.raises(ValueError, match="unknown linear kernel 'mkl'"):
        set_linear_kernel(model, "mkl")


def test_onednn_falls_back_with_a_warning_when_missing(monkeypatch):
    monkeypatch.setattr(L, "_ONEDNN", False)
    model = torch.nn.Sequential(Linear(8, 8))
    with pytest.warns(RuntimeWarning, match="no oneDNN"):
        set_linear_kernel(model, "onednn")
    assert model[0].linear_kernel == "torch"
    x = torch.randn(512, 8)
    torch.testing.assert_close(linear(x, model[0].weight, None, "onednn"), F.linear(x, model[0].weight))
