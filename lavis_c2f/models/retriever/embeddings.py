"""Containers for encoded queries and videos of the stage-1 retriever.

These are plain dataclasses of tensors (no LAVIS import), so the corpus index can hold and
rebuild them from memory-mapped arrays. Shapes follow docs/ARCHITECTURE.md: Q queries,
V videos, F frames (clips after frame selection), Lw tokens, D the joint embedding width.
Masks are float with 1 = valid; valid frames/tokens always form a prefix (the encoders
compact them), so ``mask.sum(-1)`` is the per-row length.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Sequence, Union

import torch

from lavis_c2f.models.retriever.modules import l2norm, masked_mean

Index = Union[int, slice, Sequence[int], torch.Tensor]


def _as_index(idx: Index, n: int) -> Union[slice, torch.Tensor]:
    if isinstance(idx, slice):
        return idx
    if isinstance(idx, int):
        if idx < -n or idx >= n:
            raise IndexError(f"index {idx} out of range for {n} rows")
        return slice(idx, idx + 1 if idx != -1 else None)
    t = torch.as_tensor(idx, dtype=torch.long)
    if t.ndim != 1:
        raise IndexError(f"expected a 1-D index, got shape {tuple(t.shape)}")
    return t


@dataclass
class TextEmbedding:
    """Encoded queries.

    Attributes:
        sentence: (Q, D) sentence embedding in the joint space (not normalised; T-MASS
            samples around it and the radius/ISA code normalises where the paper does).
        tokens: (Q, Lw, D) token embeddings (projected like the sentence), or None when
            no token features were given (the frame-word level then cannot be used).
        token_mask: (Q, Lw) float, 1 = valid token; None iff ``tokens`` is None.
    """

    sentence: torch.Tensor
    tokens: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.sentence.ndim != 2:
            raise ValueError(f"TextEmbedding.sentence must be (Q, D), got {tuple(self.sentence.shape)}")
        if (self.tokens is None) != (self.token_mask is None):
            raise ValueError("TextEmbedding: tokens and token_mask must be given together")
        if self.tokens is not None:
            q, d = self.sentence.shape
            if self.tokens.ndim != 3 or self.tokens.shape[0] != q or self.tokens.shape[2] != d:
                raise ValueError(f"TextEmbedding.tokens must be (Q={q}, Lw, D={d}), got "
                                 f"{tuple(self.tokens.shape)}")
            if tuple(self.token_mask.shape) != tuple(self.tokens.shape[:2]):
                raise ValueError(f"TextEmbedding.token_mask must be {tuple(self.tokens.shape[:2])}, got "
                                 f"{tuple(self.token_mask.shape)}")

    def __len__(self) -> int:
        return int(self.sentence.shape[0])

    @property
    def dim(self) -> int:
        return int(self.sentence.shape[1])

    def __getitem__(self, idx: Index) -> "TextEmbedding":
        i = _as_index(idx, len(self))
        return TextEmbedding(self.sentence[i],
                             None if self.tokens is None else self.tokens[i],
                             None if self.token_mask is None else self.token_mask[i])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TextEmbedding":
        def mv(x, is_mask=False):
            if x is None:
                return None
            return x.to(device=device) if (dtype is None or is_mask) else x.to(device=device, dtype=dtype)
        return TextEmbedding(mv(self.sentence), mv(self.tokens), mv(self.token_mask, True))

    def detach(self) -> "TextEmbedding":
        return TextEmbedding(self.sentence.detach(),
                             None if self.tokens is None else self.tokens.detach(),
                             None if self.token_mask is None else self.token_mask.detach())

    @staticmethod
    def cat(items: Sequence["TextEmbedding"]) -> "TextEmbedding":
        """Concatenate along Q; token tensors are right-padded to the longest Lw."""
        if not items:
            raise ValueError("TextEmbedding.cat of nothing")
        sent = torch.cat([it.sentence for it in items])
        if any(it.tokens is None for it in items):
            return TextEmbedding(sent)
        lw = max(it.tokens.shape[1] for it in items)
        toks, masks = [], []
        for it in items:
            pad = lw - it.tokens.shape[1]
            toks.append(torch.nn.functional.pad(it.tokens, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(it.token_mask, (0, pad)))
        return TextEmbedding(sent, torch.cat(toks), torch.cat(masks))


@dataclass
class VideoEmbedding:
    """Encoded videos.

    Attributes:
        frames: (V, F, D) frame embeddings in the joint space (F <= the model's
            ``num_frames``; valid frames first).
        mask: (V, F) float, 1 = valid frame. A row of zeros is an empty video; it scores
            finite values (never NaN).
        pooled: (V, D) float32, L2-normalised, query-independent vector used by the ANN
            pre-filter (mean of the L2-normalised valid frames, normalised again; zeros for
            an empty video). ``None`` at construction: computed from the frames by that rule
            on first access (the corpus index's re-ranking reads frames it never pools).
    """

    frames: torch.Tensor
    mask: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.frames.ndim != 3:
            raise ValueError(f"VideoEmbedding.frames must be (V, F, D), got {tuple(self.frames.shape)}")
        v, f, d = self.frames.shape
        if tuple(self.mask.shape) != (v, f):
            raise ValueError(f"VideoEmbedding.mask must be ({v}, {f}), got {tuple(self.mask.shape)}")
        if self._pooled is not None and tuple(self._pooled.shape) != (v, d):
            raise ValueError(f"VideoEmbedding.pooled must be ({v}, {d}), got {tuple(self._pooled.shape)}")

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def dim(self) -> int:
        return int(self.frames.shape[2])

    @property
    def lengths(self) -> torch.Tensor:
        """(V,) long number of valid frames."""
        return self.mask.sum(-1).round().long()

    def __getitem__(self, idx: Index) -> "VideoEmbedding":
        i = _as_index(idx, len(self))
        return VideoEmbedding(self.frames[i], self.mask[i], self._pooled_as(lambda p: p[i]))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "VideoEmbedding":
        frames = self.frames.to(device=device) if dtype is None else self.frames.to(device=device, dtype=dtype)
        return VideoEmbedding(frames, self.mask.to(device=device), self._pooled_as(lambda p: p.to(device=device)))

    def detach(self) -> "VideoEmbedding":
        return VideoEmbedding(self.frames.detach(), self.mask.detach(), self._pooled_as(lambda p: p.detach()))

    def _pooled_as(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Optional[torch.Tensor]:
        """``fn`` of the pooled vectors when they were computed (or given), else None (a derived
        embedding pools its own frames on first access)."""
        return None if self._pooled is None else fn(self._pooled)

    @staticmethod
    def cat(items: Sequence["VideoEmbedding"]) -> "VideoEmbedding":
        """Concatenate along V; frame tensors are right-padded to the longest F."""
        if not items:
            raise ValueError("VideoEmbedding.cat of nothing")
        f = max(it.frames.shape[1] for it in items)
        frames: List[torch.Tensor] = []
        masks: List[torch.Tensor] = []
        for it in items:
            pad = f - it.frames.shape[1]
            frames.append(torch.nn.functional.pad(it.frames, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(it.mask, (0, pad)))
        return VideoEmbedding(torch.cat(frames), torch.cat(masks), torch.cat([it.pooled for it in items]))


def _get_pooled(self: VideoEmbedding) -> torch.Tensor:
    if self._pooled is None:
        self._pooled = l2norm(masked_mean(l2norm(self.frames.detach().float()), self.mask, dim=1))
    return self._pooled


def _set_pooled(self: VideoEmbedding, value: Optional[torch.Tensor]) -> None:
    self._pooled = value


VideoEmbedding.pooled = property(_get_pooled, _set_pooled)  # type: ignore[assignment]


class _Rows:
    """Row-wise ops for dataclasses whose tensor fields all share their first dimension."""

    def __len__(self) -> int:
        return int(getattr(self, fields(self)[0].name).shape[0])

    def _map(self, fn) -> "_Rows":
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def __getitem__(self, idx: Index):
        i = _as_index(idx, len(self))
        return self._map(lambda t: t[i])

    def to(self, device=None, dtype: Optional[torch.dtype] = None):
        """Move every field; ``dtype`` converts the floating-point fields except masks."""
        def mv(name: str, t: torch.Tensor) -> torch.Tensor:
            if dtype is None or name == "mask" or not t.is_floating_point():
                return t.to(device=device)
            return t.to(device=device, dtype=dtype)
        return type(self)(**{f.name: mv(f.name, getattr(self, f.name)) for f in fields(self)})

    def detach(self):
        return self._map(lambda t: t.detach())

    @classmethod
    def cat(cls, items: Sequence["_Rows"]):
        """Concatenate along the first dimension (the other sizes must agree)."""
        if not items:
            raise ValueError(f"{cls.__name__}.cat of nothing")
        return cls(**{f.name: torch.cat([getattr(it, f.name) for it in items]) for f in fields(cls)})


@dataclass
class UCoFiAText(_Rows):
    """Queries encoded by UCoFiA (:class:`~lavis_c2f.models.retriever.ucofia.C2FUCoFiA`).

    Attributes:
        sentence: (T, E) the EOT row of the projected text tower output (not normalised).
        words: (T, L, E) every projected row, SOT, EOT and padding included (official UCoFiA).
        mask: (T, L) float, 1 = a real token (the attention mask; used only when the model
            masks padded words).
    """

    sentence: torch.Tensor
    words: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.words.ndim != 3 or tuple(self.sentence.shape) != (self.words.shape[0], self.words.shape[2]):
            raise ValueError(f"UCoFiAText: sentence (T, E) and words (T, L, E) expected, got "
                             f"{tuple(self.sentence.shape)} and {tuple(self.words.shape)}")
        t, l = self.words.shape[:2]
        if tuple(self.mask.shape) != (t, l):
            raise ValueError(f"UCoFiAText.mask must be ({t}, {l}), got {tuple(self.mask.shape)}")

    @property
    def dim(self) -> int:
        return int(self.sentence.shape[1])


@dataclass
class UCoFiAVideo(_Rows):
    """Videos encoded by UCoFiA. Everything a score needs is here and query-independent.

    Attributes:
        frames: (V, F, E) projected CLS row of every frame **before** the temporal encoder,
            padded frames included (official: the frame level uses all ``max_frames``).
        mask: (V, F) float, 1 = a real frame.
        patches: (V, F*(1+k), E) per frame ``[CLS, k selected patches]``, not normalised.
        video: (V, E) L2-normalised video feature (temporal encoder, mean over real frames).
    """

    frames: torch.Tensor
    mask: torch.Tensor
    patches: torch.Tensor
    video: torch.Tensor

    def __post_init__(self) -> None:
        if self.frames.ndim != 3:
            raise ValueError(f"UCoFiAVideo.frames must be (V, F, E), got {tuple(self.frames.shape)}")
        v, f, e = self.frames.shape
        if tuple(self.mask.shape) != (v, f):
            raise ValueError(f"UCoFiAVideo.mask must be ({v}, {f}), got {tuple(self.mask.shape)}")
        if self.patches.ndim != 3 or self.patches.shape[0] != v or self.patches.shape[2] != e \
                or self.patches.shape[1] % max(f, 1):
            raise ValueError(f"UCoFiAVideo.patches must be ({v}, a multiple of {f}, {e}), got "
                             f"{tuple(self.patches.shape)}")
        if tuple(self.video.shape) != (v, e):
            raise ValueError(f"UCoFiAVideo.video must be ({v}, {e}), got {tuple(self.video.shape)}")

    @property
    def dim(self) -> int:
        return int(self.frames.shape[2])
