"""The SlowFast backbone with real Kinetics-400 weights (marker ``weights``; deselected by default).

``C2F_SLOWFAST_CKPT``: a local SlowFast R50 8x8 Kinetics-400 checkpoint in any of its layouts:
PySlowFast's ``SLOWFAST_8x8_R50.pkl`` (Caffe2, the one HERO's QVHighlights features came from),
a PySlowFast ``.pyth`` or pytorchvideo's ``SLOWFAST_8x8_R50.pyth``. Optional
``C2F_SLOWFAST_REF``: an ``.npz`` with ``features`` (n, 2304) made by the HERO extractor from the
test video (``C2F_SLOWFAST_VIDEO``, default the Charades sample), compared clip by clip.

    C2F_SLOWFAST_CKPT=/models/SLOWFAST_8x8_R50.pkl .venv/bin/python -m pytest -m weights tests/weights -k slowfast
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.weights
pytest.importorskip("pytorchvideo")

REPO = Path(__file__).resolve().parents[2]
CHARADES = REPO.parent / "shared" / "data" / "media" / "charades_sample.mp4"


def _env_file(var: str, what: str) -> Path:
    value = os.environ.get(var, "").strip()
    if not value:
        pytest.skip(f"{var} is not set: point it at {what}")
    path = Path(value).expanduser()
    if not path.is_file():
        pytest.skip(f"{var}={value}: file not found ({what})")
    return path


@pytest.fixture(scope="module")
def slowfast():
    from lavis_c2f.video.backbones import build_backbone

    ckpt = _env_file("C2F_SLOWFAST_CKPT", "a SlowFast R50 8x8 Kinetics-400 checkpoint (SLOWFAST_8x8_R50.pkl / .pyth)")
    return build_backbone("slowfast", slowfast_checkpoint=str(ckpt), batch_size=2)


@pytest.fixture(scope="module")
def video() -> Path:
    value = os.environ.get("C2F_SLOWFAST_VIDEO", "").strip()
    path = Path(value).expanduser() if value else CHARADES
    if not path.is_file():
        pytest.skip(f"no test video: set C2F_SLOWFAST_VIDEO or provide {CHARADES}")
    return path


@pytest.fixture(scope="module")
def extracted(slowfast, video, tmp_path_factory):
    from lavis_c2f.video.extract import extract_corpus

    out = tmp_path_factory.mktemp("sf")
    res = extract_corpus(video.parent, out, slowfast, videos=[video], workers=0, progress=False, print_summary=False)
    assert res.summary.ok == [str(video)], res.summary.failed
    row = res.rows[0]
    return row, np.load(out / "clip_features" / f"{row['vid']}.npz")["features"]


def test_features_in_the_qvhighlights_layout(slowfast, video, extracted):
    from lavis_c2f.video.probe import probe

    row, feats = extracted
    n = probe(video).n_clips(2.0)
    assert feats.shape == (n, 2304) and feats.dtype == np.float32 and row["n_clips"] == n
    assert np.isfinite(feats).all() and feats.min() >= 0          # means of ReLU outputs
    np.testing.assert_array_equal(feats, feats.astype(np.float16).astype(np.float32))  # HERO's float16 values
    assert np.linalg.norm(feats - feats.mean(0), axis=1).max() > 1e-2, "every clip got the same feature"


def test_features_feed_the_kinetics_classifier(slowfast, video):
    """The loaded classifier on the features equals pytorchvideo's whole network on the same
    clip (the weights are consistent end to end; a wrong name mapping would break it)."""
    from lavis_c2f.video.decode import decode_clips
    from lavis_c2f.video.slowfast import pack_pathways

    sampling = slowfast.sampler(1)
    frames = decode_clips(video, 2.0, offsets=sampling.offsets(2.0, 30.0), size=slowfast.decode_size).frames[:1]
    slowfast.half_precision_output = False
    try:
        feats = torch.from_numpy(slowfast.encode_clips(frames))
    finally:
        slowfast.half_precision_output = True
    head = slowfast.model.blocks[6]
    with torch.no_grad():
        logits = head.proj(feats)
        x = torch.from_numpy(frames).float().div(255).permute(0, 4, 1, 2, 3)
        h, w = x.shape[-2:]
        top, left = (h - 224) // 2, (w - 224) // 2
        x = (x[..., top:top + 224, left:left + 224] - 0.45) / (0.225 + 1e-8)
        full = slowfast.model(pack_pathways(x, 4))
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    probs = logits.softmax(-1)
    assert probs.max() > 1.5 / 400   # a real classifier is not uniform


def test_matches_hero_reference_features(extracted):
    ref_path = _env_file("C2F_SLOWFAST_REF", "HERO's slowfast_features .npz of the test video")
    _, feats = extracted
    ref = np.load(ref_path)["features"].astype(np.float32)
    n = min(len(ref), len(feats))
    cos = (feats[:n] * ref[:n]).sum(1) / (np.linalg.norm(feats[:n], axis=1) * np.linalg.norm(ref[:n], axis=1) + 1e-8)
    assert np.median(cos) > 0.95 and cos.min() > 0.8, cos
