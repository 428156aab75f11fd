"""Frozen CLIP text tower run at training/inference time (MESM's runtime text encoder).

Weights come from a local file or folder; nothing is downloaded:

* ``checkpoint``: an OpenAI-layout text tower, as MESM's ``clip_text_encoder.pth``
  (``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.N.*``,
  ``ln_final.*``, ``text_projection``; sizes are read from the tensors as MESM's
  ``build_CLIP_text_encoder`` reads them, heads = width / 64). :class:`OpenAIClipTextTower`
  runs it (causal attention, QuickGELU); the fp16 weights MESM ships are run in float32.
* ``model_dir``: a Hugging Face ``CLIPTextModel`` (or ``CLIPModel``) folder.

Token ids come from the CLIP BPE bundled with LAVIS (:class:`.vocab.ClipTokenizer`), which
matches OpenAI CLIP ids. As in MESM, a query keeps at most ``max_words_l`` tokens
(start + words + end), the per-token ``last_hidden_state`` rows (after ``ln_final``) are the
word features (padding rows zeroed) and they are L2-normalised (``F.normalize``, eps 1e-5).
The towers are causal, so a row does not depend on the padding after it.

Token-level masking (FW-MESM's ``fw_mask_level: tokens`` variant):
:meth:`RuntimeTextEncoder.encode` can replace the token embeddings of chosen positions by
learned vectors (a mask and an "unknown" embedding) before the tower runs, so the
contextual features of the other words do not see the masked word. MESM itself replaces the
tower's output rows instead (``fw_mask_level: features``, done by the model).
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lavis_c2f.models.checkpoint import load_state_strict, torch_load
from lavis_c2f.models.grounder.vocab import get_tokenizer

REPLACE_NONE, REPLACE_MASK, REPLACE_UNKNOWN = 0, 1, 2


def _replace(emb: torch.Tensor, codes: Optional[torch.Tensor], mask_embed: Optional[torch.Tensor],
             unknown_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """Token embeddings (B, L, W) with the rows of ``codes`` replaced (see module doc)."""
    if codes is None:
        return emb
    if mask_embed is not None:
        emb = torch.where((codes == REPLACE_MASK)[..., None], mask_embed.to(emb.dtype), emb)
    if unknown_embed is not None:
        emb = torch.where((codes == REPLACE_UNKNOWN)[..., None], unknown_embed.to(emb.dtype), emb)
    return emb


class OpenAIClipTextTower(nn.Module):
    """The text half of OpenAI CLIP with its parameter names (MESM's ``CLIPTextEncoder``).

    ``x = token_embedding(ids) + positional_embedding[:L]``; causal pre-norm residual
    attention blocks (QuickGELU MLP); ``last_hidden_state = ln_final(x)`` (B, L, width).

    Args:
        vocab_size, context_length, width, heads, layers, embed_dim: sizes (ViT-B/32:
            49408, 77, 512, 8, 12, 512).
    """

    def __init__(self, *, vocab_size: int, context_length: int, width: int, heads: int,
                 layers: int, embed_dim: int):
        super().__init__()
        from lavis.models.clip_models.model import QuickGELU, Transformer

        self.context_length, self.width = int(context_length), int(width)
        self.transformer = Transformer(width, layers, heads, act_layer=QuickGELU)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))

    @staticmethod
    def sizes_from_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, int]:
        """Constructor sizes read from an OpenAI-layout text state dict."""
        width = int(state["ln_final.weight"].shape[0])
        layers = {k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}
        return dict(vocab_size=int(state["token_embedding.weight"].shape[0]),
                    context_length=int(state["positional_embedding"].shape[0]), width=width,
                    heads=max(width // 64, 1), layers=len(layers),
                    embed_dim=int(state["text_projection"].shape[1]))

    @classmethod
    def from_file(cls, path: str) -> "OpenAIClipTextTower":
        """Load ``clip_text_encoder.pth`` (a bare state dict; extra ``input_resolution`` /
        ``context_length`` / ``vocab_size`` entries are ignored as MESM ignores them)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP text tower checkpoint not found: {path}")
        state = torch_load(path)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or "ln_final.weight" not in state:
            raise ValueError(f"{path}: not an OpenAI-layout CLIP text state dict (no "
                             "'ln_final.weight')")
        state = {k: v for k, v in state.items()
                 if k not in ("input_resolution", "context_length", "vocab_size")}
        try:
            tower = cls(**cls.sizes_from_state_dict(state))
        except KeyError as err:
            raise ValueError(f"{path}: missing {err} in the CLIP text state dict") from None
        load_state_strict(tower, {k: v.float() for k, v in state.items()}, source=path)
        return tower

    def forward(self, ids: torch.Tensor, replace_codes: Optional[torch.Tensor] = None,
                mask_embed: Optional[torch.Tensor] = None,
                unknown_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ids (B, L) with L <= context_length -> last_hidden_state (B, L, width)."""
        length = ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the tower's {self.context_length} positions")
        x = _replace(self.token_embedding(ids), replace_codes, mask_embed, unknown_embed)
        x = x + self.positional_embedding[:length]
        causal = torch.full((length, length), float("-inf"), device=ids.device).triu_(1)
        x = self.transformer(x.permute(1, 0, 2), attn_mask=causal.to(x.dtype)).permute(1, 0, 2)
        return self.ln_final(x)


class RuntimeTextEncoder(nn.Module):
    """Frozen CLIP text tower + CLIP BPE tokenizer.

    Args:
        model_dir: directory with a saved Hugging Face ``CLIPTextModel`` (or full
            ``CLIPModel``; its text tower is used).
        checkpoint: instead, an OpenAI-layout text tower file (MESM's ``clip_text_encoder.pth``).
        max_words_l: maximum tokens per query incl. start/end (MESM 32).
        normalize: L2-normalise the word features (MESM ``normalize_txt``).
    """

    def __init__(self, model_dir: Optional[str] = None, max_words_l: int = 32,
                 normalize: bool = True, checkpoint: Optional[str] = None):
        super().__init__()
        if (model_dir is None) == (checkpoint is None):
            raise ValueError("give exactly one of checkpoint (an OpenAI-layout "
                             "clip_text_encoder.pth) and model_dir (a Hugging Face folder)")
        if checkpoint is not None:
            self.model = OpenAIClipTextTower.from_file(checkpoint)
            positions, vocab, hidden = (self.model.context_length,
                                        self.model.token_embedding.num_embeddings, self.model.width)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel

            if not os.path.isdir(model_dir):
                raise FileNotFoundError(f"text encoder directory not found: {model_dir}")
            config = CLIPTextConfig.from_pretrained(model_dir)
            self.model = CLIPTextModel.from_pretrained(model_dir, config=config)
            positions, vocab, hidden = (config.max_position_embeddings, config.vocab_size,
                                        config.hidden_size)
        if max_words_l > positions:
            raise ValueError(f"max_words_l {max_words_l} exceeds the tower's {positions} positions")
        self.model_dir, self.checkpoint = model_dir, checkpoint
        self.max_words_l = max_words_l
        self.normalize = normalize
        self.hidden_size = int(hidden)
        self.tokenizer = get_tokenizer("clip")
        if vocab <= max(self.tokenizer.start_token, self.tokenizer.end_token):
            raise ValueError(f"the tower's vocab_size {vocab} is too small for CLIP "
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
            return _replace(output, codes, mask_embed, unknown_embed)

        handle = self.model.text_model.embeddings.token_embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _hidden(self, ids: torch.Tensor, attn: torch.Tensor,
                replace_codes: Optional[torch.Tensor], mask_embed: Optional[torch.Tensor],
                unknown_embed: Optional[torch.Tensor]) -> torch.Tensor:
        if isinstance(self.model, OpenAIClipTextTower):
            return self.model(ids, replace_codes, mask_embed, unknown_embed)
        if replace_codes is None:
            return self.model(input_ids=ids, attention_mask=attn).last_hidden_state
        with self._replaced_embeddings(replace_codes, mask_embed, unknown_embed):
            return self.model(input_ids=ids, attention_mask=attn).last_hidden_state

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
                hidden = self._hidden(ids, attn, None, None, None)
        else:
            hidden = self._hidden(ids, attn, replace_codes.to(device), mask_embed, unknown_embed)
        feats = hidden.float() * mask[..., None]
        if self.normalize:
            feats = F.normalize(feats, dim=-1, p=2, eps=1e-5)
        return feats
