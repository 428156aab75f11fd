"""The training-free stage-1 baseline the retrieval task reports beside the model: the cosine of
the sentence with the mean of the L2-normalised frames (CLIP4Clip's "meanP" without fine-tuning)."""
from __future__ import annotations

from typing import Optional

import torch

from lavis_c2f.models.retriever.embeddings import TextEmbedding, VideoEmbedding
from lavis_c2f.models.retriever.modules import l2norm, masked_mean


class MeanPoolingBaseline:
    """Training-free baseline: cosine between the sentence and the mean of the L2-normalised
    frames (CLIP4Clip's "meanP" without fine-tuning). Works on raw features (text and video
    widths must match) or on any :class:`TextEmbedding`/:class:`VideoEmbedding`."""

    def encode_text(self, src_txt: Optional[torch.Tensor] = None, src_txt_mask: Optional[torch.Tensor] = None,
                    txt_pooled: Optional[torch.Tensor] = None) -> TextEmbedding:
        """txt_pooled (B, D) or the masked token mean of src_txt (B, Lt, D) -> TextEmbedding."""
        if txt_pooled is None:
            if src_txt is None:
                raise ValueError("MeanPoolingBaseline.encode_text needs txt_pooled or src_txt")
            m = torch.ones(src_txt.shape[:2]) if src_txt_mask is None else src_txt_mask
            txt_pooled = masked_mean(src_txt.float(), m.float(), dim=1)
        return TextEmbedding(txt_pooled.float())

    def encode_video(self, src_vid: torch.Tensor, src_vid_mask: Optional[torch.Tensor] = None) -> VideoEmbedding:
        """src_vid (B, Lv, D) -> VideoEmbedding with every clip as a frame."""
        m = torch.ones(src_vid.shape[:2]) if src_vid_mask is None else src_vid_mask.float()
        frames = src_vid.float() * m.unsqueeze(-1)
        pooled = l2norm(masked_mean(l2norm(frames), m, dim=1))
        return VideoEmbedding(frames, m, pooled)

    def score(self, text_emb: TextEmbedding, video_emb: VideoEmbedding, block_size: int = 65536) -> torch.Tensor:
        """(Q, V) cosine of the normalised sentence with the pooled video."""
        if text_emb.dim != video_emb.dim:
            raise ValueError(f"text width {text_emb.dim} != video width {video_emb.dim}")
        q = l2norm(text_emb.sentence.float())
        v = l2norm(video_emb.pooled.float())
        if len(v) == 0:
            return torch.empty(len(q), 0)
        return torch.cat([q @ v[i:i + block_size].t() for i in range(0, len(v), block_size)], dim=1)


__all__ = ["MeanPoolingBaseline"]
