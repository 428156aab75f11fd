"""The grounder's fast kernels against their straightforward counterparts: attention (fused
and explicit paths, additive mask bias), PReLU's backward, and a whole training step of QD-DETR
and MESM with the torch reference kernels swapped in (same losses and gradients)."""
from __future__ import annotations

import pytest
import torch

from grounder_helpers import TINY_QD, make_batch
from lavis_c2f.models.grounder import attention as attention_mod
from lavis_c2f.models.grounder.attention import attend, attention_bias
from lavis_c2f.models.grounder.prelu import PReLU


def _reference_attention(q, k, v, heads, blocked):
    """Per head softmax(q k^T / sqrt(d)) v over the open keys (masked_fill with -inf); a row
    with every key blocked averages the values."""
    b, lq, dqk = q.shape
    out = torch.zeros(b, lq, v.shape[2])
    dh, dv = dqk // heads, v.shape[2] // heads
    for i in range(b):
        for h in range(heads):
            qh, kh = q[i, :, h * dh:(h + 1) * dh], k[i, :, h * dh:(h + 1) * dh]
            vh = v[i, :, h * dv:(h + 1) * dv]
            s = qh @ kh.T / dh ** 0.5
            m = blocked[i, h] if blocked is not None else torch.zeros_like(s, dtype=torch.bool)
            w = torch.softmax(s.masked_fill(m, float("-inf")), -1)
            w = torch.where(m.all(-1, keepdim=True), torch.full_like(w, 1.0 / s.shape[1]), w)
            out[i, :, h * dv:(h + 1) * dv] = w @ vh
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_attention_paths_match_reference_with_padding_and_blocked_rows(fused, monkeypatch):
    monkeypatch.setattr(attention_mod, "FUSED_MIN_SCORES", 0 if fused else 1 << 62)
    g = torch.Generator().manual_seed(0)
    b, lq, lk, heads = 3, 5, 6, 2
    q, k = torch.randn(b, lq, 8, generator=g), torch.randn(b, lq if lq == lk else lk, 8, generator=g)
    v = torch.randn(b, lk, 6, generator=g)
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[1, 3:] = True
    pad[2, :] = True  # every key of sample 2 is padding
    extra = torch.zeros(b, heads, lq, lk, dtype=torch.bool)
    extra[0, 1, 2, :4] = True
    bias = attention_bias(pad, extra)
    got = attend(q, k, v, heads, bias)
    blocked = pad[:, None, None, :] | extra
    torch.testing.assert_close(got, _reference_attention(q, k, v, heads, blocked), atol=1e-5, rtol=0)
    assert torch.isfinite(got).all()
    # no mask at all and a mask that blocks nothing are the same thing
    assert attention_bias(torch.zeros(b, lk, dtype=torch.bool)) is None and attention_bias() is None
    torch.testing.assert_close(attend(q, k, v, heads, None), _reference_attention(q, k, v, heads, None),
                               atol=1e-5, rtol=0)


def test_attention_dropout_goes_through_f_dropout(monkeypatch):
    """With dropout active the weights pass through torch.nn.functional.dropout (the site a
    recorded official mask is replayed at), whatever the tensor size."""
    monkeypatch.setattr(attention_mod, "FUSED_MIN_SCORES", 0)
    seen = []
    original = torch.nn.functional.dropout

    def spy(x, p=0.5, training=True, inplace=False):
        seen.append(tuple(x.shape))
        return original(x, p, training, inplace)

    monkeypatch.setattr(torch.nn.functional, "dropout", spy)
    q = torch.randn(2, 4, 8)
    attend(q, q, q, 2, None, dropout_p=0.1, training=True)
    assert seen == [(2, 2, 4, 4)]
    attend(q, q, q, 2, None, dropout_p=0.1, training=False)
    assert len(seen) == 1


def test_prelu_forward_and_gradients_match_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 33, generator=g)
    x[0, 0, :5] = 0.0  # the kink: torch gives the input gradient g * w at x == 0
    ours, ref = PReLU(), torch.nn.PReLU()
    with torch.no_grad():
        ours.weight.fill_(0.3)
        ref.weight.fill_(0.3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert torch.equal(ya, yb)
    up = torch.randn(ya.shape, generator=g)
    ya.backward(up)
    yb.backward(up)
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def _swap_reference_kernels(module: torch.nn.Module) -> None:
    """Replace every fast PReLU by torch's and disable the fused attention path."""
    for name, child in list(module.named_children()):
        if isinstance(child, PReLU):
            ref = torch.nn.PReLU()
            ref.weight = child.weight
            setattr(module, name, ref)
        else:
            _swap_reference_kernels(child)


@pytest.mark.parametrize("arch", ["qd_detr", "mesm"])
def test_training_step_equals_reference_kernels(arch, counts_file, monkeypatch):
    """Losses and every parameter gradient of one training step (dropout off, official T2V
    mask, negative pass) equal those computed with torch's PReLU and explicit attention."""
    from lavis_c2f.models.grounder import C2FMESMQDDETR, C2FQDDETR

    from grounder_helpers import tiny_mesm_config, tiny_qd_config

    torch.manual_seed(0)
    common = dict(dropout=0.0, input_dropout=0.0, t2v_mask_mode="official")
    if arch == "qd_detr":
        model = C2FQDDETR.from_config(tiny_qd_config(**common))
    else:
        model = C2FMESMQDDETR.from_config(tiny_mesm_config(**common, vocab_counts=counts_file,
                                                          fw_tokenizer="whitespace",
                                                          fw_word_weights="inverse_frequency"))
    batch = make_batch([10, 7, 12, 9], [5, 3, 6, 4],
                       [[[4.0, 10.0]], [[0.0, 4.0], [8.0, 12.0]], [[10.0, 20.0]], [[2.0, 6.0]]],
                       vids=["v0", "v1", "v2", "v3"],
                       queries=["a person opens the door", "the door", "a person opens the door number",
                                "opens the door"])
    model.train()

    def step():
        torch.manual_seed(1)
        import numpy as np

        np.random.seed(1)
        model.zero_grad()
        out = model(batch)
        out["loss"].backward()
        return ({k: v.detach().clone() for k, v in out.items()},
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    fast_losses, fast_grads = step()
    monkeypatch.setattr(attention_mod, "FUSED_MIN_SCORES", 1 << 62)
    _swap_reference_kernels(model)
    ref_losses, ref_grads = step()
    assert fast_losses.keys() == ref_losses.keys()
    for k in fast_losses:
        torch.testing.assert_close(fast_losses[k], ref_losses[k], atol=1e-5, rtol=1e-5, msg=k)
    assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) > 20
    for n in fast_grads:
        torch.testing.assert_close(fast_grads[n], ref_grads[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("arch", ["qd_detr", "mesm"])
def test_batched_prediction_equals_one_sample_at_a_time(arch, counts_file):
    """Outside training the decoder shares its first layer's queries across the batch and the
    key-position projections across samples of one padding; each sample's outputs equal its
    outputs alone (batch-independent T2V mask)."""
    from lavis_c2f.models.grounder import C2FMESMQDDETR, C2FQDDETR

    from grounder_helpers import tiny_mesm_config, tiny_qd_config

    torch.manual_seed(0)
    if arch == "qd_detr":
        model = C2FQDDETR.from_config(tiny_qd_config(t2v_mask_mode="correct"))
    else:
        model = C2FMESMQDDETR.from_config(tiny_mesm_config(t2v_mask_mode="correct"))
    model.eval()
    batch = make_batch([10, 7, 10, 12, 7], [5, 3, 6, 4, 5],
                       [[[4.0, 10.0]], [[0.0, 4.0]], [[10.0, 14.0]], [[2.0, 6.0]], [[2.0, 8.0]]])
    keys = ("src_txt", "src_txt_mask", "src_vid", "src_vid_mask")
    with torch.no_grad():
        full = model.detr(**{k: batch[k] for k in keys}, compute_neg=False)
        for i in range(5):
            one = model.detr(**{k: batch[k][i:i + 1] for k in keys}, compute_neg=False)
            for key in ("pred_logits", "pred_spans", "saliency_scores"):
                torch.testing.assert_close(full[key][i:i + 1], one[key], atol=1e-5, rtol=0)
            torch.testing.assert_close(full["aux_outputs"][0]["pred_spans"][i:i + 1],
                                       one["aux_outputs"][0]["pred_spans"], atol=1e-5, rtol=0)
