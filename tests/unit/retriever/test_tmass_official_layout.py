"""Official-layout T-MASS checkpoints of other CLIP sizes (widths, depths, patch, activation,
several attention heads) load and match a direct re-derivation of the official computation
(HF CLIPModel towers + the formulas of the reference's pool_frames / std_branch / trainer)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lavis_c2f.models.retriever import load_tmass_checkpoint

from frames_helpers import BOS, EOS, tiny_clip_config

CASES = {
    "b16-like": dict(clip=dict(width=48, proj=40, layers=2, heads=4, image_size=32, patch=8, act="quick_gelu"),
                     frames=6, heads=1),
    "gelu-2heads": dict(clip=dict(width=32, proj=24, layers=3, heads=2, image_size=48, patch=16, act="gelu"),
                        frames=4, heads=2),
}


def official_layout_checkpoint(path, clip_cfg, num_frames, seed=0):
    """``{"epoch", "state_dict", "optimizer"}`` with CLIPStochastic's key names and random
    (non-symmetric) weights."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(**clip_cfg))
    g = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for k, v in clip.state_dict().items():
        if v.is_floating_point() and (k.endswith("bias") or "norm" in k):
            v = v + 0.05 * torch.randn(v.shape, generator=g)
        sd["clip." + k] = v
    clip.load_state_dict({k[len("clip."):]: v for k, v in sd.items()})
    d = clip_cfg["projection_dim"]
    for name in ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.out_proj", "linear_proj"):
        sd[f"pool_frames.{name}.weight"] = torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)
        sd[f"pool_frames.{name}.bias"] = 0.1 * torch.randn(d, generator=g)
    for i in (1, 2, 3):
        sd[f"pool_frames.layer_norm{i}.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        sd[f"pool_frames.layer_norm{i}.bias"] = 0.1 * torch.randn(d, generator=g)
    sd["stochastic.std_branch.linear_proj.weight"] = (torch.eye(d, num_frames)
                                                      + 2 * torch.randn(d, num_frames, generator=g))
    sd["stochastic.std_branch.linear_proj.bias"] = -0.5 + 0.3 * torch.randn(d, generator=g)
    sd["stochastic.std_branch.learnable_scalar"] = torch.zeros(1)
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    return sd, clip


def reference(sd, clip, ids, mask, pixels, noise, noise_train, heads):
    """The official computation written out (shapes: T texts, V videos, F frames, K trials)."""
    v_n, f_n = pixels.shape[:2]
    t = clip.get_text_features(input_ids=ids, attention_mask=mask)                         # (T, D)
    fr = clip.get_image_features(pixel_values=pixels.flatten(0, 1)).view(v_n, f_n, -1)      # (V, F, D)
    d = t.shape[1]

    def lin(x, n):
        return x @ sd[n + ".weight"].t() + sd[n + ".bias"]

    def ln(x, i):
        return F.layer_norm(x, (d,), sd[f"pool_frames.layer_norm{i}.weight"], sd[f"pool_frames.layer_norm{i}.bias"])

    dh = d // heads
    q = lin(ln(t, 1), "pool_frames.cross_attn.q_proj").view(-1, heads, dh)                  # (T, H, dh)
    k = lin(ln(fr, 1), "pool_frames.cross_attn.k_proj").view(v_n, f_n, heads, dh)
    val = lin(ln(fr, 1), "pool_frames.cross_attn.v_proj").view(v_n, f_n, heads, dh)
    a = torch.softmax(torch.einsum("vfhe,the->vhft", k, q) / math.sqrt(dh), dim=2)          # over frames
    o = torch.einsum("vhft,vfhe->vthe", a, val).reshape(v_n, -1, d)
    o = ln(lin(o, "pool_frames.cross_attn.out_proj"), 2)
    pooled = ln(o + lin(o, "pool_frames.linear_proj"), 3)                                  # (V, T, D)
    cos = torch.einsum("td,vfd->vtf", t / t.norm(dim=-1, keepdim=True), fr / fr.norm(dim=-1, keepdim=True))
    log_var = lin(cos, "stochastic.std_branch.linear_proj")                                # (V, T, D)
    trials = t[None, None] + noise * log_var.exp()[:, None]                                # (V, K, T, D)
    trial_cos = (F.normalize(trials, dim=-1) * F.normalize(pooled, dim=-1)[:, None]).sum(-1)
    sims = trial_cos.max(1).values.t()                                                      # (T, V)
    # training step on pairs (text b, video b), b < V
    b = min(t.shape[0], v_n)
    pb = pooled[:b, :b]                                                                     # [video, text]
    radius = log_var[torch.arange(b), torch.arange(b)].exp()                                # (B, D)
    ts = t[:b] + noise_train * radius
    tr = torch.einsum("td,vtd->tv", F.normalize(ts, dim=-1), F.normalize(pb, dim=-1))
    avg = pb.mean(1)
    sup = t[:b] + (avg - t[:b]) / (avg - t[:b]).norm(dim=-1, keepdim=True) * radius
    trs = torch.einsum("td,vtd->tv", F.normalize(sup, dim=-1), F.normalize(pb, dim=-1))

    def clip_loss(s):
        logits = s * clip.logit_scale.exp()
        return (-torch.log_softmax(logits, 1).diag().mean() - torch.log_softmax(logits, 0).diag().mean()) / 2

    return {"text": t, "frames": fr, "pooled": pooled.transpose(0, 1), "log_var": log_var.transpose(0, 1),
            "sims": sims, "loss": clip_loss(tr), "loss_support": clip_loss(trs)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_other_clip_sizes_load_and_match(case, tmp_path):
    c = CASES[case]
    cfg = tiny_clip_config(**c["clip"])
    sd, clip = official_layout_checkpoint(tmp_path / "model_best.pth", cfg, c["frames"])
    model = load_tmass_checkpoint(tmp_path / "model_best.pth", cfg, num_heads=c["heads"])
    assert (model.embed_dim, model.num_frames) == (cfg["projection_dim"], c["frames"])
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, BOS, (3, 9), generator=g)
    ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    ids[0, 5], ids[0, 6:], mask[0, 6:] = EOS, EOS, 0
    ids[1:, -1] = EOS
    size = cfg["vision_config"]["image_size"]
    pixels = torch.randn(4, c["frames"], 3, size, size, generator=g)
    noise = torch.rand(4, 5, 3, cfg["projection_dim"], generator=g)                   # [video, trial, text]
    noise_train = torch.rand(3, cfg["projection_dim"], generator=g)
    with torch.no_grad():
        want = reference(sd, clip.eval(), ids, mask, pixels, noise, noise_train, c["heads"])
        te = model.encode_text(input_ids=ids, attention_mask=mask)
        ve = model.encode_video(pixel_values=pixels)
        got = {"text": te.sentence, "frames": ve.frames, "pooled": model.pooled_video(te, ve),
               "log_var": model.log_radius(te, ve), "sims": model.score(te, ve, noise=noise.permute(2, 0, 1, 3))}
        losses = model.contrastive_losses(te, ve[:3], noise=noise_train)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(losses["loss_nce"], want["loss"], atol=1e-5, rtol=0)
    torch.testing.assert_close(losses["loss_support"], want["loss_support"], atol=1e-5, rtol=0)
