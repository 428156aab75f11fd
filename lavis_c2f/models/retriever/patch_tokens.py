"""Patch-token operations of TS2-Net (Liu et al., ECCV 2022) as UCoFiA uses them (pure torch).

* :func:`patch_shift` / :class:`PatchShiftHook` -- tokens exchanged with the neighbouring
  frames of a video before the attention of chosen ViT blocks;
* :func:`perturbed_topk` -- differentiable top-k indicators (Berthet et al., 2020);
* :class:`PatchSelector` -- UCoFiA's patch scorer and perturbed top-k selection per frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------
# perturbed top-k (Berthet et al. 2020, as TS2-Net / UCoFiA use it)

class _PerturbedTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        n, s, d = noise.shape
        idx = torch.topk(scores.unsqueeze(1) + noise * sigma, k=k, dim=-1, sorted=False).indices
        idx = torch.sort(idx, dim=-1).values                                         # (N, S, k)
        ind = torch.zeros(n, k, d, dtype=scores.dtype, device=scores.device)
        ind.scatter_add_(2, idx.transpose(1, 2), torch.ones(n, k, s, dtype=scores.dtype, device=scores.device))
        ctx.save_for_backward(idx, noise)
        ctx.sigma = float(sigma)
        return ind / s

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        idx, noise = ctx.saved_tensors
        n, s, d = noise.shape
        picked = noise.gather(2, idx).to(grad_out.dtype)                              # (N, S, k)
        expected = torch.zeros(n, idx.shape[2], d, dtype=grad_out.dtype, device=grad_out.device)
        expected.scatter_add_(2, idx.transpose(1, 2), picked.transpose(1, 2))
        expected = expected / s / ctx.sigma
        return (grad_out * expected).sum(1), None, None, None


def perturbed_topk(scores: torch.Tensor, k: int, noise: torch.Tensor, sigma: float = 0.05) -> torch.Tensor:
    """Differentiable top-k indicators (Berthet et al., "Learning with Differentiable
    Perturbed Optimizers", 2020).

    ``ind[b, j] = mean_n onehot(sort(topk(scores[b] + sigma noise[b, n]))[j])``; the gradient
    is ``d ind[b, j] / d scores[b] ~= mean_n onehot(...)[j] noise[b, n]^T / sigma``.

    Args:
        scores: (N, D); noise: (N, S, D) standard normal draws.
    Returns:
        (N, k, D) soft indicators (each row sums to 1).
    """
    if noise.shape[0] != scores.shape[0] or noise.shape[2] != scores.shape[1]:
        raise ValueError(f"topk noise must be ({scores.shape[0]}, samples, {scores.shape[1]}), "
                         f"got {tuple(noise.shape)}")
    return _PerturbedTopK.apply(scores, int(k), noise.to(scores.dtype), float(sigma))


class PatchSelector(nn.Module):
    """UCoFiA's patch scorer (TS2-Net's ``PredictorLG``) and perturbed top-k selection.

    For frame tokens ``x`` (N = V F, T, E) with CLS first::

        h     = GELU(in_proj(norm([x_i, x_cls])))                  # (N, T, E)
        g     = sum over the video's F frames of h_cls              # (V, E)
        score = tanh(score(GELU(hidden([h_i, g]))))                 # (N, T)
        out   = [x_cls, perturbed_topk(score[1:], k) @ x[1:]]        # (N, 1 + k, E)

    The linears have no biases (official).
    """

    def __init__(self, embed_dim: int, topk: int = 3, samples: int = 500, sigma: float = 0.05):
        super().__init__()
        e = int(embed_dim)
        self.topk, self.samples, self.sigma = int(topk), int(samples), float(sigma)
        self.norm = nn.LayerNorm(2 * e)
        self.in_proj = nn.Linear(2 * e, e, bias=False)
        self.hidden = nn.Linear(2 * e, e, bias=False)
        self.score = nn.Linear(e, 1, bias=False)

    def scores(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x (V F, T, E) -> (V F, T) token scores."""
        n, t, e = x.shape
        h = F.gelu(self.in_proj(self.norm(torch.cat([x, x[:, :1].expand(n, t, e)], dim=-1))))
        g = h[:, 0].reshape(-1, num_frames, e).sum(1).repeat_interleave(num_frames, dim=0)    # (N, E)
        return torch.tanh(self.score(F.gelu(self.hidden(torch.cat([h, g.unsqueeze(1).expand(n, t, e)], -1)))))[..., 0]

    def forward(self, x: torch.Tensor, num_frames: int, noise: torch.Tensor) -> torch.Tensor:
        """x (V F, T, E), noise (V F, samples, T - 1) -> (V F, 1 + k, E)."""
        ind = perturbed_topk(self.scores(x, num_frames)[:, 1:], self.topk, noise, self.sigma)
        return torch.cat([x[:, :1], torch.einsum("nkt,nte->nke", ind, x[:, 1:])], dim=1)


# ----------------------------------------------------------------------------------------
# patch shift (TS2-Net) in the vision tower

def patch_shift(x: torch.Tensor, num_frames: int, fold_div: int = 7, offset: int = 3) -> torch.Tensor:
    """Token shift across the frames of each video (TS2-Net's "left and right shift").

    x (V F, T, W): with ``fold = T // fold_div``, tokens ``1, 1 + fold, ...`` take the previous
    frame's value and tokens ``1 + offset, 1 + offset + fold, ...`` the next frame's (the
    first/last frame keep theirs). Returns a new tensor.
    """
    n, t, w = x.shape
    fold = t // int(fold_div)
    if fold < 1:
        raise ValueError(f"patch shift needs at least {fold_div} tokens per frame, got {t}")
    if n % num_frames:
        raise ValueError(f"{n} frames are not a whole number of {num_frames}-frame videos")
    x4 = x.reshape(-1, num_frames, t, w)
    out = x4.clone()
    left = torch.arange(1, t, fold, device=x.device)
    right = torch.arange(1 + int(offset), t, fold, device=x.device)
    out[:, 1:, left] = x4[:, :-1, left]
    out[:, :-1, right] = x4[:, 1:, right]
    return out.reshape(n, t, w)


class PatchShiftHook:
    """Forward pre-hook of a ``CLIPAttention``: shifts its input (``hidden_states``) across
    frames, so the residual branch keeps the unshifted tokens (as the official
    ``PatchShiftModule`` wrapping ``attn``)."""

    def __init__(self, num_frames: int, fold_div: int, offset: int):
        self.num_frames, self.fold_div, self.offset = int(num_frames), int(fold_div), int(offset)

    def __call__(self, module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": patch_shift(kwargs["hidden_states"], self.num_frames,
                                                             self.fold_div, self.offset)}
        else:
            args = (patch_shift(args[0], self.num_frames, self.fold_div, self.offset),) + tuple(args[1:])
        return args, kwargs
