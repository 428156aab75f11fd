"""C2FBaseModel: LAVIS's BaseModel with a cheap ``device`` and a ``train``/``eval`` that skips
the walk when nothing would change, without ever leaving a submodule in the wrong mode."""
import torch
from torch import nn

from lavis_c2f.models.base import C2FBaseModel


class Tiny(C2FBaseModel):
    def __init__(self, with_params: bool = True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)) if with_params else nn.Sequential()
        self.head = None                      # an unset optional child (None in _modules)


def modes(m: nn.Module):
    return {name: sub.training for name, sub in m.named_modules()}


def test_device_is_the_first_parameters_then_a_buffers_then_cpu():
    assert Tiny().device == torch.device("cpu")
    empty = Tiny(with_params=False)
    assert empty.device == torch.device("cpu")
    empty.register_buffer("b", torch.zeros(1, dtype=torch.float64))
    assert empty.device == empty.b.device


def test_eval_and_train_switch_every_submodule_even_one_switched_by_hand():
    m = Tiny()
    assert m.eval() is m and not any(modes(m).values())
    assert m.eval() is m and not any(modes(m).values())          # nothing to change: skipped
    m.body[1].train()                                           # a submodule put back by hand
    m.eval()
    assert not any(modes(m).values())
    m.train()
    assert all(modes(m).values())
    m.body.eval()
    m.train(True)
    assert all(modes(m).values())


def test_eval_makes_inference_deterministic():
    m = Tiny().eval()
    m.body[1].train()
    m.eval()
    x = torch.ones(2, 4)
    assert torch.equal(m.body(x), m.body(x))
