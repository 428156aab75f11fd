"""ParamCache (values rebuilt when their parameters change) and the packed oneDNN weights of
inference products (same results as the training path)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from lavis_c2f.ops.linear import Linear, concat_linear, frozen_linear, onednn_available, set_linear_kernel
from lavis_c2f.ops.param_cache import ParamCache, frozen, linear_params


def test_cache_rebuilds_only_when_a_parameter_changes():
    layer = nn.Linear(4, 3)
    cache, built = ParamCache(), []

    def build():
        built.append(1)
        return layer.weight.detach().sum().item()

    params = linear_params([layer])
    first = cache.get("s", params, build)
    assert cache.get("s", params, build) == first and len(built) == 1
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimiser step writes in place: new version
    assert cache.get("s", params, build) == pytest.approx(first + 12.0) and len(built) == 2
    other = nn.Linear(4, 3)
    layer.load_state_dict(other.state_dict())  # copies in place: new version
    assert cache.get("s", params, build) == pytest.approx(other.weight.sum().item())
    assert len(built) == 3
    assert len(copy.deepcopy(cache)) == 0 and len(pickle.loads(pickle.dumps(cache))) == 0
    cache.clear()
    assert len(cache) == 0


def test_frozen_means_eval_without_gradient():
    layer = nn.Linear(2, 2)
    assert not frozen(layer)
    layer.eval()
    assert not frozen(layer)
    with torch.no_grad():
        assert frozen(layer)
        layer.train()
        assert not frozen(layer)


def test_concat_linear_is_the_separate_products():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 5), nn.Linear(8, 3, bias=False), nn.Linear(8, 5)]
    x = torch.randn(2, 7, 8)
    with torch.no_grad():
        got = frozen_linear(x, concat_linear(layers), "torch").split([5, 3, 5], dim=-1)
        for g, layer in zip(got, layers):
            torch.testing.assert_close(g, layer(x), atol=1e-6, rtol=0)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")
def test_packed_inference_weights_equal_the_training_path_and_follow_updates():
    torch.manual_seed(0)
    layer = Linear(256, 1024)
    set_linear_kernel(layer, "onednn")
    x = torch.randn(1, 75, 256)
    want = layer(x).detach()  # training path (gradient recorded)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), want)  # packed weight: the same products bit for bit
        assert len(layer._cache) == 1
        layer.eval()  # eval() keeps the packed weight
        assert len(layer._cache) == 1
        layer.weight.mul_(2.0)
        torch.testing.assert_close(layer(x), 2.0 * want - layer.bias, atol=1e-4, rtol=1e-5)
        twin = copy.deepcopy(layer)
        assert len(twin._cache) == 0 and torch.equal(twin(x), layer(x))
    pickle.dumps(layer)
    layer.train()
    assert len(layer._cache) == 0
