"""lavis_c2f/ops/dropout.py: the raw-bits dropout kernel keeps 1 - p of the elements, scales
them like F.dropout and is reproducible under torch.manual_seed."""
from __future__ import annotations

import pytest
import torch

from lavis_c2f.ops.dropout import Dropout, dropout, keep_mask, set_dropout_kernel


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    torch.manual_seed(0)
    n = 1_000_000
    rate = keep_mask(torch.Size([n]), p).float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 standard errors


def test_masks_are_independent_and_not_constant_along_any_axis():
    torch.manual_seed(1)
    m = keep_mask(torch.Size([64, 33, 40]), 0.5).float()
    # neighbouring elements (same 64-bit word) and rows are uncorrelated
    a, b = m.flatten()[0::2], m.flatten()[1::2]
    corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
    assert abs(corr.item()) < 0.02
    assert 0.3 < m.mean(dim=(1, 2)).min() and m.mean(dim=(1, 2)).max() < 0.7


def test_output_and_gradient_scale_kept_elements_by_one_over_keep_rate():
    torch.manual_seed(2)
    x = torch.randn(8, 50, 32, requires_grad=True)
    y = dropout(x, 0.25, True, "bits")
    kept = y != 0
    assert 0.7 < kept.float().mean() < 0.8
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


def test_seeded_draws_repeat_and_identity_cases():
    x = torch.randn(4, 100)
    torch.manual_seed(3)
    a = dropout(x, 0.1, True, "bits")
    torch.manual_seed(3)
    b = dropout(x, 0.1, True, "bits")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert dropout(x, 0.1, False, "bits") is x  # eval
    assert dropout(x, 0.0, True, "bits") is x
    assert torch.count_nonzero(dropout(x, 1.0, True, "bits")) == 0  # falls back to F.dropout
    torch.manual_seed(4)
    want = torch.nn.functional.dropout(x, 0.3, True)
    torch.manual_seed(4)
    torch.testing.assert_close(dropout(x, 0.3, True, "torch"), want, rtol=0, atol=0)


def test_dropout_module_and_kernel_switch():
    model = torch.nn.Sequential(Dropout(0.5), torch.nn.Sequential(Dropout(0.1)))
    assert model[0].dropout_kernel == "torch"
    assert set_dropout_kernel(model, "bits") == 2
    model.train()
    x = torch.ones(1000)
    y = model[0](x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    model.eval()
    assert model(x) is x
    with pytest.raises(ValueError, match="unknown dropout kernel 'fast'"):
        set_dropout_kernel(model, "fast")
