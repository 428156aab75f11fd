import pytest
import torch
import torch.nn as nn

from lavis_c2f.models.refiner.lora import LoRALinear, apply_lora, lora_parameters


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8, bias=False)
        self.wo = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.wo(self.norm(self.q(x) + self.v(x)))


def test_wrapped_layer_starts_identical_and_keeps_state_dict_keys():
    torch.manual_seed(0)
    m = Block()
    x = torch.randn(3, 8)
    before = m(x)
    keys = set(m.state_dict())
    names = apply_lora(m, ["q", "v"], r=2, alpha=4.0, dropout=0.0)
    assert names == ["q", "v"]
    assert isinstance(m.q, LoRALinear) and isinstance(m.v, LoRALinear) and type(m.wo) is nn.Linear
    torch.testing.assert_close(m(x), before)
    assert keys <= set(m.state_dict())
    assert set(m.state_dict()) - keys == {"q.lora_A", "q.lora_B", "v.lora_A", "v.lora_B"}


def test_only_lora_factors_train_and_update_changes_output():
    torch.manual_seed(0)
    m = Block()
    apply_lora(m, ["q", "v", "wo"], r=2, alpha=2.0, dropout=0.1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{l}.lora_{ab}" for l in ("q", "v", "wo") for ab in "AB"}
    assert len(list(lora_parameters(m))) == 6
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    w_before = m.q.weight.detach().clone()
    m.train()
    losses = []
    for _ in range(20):
        loss = ((m(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    torch.testing.assert_close(m.q.weight, w_before)  # the base weight never moves


def test_merged_weight_and_bf16_base():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    layer = LoRALinear.from_linear(lin, r=3, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), x @ layer.merged_weight().T + lin.bias)
    layer.weight.data = layer.weight.data.bfloat16()
    layer.bias.data = layer.bias.data.bfloat16()
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16


def test_no_matching_layer_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_lora(Block(), ["query"])
    with pytest.raises(ValueError):
        apply_lora(Block(), [])
    with pytest.raises(ValueError):
        LoRALinear(4, 4, r=0)
