"""The inference-only paths of the grounders (merged same-input products, cached first decoder
queries, stacked T2V key/value products, packed weights, reused position codes) give the
outputs of the training-path code, also after the weights change."""
from __future__ import annotations

import pytest
import torch

from grounder_helpers import make_batch, tiny_mesm_config, tiny_qd_config
from lavis_c2f.models.grounder import C2FMESMQDDETR, C2FQDDETR
from lavis_c2f.models.grounder import attention, transformer
from lavis_c2f.ops import linear as linear_mod

KEYS = ("pred_logits", "pred_spans", "saliency_scores")


def _outputs(model, batch, monkeypatch, inference_paths: bool):
    if not inference_paths:
        for mod in (transformer, attention, linear_mod):
            monkeypatch.setattr(mod, "frozen", lambda module: False)
    with torch.no_grad():
        out = model.detr(**model._inputs(batch), compute_neg=False)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("cls,cfg", [(C2FQDDETR, tiny_qd_config), (C2FMESMQDDETR, tiny_mesm_config)])
@pytest.mark.parametrize("lengths", [[40], [40, 33, 40]])
def test_inference_paths_match_training_path_code(cls, cfg, lengths, monkeypatch):
    torch.manual_seed(0)
    # (packed oneDNN weights: tests/unit/ops/test_param_cache.py; these products are too small)
    model = cls.from_config(cfg(hidden_dim=64, dim_feedforward=256, dec_layers=3))
    model.eval()
    n = len(lengths)
    batch = make_batch(lengths, [6, 4, 5][:n], [[[2.0, 10.0]], [[0.0, 4.0]], [[8.0, 20.0]]][:n])
    for _ in range(2):  # the second round reads every cache
        fast = _outputs(model, batch, monkeypatch, True)
        plain = _outputs(model, batch, monkeypatch, False)
        for key in KEYS:
            torch.testing.assert_close(fast[key], plain[key], atol=1e-5, rtol=0)
    # an in-place weight update (optimiser step) and a state-dict load invalidate the caches
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    fast, plain = _outputs(model, batch, monkeypatch, True), _outputs(model, batch, monkeypatch, False)
    for key in KEYS:
        torch.testing.assert_close(fast[key], plain[key], atol=1e-5, rtol=0)
    torch.manual_seed(1)
    other = cls.from_config(cfg(hidden_dim=64, dim_feedforward=256, dec_layers=3))
    model.load_state_dict(other.state_dict())
    other.eval()
    fast, ref = _outputs(model, batch, monkeypatch, True), _outputs(other, batch, monkeypatch, False)
    for key in KEYS:
        torch.testing.assert_close(fast[key], ref[key], atol=1e-5, rtol=0)


def test_gradients_still_flow_in_eval_mode_with_grad_enabled():
    """Eval mode with gradients recorded (e.g. saliency attributions) takes the training-path
    code, so parameters receive gradients."""
    torch.manual_seed(0)
    model = C2FQDDETR.from_config(tiny_qd_config())
    model.eval()
    out = model.detr(**model._inputs(make_batch([10], [4], [[[2.0, 6.0]]])), compute_neg=False)
    out["pred_spans"].sum().backward()
    layer0 = model.detr.transformer.decoder.layers[0]
    assert layer0.sa_qpos_proj.weight.grad is not None
    assert model.detr.query_embed.weight.grad is not None
