"""Shared fixtures of the refiner tests: tiny offline assets (made once per session)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    from lavis_c2f.testing.tiny_refiner import make_tiny_assets

    root = str(tmp_path_factory.mktemp("tiny_refiner"))
    make_tiny_assets(root)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_root):
    """A tiny LoRA refiner in eval mode (tests that train build their own)."""
    from lavis_c2f.testing.tiny_refiner import build_tiny_refiner

    return build_tiny_refiner(tiny_root).eval()
