"""Fixtures of the grounder tests (helpers live in grounder_helpers.py)."""
from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from grounder_helpers import TXT_DIM, make_batch


@pytest.fixture()
def batch() -> Dict[str, Any]:
    """Three samples of different lengths; the second has two windows."""
    return make_batch([10, 7, 12], [5, 3, 6],
                      [[[4.0, 10.0]], [[0.0, 4.0], [8.0, 12.0]], [[10.0, 20.0]]])


@pytest.fixture()
def counts_file(tmp_path) -> str:
    """A whitespace token-counts file covering the synthetic queries."""
    from collections import Counter

    from lavis_c2f.models.grounder.vocab import write_counts

    counts = Counter({"a": 9, "person": 7, "opens": 5, "the": 11, "door": 3, "number": 2})
    path = str(tmp_path / "counts.json")
    write_counts(counts, 10, "whitespace", path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    """A tiny random CLIP text tower saved in Hugging Face layout."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=TXT_DIM, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=40,
                         projection_dim=TXT_DIM)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPTextModel(cfg).save_pretrained(str(path))
    return str(path)


@pytest.fixture()
def single_thread():
    """Run tiny-model loops on one thread (much faster than 2 threads for tiny ops on a busy
    CPU); the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
