"""Building blocks of the stage-1 retriever (pure torch, no LAVIS import).

* :class:`TextConditionedPooling` -- the X-Pool style cross-attention of T-MASS
  (Wang et al., CVPR 2024): the sentence is the query, frames are keys/values.
* :class:`StochasticText` -- T-MASS's radius ``R = exp(W s + b)`` from the text-frame
  cosine vector ``s`` and the samples ``t + eps * R``.
* :class:`InteractiveSimilarityAggregation` -- UCoFiA's ISA (Wang et al., ICCV 2023), and
  :func:`two_way_isa`, its fine-grained word-item score (frames here, patches in UCoFiA).
* :func:`sinkhorn_log_scaling`, :func:`sinkhorn_normalize`, :func:`sinkhorn_video_bias` --
  Sinkhorn-Knopp normalisation of a (Q, V) similarity matrix.
* :func:`symmetric_infonce` -- CLIP's symmetric cross-entropy with duplicate masking.
* :func:`frame_selection_weights` -- T-MASS's reduction of L clips to at most ``num_frames``
  frames (``uniform`` / ``segment_mean``); :func:`compact_valid` -- valid rows first, cut.
* :func:`l2norm` -- the retrievers' L2 normalisation (:data:`RETRIEVER_L2_EPS`).

Pairs. Scoring always works on a list of P (query, video) pairs. ``grid`` mode is the
Cartesian product of Q queries and V videos (pair ``p = q * V + v``), computed with
``einsum`` over shared tensors; ``pairs`` mode takes explicit, aligned per-pair tensors
(used when each query has its own candidate videos).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.ops.vectors import l2_normalize

NEG_FILL = -1e9  # masked logits (finite, so an all-masked row never yields NaN)
#: eps of the retrievers' L2 normalisation (:func:`l2norm`). T-MASS and UCoFiA (CLIP4Clip) divide by
#: the norm itself (``x / x.norm(dim=-1, keepdim=True)``); the clamp only guards zero vectors (padding
#: frames, masked words), so unit-scale embeddings are divided by exactly their norm. The features'
#: ``x / (||x|| + 1e-5)`` of QD-DETR (:data:`lavis_c2f.ops.vectors.L2_EPS`) would shrink every
#: embedding by ~1e-5 relative and move trained retrievers' scores and the official fixtures' parity.
RETRIEVER_L2_EPS = 1e-8


def identity_init_(linear: nn.Linear, bias: float = 0.0) -> nn.Linear:
    """T-MASS initialisation of every ``linear``/``proj`` layer: weight = identity
    (``nn.init.eye_``: ones on the main diagonal of a possibly non-square matrix), bias = ``bias``."""
    with torch.no_grad():
        nn.init.eye_(linear.weight)
        if linear.bias is not None:
            linear.bias.fill_(bias)
    return linear


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """The retrievers' normalisation along the last axis: the package's one rule
    (:func:`lavis_c2f.ops.vectors.l2_normalize` with ``clamp``), ``x / max(||x||, RETRIEVER_L2_EPS)``."""
    return l2_normalize(x, RETRIEVER_L2_EPS, clamp=True)


def compact_valid(x: torch.Tensor, mask: torch.Tensor, max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Move valid rows first (stable) and keep at most ``max_len``.
    x (B, L, D), mask (B, L) -> (B, L', D), (B, L') with L' = min(max_len, max valid count, >= 1)."""
    valid = mask > 0
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    n = int(valid.sum(1).max().item()) if valid.numel() else 0
    keep = max(1, min(max_len, n))
    order = order[:, :keep]
    xs = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    ms = torch.gather(valid, 1, order).to(x.dtype)
    return xs * ms.unsqueeze(-1), ms


def frame_selection_weights(mask: torch.Tensor, num_frames: int, mode: str = "uniform"
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights that turn L clips into at most ``num_frames`` frames.

    A video with ``n`` valid clips (in the order of their positions) keeps them all when
    ``n <= num_frames``; otherwise frame j covers the clips ``[floor(j n / F), floor((j+1) n / F))``
    and takes their centre clip ``floor((j + 0.5) n / F)`` (``uniform``) or their mean
    (``segment_mean``).

    Args:
        mask: (B, L) 1 = valid clip.
    Returns:
        ``A`` (B, F', L) with ``frames = A @ clips`` and the frame mask (B, F') (valid first),
        ``F' = min(num_frames, max n)`` (at least 1).
    """
    valid = mask > 0
    b, l = valid.shape
    n = valid.sum(1)                                                       # (B,)
    rank = torch.cumsum(valid.long(), 1) - 1                               # compacted index of each clip
    f_out = max(1, min(num_frames, int(n.max().item()) if b else 1))
    j = torch.arange(f_out, device=mask.device).view(1, f_out, 1)          # (1, F', 1)
    nn_ = n.view(b, 1, 1)
    r = rank.view(b, 1, l)
    big = nn_ > num_frames
    if mode == "uniform":
        centre = torch.div((2 * j + 1) * nn_, 2 * num_frames, rounding_mode="floor")
        target = torch.where(big, centre, j)
        sel = (r == target)
    elif mode == "segment_mean":
        start = torch.div(j * nn_, num_frames, rounding_mode="floor")
        end = torch.div((j + 1) * nn_, num_frames, rounding_mode="floor")
        seg = (r >= start) & (r < end)
        sel = torch.where(big, seg, r == j)
    else:
        raise ValueError(f"frame_sampling must be 'uniform' or 'segment_mean', got {mode!r}")
    sel = sel & valid.view(b, 1, l)
    weights = sel.to(torch.float32)
    count = weights.sum(-1, keepdim=True)
    weights = weights / count.clamp_min(1.0)
    return weights, (count.squeeze(-1) > 0).to(torch.float32)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` restricted to ``mask`` (1 = valid); masked entries get 0 and a
    fully masked slice gives all zeros (not NaN). ``mask`` broadcasts against ``logits``."""
    valid = mask > 0
    p = torch.softmax(logits.masked_fill(~valid, NEG_FILL), dim=dim)
    return p * valid.to(p.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` (shape of ``x`` without the last dim) is 1;
    0 where nothing is valid. x: (..., N, D), mask: (..., N) with ``dim`` the N axis."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def model_fingerprint(arch: str, config: Dict[str, Any], state_dict: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """``{"arch", "config_hash", "weights_hash"}``: sha256 of the JSON ``config`` and of every
    tensor's name, dtype, shape and bytes (what a stored video embedding depends on)."""
    ch = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    wh = hashlib.sha256()
    for name, t in sorted(state_dict.items()):
        t = t.detach().cpu().contiguous()
        wh.update(name.encode())
        wh.update(str(t.dtype).encode())
        wh.update(str(tuple(t.shape)).encode())
        wh.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"arch": arch, "config_hash": ch, "weights_hash": wh.hexdigest()}


# ----------------------------------------------------------------------------------------
# pair helpers

def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` along dim 0, or ``x`` itself when ``idx`` is ``0 .. len(x) - 1`` (the pairs of
    one query with each of its candidates: no copy of the (V, F, D) frames)."""
    n = x.shape[0]
    if idx.numel() == n and bool(torch.equal(idx, torch.arange(n, device=idx.device))):
        return x
    return x[idx]


def frame_dots(x: torch.Tensor, frames: torch.Tensor, qi: Optional[torch.Tensor],
               vi: Optional[torch.Tensor]) -> torch.Tensor:
    """Dot products of query-side vectors with every frame of the paired video.

    grid (``qi is None``): x (Q, A, D), frames (V, F, D) -> (Q*V, A, F).
    pairs: x (Q, A, D), frames (V, F, D), qi/vi (P,) -> (P, A, F).
    The grid case is one GEMM over the frames as stored (no copy of the frames).
    """
    if qi is None:
        q, a, d = x.shape
        v, f, _ = frames.shape
        out = frames.reshape(v * f, d) @ x.reshape(q * a, d).t()               # (V*F, Q*A)
        return out.view(v, f, q, a).permute(2, 0, 3, 1).reshape(q * v, a, f)
    return torch.bmm(x[qi], take_rows(frames, vi).transpose(1, 2))


def frame_mix(weights: torch.Tensor, frames: torch.Tensor, num_queries: int,
              vi: Optional[torch.Tensor]) -> torch.Tensor:
    """Weighted sums of frames: weights (P, A, F) over the paired video's frames -> (P, A, D).

    grid (``vi is None``): P = Q*V with ``num_queries`` = Q and frames (V, F, D).
    """
    if vi is None:
        v, f, d = frames.shape
        a = weights.shape[1]
        q = num_queries
        w = weights.reshape(q, v, a, f).permute(1, 0, 2, 3).reshape(v, q * a, f)
        out = torch.bmm(w, frames)                                                  # (V, Q*A, D)
        return out.view(v, q, a, d).permute(1, 0, 2, 3).reshape(q * v, a, d)
    return torch.bmm(weights, take_rows(frames, vi))


def per_head_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (P, H, D) and weight (H, E, D) -> (P, H, E): ``x[:, h] @ weight[h].T`` per head."""
    if x.shape[1] == 1:
        return (x[:, 0] @ weight[0].t()).unsqueeze(1)
    return torch.bmm(x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)


# ----------------------------------------------------------------------------------------
# T-MASS

class TextConditionedPooling(nn.Module):
    """Text-conditioned frame pooling of T-MASS / X-Pool (one cross-attention block).

    For a sentence ``t`` (D,) and frames ``f`` (F, D)::

        t1, f1 = LN1(t), LN1(f)                       # one shared LayerNorm
        a_h    = softmax_F( (Wq_h t1 + bq_h) . (Wk_h f1 + bk_h) / sqrt(D/H) )   per head h
        o      = Wo concat_h( sum_F a_h (Wv_h f1 + bv_h) ) + bo
        o      = LN2(o)
        out    = LN3( o + dropout(Wp o + bp) )        # (D,)

    All linear layers start at the identity with zero bias (the reference's init); dropout
    is the reference's ``transformer_dropout`` (0.3). Padding frames get zero attention; a
    video without valid frames pools to ``LN3(LN2(bo) + ...)`` (finite).

    Efficiency (exactly the same function): the key projection is folded into the query,
    ``q_h . (Wk_h f1 + bk_h) = (Wk_h^T q_h) . f1 + const``, and the constant drops out of the
    softmax; the value projection is applied after pooling,
    ``sum_F a (Wv f1 + bv) = Wv (sum_F a f1) + bv sum_F a``; LN1 of the frames is folded in
    too (see :meth:`pool`). Per pair this costs ``O(H F D + 3 D^2)`` instead of
    ``O(F D^2)``, and the only per-video work is two scalars per frame.
    """

    def __init__(self, embed_dim: int, num_heads: int = 1, dropout: float = 0.3):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = int(embed_dim), int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        d = self.embed_dim
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.linear_proj = nn.Linear(d, d)
        self.layer_norm1, self.layer_norm2, self.layer_norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.linear_proj):
            identity_init_(lin)

    def _fused_value_out(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(Wo Wv, Wo bv)`` for one head, cached until either layer's parameters change
        (tracked through their in-place version counters, so optimiser steps and
        ``load_state_dict`` invalidate it)."""
        params = (self.out_proj.weight, self.v_proj.weight, self.v_proj.bias)
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
        cache = getattr(self, "_fused_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                wo, wv, bv = params
                cache = (key, wo @ wv, wo @ bv)
            self._fused_cache = cache
        return cache[1], cache[2]

    def prepare_text(self, text: torch.Tensor) -> torch.Tensor:
        """text (Q, D) -> folded queries ``g`` (Q, H, D):
        ``gamma1 * Wk_h^T (Wq_h LN1(t) + bq_h) / sqrt(D/H)`` (``gamma1`` = LN1's weight)."""
        q = self.q_proj(self.layer_norm1(text))                      # (Q, D)
        h, dh, d = self.num_heads, self.head_dim, self.embed_dim
        qh = q.view(-1, h, dh)                                        # (Q, H, dh)
        wk = self.k_proj.weight.view(h, dh, d)                        # (H, dh, D)
        return torch.einsum("qhe,hed->qhd", qh, wk) * (self.layer_norm1.weight / math.sqrt(dh))

    def frame_stats(self, frames: torch.Tensor, norms: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """frames (V, F, D) -> LN1 statistics ``(mu, inv_sigma)``, each (V, F), with
        ``LN1(f) = gamma1 * (f - mu) * inv_sigma + beta1`` (biased variance + LayerNorm's eps).
        ``norms`` (V, F) = ``||f||`` when already known (saves a pass)."""
        d = frames.shape[-1]
        mu = frames.mean(-1)
        if norms is None:
            norms = frames.norm(dim=-1)
        mean_sq = norms * norms / d
        var = (mean_sq - mu * mu).clamp_min(0.0)        # one pass; exact enough unless |mu| >> std
        risky = var < 1e-3 * mean_sq
        if bool(risky.any()):                            # cancellation: recompute those frames exactly
            var = torch.where(risky, (frames - mu.unsqueeze(-1)).square().mean(-1), var)
        return mu, torch.rsqrt(var + self.layer_norm1.eps)

    def pool(self, g: torch.Tensor, frames: torch.Tensor, mu: torch.Tensor, inv_sigma: torch.Tensor,
             mask: torch.Tensor, qi: Optional[torch.Tensor] = None, vi: Optional[torch.Tensor] = None,
             dropout: Optional[bool] = None, dots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled video per pair.

        The frames' LayerNorm is never materialised: with ``g`` from :meth:`prepare_text`,
        ``qk . LN1(f) = (g . f - mu * sum(g)) * inv_sigma + const`` (the constant is the same
        for every frame and drops out of the softmax) and
        ``sum_F a LN1(f) = gamma1 * (sum_F (a * inv_sigma) f - sum_F a * inv_sigma * mu) + beta1 * sum_F a``,
        so only the raw frames are read, whatever their storage.

        Args:
            g: (Q, H, D) from :meth:`prepare_text`.
            frames: (V, F, D) raw frame embeddings; mu, inv_sigma: (V, F) from :meth:`frame_stats`.
            mask: (V, F) 1 = valid frame.
            qi, vi: (P,) pair indices, or None for the Q x V grid (P = Q*V, p = q*V + v).
            dropout: apply dropout (default: ``self.training``).
            dots: (P, H, F) ``g . f`` when the caller computed them already.
        Returns:
            (P, D) pooled video embedding for each pair.
        """
        h, dh, d = self.num_heads, self.head_dim, self.embed_dim
        nv = frames.shape[0]
        gamma, beta = self.layer_norm1.weight, self.layer_norm1.bias
        nq = g.shape[0]
        gsum = g.sum(-1)                                              # (Q, H)
        if dots is None:
            dots = frame_dots(g, frames, qi, vi)                      # (P, H, F)
        if qi is None:
            gsum_p = gsum.repeat_interleave(nv, dim=0)
            mu_p, isg_p, m_p = mu.repeat(nq, 1), inv_sigma.repeat(nq, 1), mask.repeat(nq, 1)
        else:
            gsum_p, mu_p, isg_p, m_p = gsum[qi], mu[vi], inv_sigma[vi], mask[vi]
        logits = (dots - mu_p.unsqueeze(1) * gsum_p.unsqueeze(-1)) * isg_p.unsqueeze(1)
        attn = masked_softmax(logits, m_p.unsqueeze(1), dim=-1)       # (P, H, F)
        w = attn * isg_p.unsqueeze(1)
        mixed = frame_mix(w, frames, nq, vi)                          # (P, H, D)
        shift = (w * mu_p.unsqueeze(1)).sum(-1, keepdim=True)         # (P, H, 1)
        mass = attn.sum(-1, keepdim=True)                             # (P, H, 1): 1, or 0 if empty
        ybar = gamma * (mixed - shift) + beta * mass                  # (P, H, D) = sum_F a LN1(f)
        if h == 1 and not torch.is_grad_enabled():
            w_ov, b_v_o = self._fused_value_out()                    # one D x D product instead of two
            o = ybar[:, 0] @ w_ov.t() + mass[:, 0] * b_v_o + self.out_proj.bias
        else:
            wv = self.v_proj.weight.view(h, dh, d)
            o = per_head_linear(ybar, wv) + self.v_proj.bias.view(h, dh) * mass
            o = self.out_proj(o.reshape(-1, d))
        o = self.layer_norm2(o)
        use_dropout = self.training if dropout is None else dropout
        lin = F.dropout(self.linear_proj(o), p=self.dropout.p, training=use_dropout)
        return self.layer_norm3(o + lin)


def radius_bin_index(lengths: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(V,) valid-frame counts -> (V, num_bins) long frame index of each radius bin.

    T-MASS's radius layer maps a fixed ``num_frames`` similarity vector; a video with ``n``
    valid frames is resampled to ``num_bins`` entries by nearest index,
    ``idx_j = floor((j + 0.5) * n / num_bins)`` (the identity when ``n == num_bins``).
    Empty videos get index 0 (their similarities are zeroed by the caller).
    """
    j = torch.arange(num_bins, device=lengths.device, dtype=torch.float64)
    n = lengths.to(torch.float64).clamp_min(1).unsqueeze(1)
    idx = torch.floor((j + 0.5) * n / num_bins).long()
    return torch.minimum(idx, (n.long() - 1).clamp_min(0))


class StochasticText(nn.Module):
    """T-MASS stochastic text embedding.

    ``s`` is the (num_frames,) vector of cosine similarities between the sentence and each
    frame (both L2-normalised; frames resampled by :func:`radius_bin_index`).
    ``log R = W s + b`` with ``W`` (D, num_frames) identity-initialised (reference:
    ``nn.Linear(num_frames, embed_dim)`` with ``eye_`` and zero bias; ``b`` starts at
    ``radius_bias_init``) and ``R = exp(log R)`` (D,). Samples are ``t + eps * R`` with
    ``eps ~ U[0, 1)^D`` (``prior="uniform"``, the reference's ``uniform01``) or
    ``N(0, prior_std^2)^D`` (``prior="normal"``).
    """

    PRIORS = ("uniform", "normal")

    def __init__(self, num_frames: int, embed_dim: int, prior: str = "uniform", prior_std: float = 1.0,
                 radius_bias_init: float = 0.0):
        super().__init__()
        if prior not in self.PRIORS:
            raise ValueError(f"stochastic prior must be one of {self.PRIORS}, got {prior!r}")
        self.num_frames, self.embed_dim = int(num_frames), int(embed_dim)
        self.prior, self.prior_std = prior, float(prior_std)
        self.linear_proj = identity_init_(nn.Linear(self.num_frames, self.embed_dim), bias=radius_bias_init)

    def log_radius(self, sims: torch.Tensor) -> torch.Tensor:
        """sims (..., num_frames) -> log R (..., D)."""
        return self.linear_proj(sims)

    def sample_eps(self, shape: Tuple[int, ...], device=None, dtype=torch.float32,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noise of ``shape`` from the prior (``generator`` for reproducible draws; it must
        live on the same device)."""
        if self.prior == "uniform":
            return torch.rand(shape, device=device, dtype=dtype, generator=generator)
        return torch.randn(shape, device=device, dtype=dtype, generator=generator) * self.prior_std

    def sample_eps_rows(self, n: int, row_shape: Tuple[int, ...], generator: torch.Generator,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(n, *row_shape) CPU noise whose rows concatenate: drawing n1 then n2 rows from a
        generator gives the same rows as drawing n1 + n2 at once (uniform: ``rand``; normal:
        Box-Muller of ``rand`` pairs, as ``randn`` is only consistent for sizes divisible by 16).
        ``out``: a float32 CPU tensor of that shape to fill."""
        if self.prior == "uniform":
            return torch.rand((n,) + tuple(row_shape), generator=generator, out=out)
        u = torch.rand((n, 2) + tuple(row_shape), generator=generator, dtype=torch.float64)
        z = torch.sqrt(-2.0 * torch.log1p(-u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
        z = (z * self.prior_std).float()
        return z if out is None else out.copy_(z)


# ----------------------------------------------------------------------------------------
# UCoFiA

class InteractiveSimilarityAggregation(nn.Module):
    """UCoFiA's Interactive Similarity Aggregation (ISA) of a similarity vector.

    For similarities ``s`` (N,) with validity mask ``m``::

        p   = softmax_m(s / tau)                 # relevance of each item
        w   = softmax_m((p @ W) / tau)           # interaction: W (N, N) mixes relevances
        ISA(s) = sum_i w_i s_i

    ``W`` is learnable and starts at the identity (then ``w`` is a sharpened ``p``);
    ``tau`` is the temperature (UCoFiA uses 0.01). ``softmax_m`` ignores masked items;
    an all-masked vector aggregates to 0; ``mask=None`` uses every item (the official
    UCoFiA code never masks). Vectors shorter than ``size`` use ``W[:N, :N]``.
    """

    def __init__(self, size: int, temperature: float = 0.01):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"ISA temperature must be > 0, got {temperature}")
        self.size, self.temperature = int(size), float(temperature)
        self.weight = nn.Parameter(torch.eye(self.size))

    def forward(self, sims: torch.Tensor, mask: Optional[torch.Tensor] = None, dim: int = -1) -> torch.Tensor:
        """sims (..., N) (``dim=-1``) or (..., N, M) (``dim=-2``, one vector per column),
        mask broadcastable to ``sims`` or None -> ``sims`` without ``dim``."""
        if dim not in (-1, -2):
            raise ValueError(f"ISA aggregates over dim -1 or -2, got {dim}")
        n = sims.shape[dim]
        if n > self.size:
            raise ValueError(f"ISA built for at most {self.size} items, got {n}")
        w_mix = self.weight[:n, :n].to(sims.dtype)

        def mix(p: torch.Tensor) -> torch.Tensor:      # p @ W along ``dim``
            return p @ w_mix if dim == -1 else (p.transpose(-1, -2) @ w_mix).transpose(-1, -2)

        if mask is None:
            p = torch.softmax(sims / self.temperature, dim=dim)
            w = torch.softmax(mix(p) / self.temperature, dim=dim)
            return (w * sims).sum(dim)
        p = masked_softmax(sims / self.temperature, mask, dim=dim)
        w = masked_softmax(mix(p) / self.temperature, mask, dim=dim)
        return (w * sims * (mask > 0).to(sims.dtype)).sum(dim)


def two_way_isa(sims: torch.Tensor, word_mask: Optional[torch.Tensor], item_mask: Optional[torch.Tensor],
                words_per_item: InteractiveSimilarityAggregation,
                items_after_words: InteractiveSimilarityAggregation,
                items_per_word: InteractiveSimilarityAggregation,
                words_after_items: InteractiveSimilarityAggregation) -> torch.Tensor:
    """UCoFiA's fine-grained word-item score (items = frames or selected patches).

    For a (Lw, N) word-item similarity matrix ``x`` of one pair::

        s2i = ISA_items_after_words( ISA_words_per_item(x[:, n]) for each item n )
        i2w = ISA_words_after_items( ISA_items_per_word(x[j, :]) for each word j )
        score = (s2i + i2w) / 2

    Args:
        sims: (..., Lw, N) similarities of any batch of pairs (a strided view is fine).
        word_mask: (..., Lw) or None (every word counts); item_mask: (..., N) or None.
    Returns:
        (...) scores.
    """
    per_item = words_per_item(sims, None if word_mask is None else word_mask.unsqueeze(-1), dim=-2)   # (..., N)
    s2i = items_after_words(per_item, item_mask)
    per_word = items_per_word(sims, None if item_mask is None else item_mask.unsqueeze(-2))         # (..., Lw)
    i2w = words_after_items(per_word, word_mask)
    return (s2i + i2w) / 2.0


def sinkhorn_log_scaling(sims: torch.Tensor, temperature: float = 0.01, iters: int = 4,
                         column_first: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn-Knopp scaling of ``K = exp(sims / temperature)`` in the log domain.

    Finds ``log_r`` (Q,) and ``log_c`` (V,) such that ``P = diag(r) K diag(c)`` has rows
    summing to 1 and columns summing to Q / V (doubly stochastic when Q == V). The
    iteration alternates row then column normalisation ``iters`` times, so columns are
    exact and rows converge (UCoFiA uses 4 iterations). ``column_first`` starts from
    normalised columns (``c = 1 / sum_Q K``) instead of ``c = 1``: the official UCoFiA
    ``sinkhorn_knopp`` (``b = 1 / K.sum(0)``, then 4 x ``a = 1 / (K b)``, ``b = 1 / (a K)``).

    Args:
        sims: (Q, V) similarities.
    Returns:
        ``(log_r (Q,), log_c (V,))``.
    """
    if sims.ndim != 2:
        raise ValueError(f"sinkhorn expects a (Q, V) matrix, got {tuple(sims.shape)}")
    q, v = sims.shape
    k = sims.double() / float(temperature)
    log_col_mass = math.log(q / v)
    log_r = torch.zeros(q, dtype=k.dtype, device=k.device)
    if column_first:
        log_c = log_col_mass - torch.logsumexp(k, dim=0)
    else:
        log_c = torch.zeros(v, dtype=k.dtype, device=k.device)
    for _ in range(max(1, int(iters))):
        log_r = -torch.logsumexp(k + log_c.unsqueeze(0), dim=1)
        log_c = log_col_mass - torch.logsumexp(k + log_r.unsqueeze(1), dim=0)
    return log_r.to(sims.dtype), log_c.to(sims.dtype)


def sinkhorn_normalize(sims: torch.Tensor, temperature: float = 0.01, iters: int = 4) -> torch.Tensor:
    """(Q, V) similarities -> (Q, V) Sinkhorn-normalised probabilities
    ``exp(sims / T + log_r[:, None] + log_c[None, :])`` (see :func:`sinkhorn_log_scaling`)."""
    log_r, log_c = sinkhorn_log_scaling(sims, temperature, iters)
    return torch.exp(sims.double() / temperature + log_r.double().unsqueeze(1)
                     + log_c.double().unsqueeze(0)).to(sims.dtype)


def sinkhorn_video_bias(sims: torch.Tensor, temperature: float = 0.01, iters: int = 4,
                        column_first: bool = False) -> torch.Tensor:
    """(Q, V) similarities of a query bank against videos -> (V,) log column scalings,
    shifted by a log-softmax so they sum (in probability) to one.

    Within one query's ranking the row scaling is a constant, so ranking by
    ``sims / T + bias`` equals ranking by the Sinkhorn-normalised probability. UCoFiA
    computes this bias from training queries against the test videos and adds it to the
    test logits of every level before summing (official: ``temperature`` 1 on logits that
    already carry the CLIP scale, ``column_first``; see :func:`sinkhorn_log_scaling`).
    """
    _, log_c = sinkhorn_log_scaling(sims, temperature, iters, column_first)
    return torch.log_softmax(log_c, dim=0)


# ----------------------------------------------------------------------------------------
# loss

def duplicate_mask(vids) -> Optional[torch.Tensor]:
    """(B, B) bool, True where i != j and ``vids[i] == vids[j]`` (None if no duplicates)."""
    if vids is None:
        return None
    vids = list(vids)
    b = len(vids)
    ids = {}
    codes = torch.tensor([ids.setdefault(v, len(ids)) for v in vids])
    if len(ids) == b:
        return None
    same = codes.unsqueeze(0) == codes.unsqueeze(1)
    return same & ~torch.eye(b, dtype=torch.bool)


def symmetric_infonce(logits: torch.Tensor, dup_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on a (B, B) logit matrix (text = rows, positives on the diagonal).

    ``dup_mask`` (B, B) True marks off-diagonal pairs that are also positives (the same
    video twice in a batch); they are removed from both softmax denominators instead of
    being pushed apart as negatives.
    """
    if dup_mask is not None:
        logits = logits.masked_fill(dup_mask.to(logits.device), NEG_FILL)
    target = torch.arange(logits.shape[0], device=logits.device)
    t2v = F.cross_entropy(logits, target)
    v2t = F.cross_entropy(logits.t(), target)
    return (t2v + v2t) / 2.0
