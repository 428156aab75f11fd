"""Frozen CLIP text tower run at training/inference time (MESM's runtime text encoder).

Weights come from a local directory in Hugging Face layout (``config.json`` +
``pytorch_model.bin``) loaded with ``transformers.CLIPTextModel``; nothing is downloaded.
Token ids come from the CLIP BPE bundled with LAVIS (:class:`.vocab.ClipTokenizer`), which
matches OpenAI CLIP ids. As in MESM, a query keeps at most ``max_words_l`` tokens
(start + words + end), the per-token ``last_hidden_state`` rows are the word features
(padding rows zeroed) and they are L2-normalised.

Token-level masking (FW-MESM): :meth:`RuntimeTextEncoder.encode` can replace the token
embeddings of chosen positions by learned vectors (a mask and an "unknown" embedding)
before the tower runs, so the contextual features of the other words do not see the
masked word.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.models.grounder.vocab import get_tokenizer

REPLACE_NONE, REPLACE_MASK, REPLACE_UNKNOWN = 0, 1, 2


class RuntimeTextEncoder(nn.Module):
    """Frozen ``CLIPTextModel`` + CLIP BPE tokenizer.

    Args:
        model_dir: directory with a saved ``CLIPTextModel`` (or full ``CLIPModel``; its text
            tower is used).
        max_words_l: maximum tokens per query incl. start/end (MESM 32).
        normalize: L2-normalise the word features (MESM ``normalize_txt``).
    """

    def __init__(self, model_dir: str, max_words_l: int = 32, normalize: bool = True):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"text encoder directory not found: {model_dir}")
        config = CLIPTextConfig.from_pretrained(model_dir)
        self.model = CLIPTextModel.from_pretrained(model_dir, config=config)
        if max_words_l > config.max_position_embeddings:
            raise ValueError(f"max_words_l {max_words_l} exceeds the tower's "
                             f"{config.max_position_embeddings} positions")
        self.model_dir = model_dir
        self.max_words_l = max_words_l
        self.normalize = normalize
        self.hidden_size = int(config.hidden_size)
        self.tokenizer = get_tokenizer("clip")
        if config.vocab_size <= max(self.tokenizer.start_token, self.tokenizer.end_token):
            raise ValueError(f"the tower's vocab_size {config.vocab_size} is too small for CLIP "
                             "BPE ids (needs 49408)")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "RuntimeTextEncoder":
        """The tower stays in eval mode (frozen, no dropout) whatever the parent's mode."""
        super().train(mode)
        self.model.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor, List[List[int]]]:
        """Texts -> ids (B, L) long (0-padded), mask (B, L) float (1 = valid), token lists."""
        if len(texts) == 0:
            raise ValueError("no texts to tokenize")
        tokens = [self.tokenizer.tokenize(t, self.max_words_l) for t in texts]
        length = max(len(t) for t in tokens)
        ids = torch.zeros(len(tokens), length, dtype=torch.long)
        mask = torch.zeros(len(tokens), length)
        for i, t in enumerate(tokens):
            ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, :len(t)] = 1.0
        return ids, mask, tokens

    @contextlib.contextmanager
    def _replaced_embeddings(self, codes: torch.Tensor, mask_embed: Optional[torch.Tensor],
                             unknown_embed: Optional[torch.Tensor]):
        def hook(_module, _inputs, output):
            out = output
            if mask_embed is not None:
                out = torch.where((codes == REPLACE_MASK)[..., None], mask_embed.to(out.dtype), out)
            if unknown_embed is not None:
                out = torch.where((codes == REPLACE_UNKNOWN)[..., None],
                                  unknown_embed.to(out.dtype), out)
            return out

        handle = self.model.text_model.embeddings.token_embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, ids: torch.Tensor, mask: torch.Tensor,
               replace_codes: Optional[torch.Tensor] = None,
               mask_embed: Optional[torch.Tensor] = None,
               unknown_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Word features.

        Args:
            ids: (B, L) token ids; mask: (B, L) 1 = valid.
            replace_codes: optional (B, L) long, 1 = use ``mask_embed``, 2 = use
                ``unknown_embed`` as that position's token embedding.
            mask_embed / unknown_embed: (H,) learned embeddings (gradients flow to them).
        Returns:
            (B, L, H) float32 features, zero at padding, L2-normalised when ``normalize``.
        """
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        attn = mask.long()
        if replace_codes is None:
            with torch.no_grad():
                hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state
        else:
            with self._replaced_embeddings(replace_codes.to(device), mask_embed, unknown_embed):
                hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state
        feats = hidden.float() * mask[..., None]
        if self.normalize:
            feats = F.normalize(feats, dim=-1, p=2, eps=1e-5)
        return feats
