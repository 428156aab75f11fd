"""Real pretrained weights from local paths (marker ``weights``; deselected by default).

Each test reads one environment variable and skips, naming it, when it is unset or the path
does not exist. Nothing is downloaded.

==========================  =================================================================
variable                    what
==========================  =================================================================
``C2F_CLIP_PATH``           a saved transformers ``CLIPModel`` folder (``config.json``, weights,
                            ``vocab.json``/``merges.txt``), e.g. openai/clip-vit-base-patch32
``C2F_CLIP_LAVIS_PATH``     a LAVIS/OpenAI CLIP checkpoint file, e.g. OpenAI's ``ViT-B-32.pt``;
                            ``C2F_CLIP_LAVIS_MODEL_TYPE`` (default ``openai``) as the backbone's
                            ``model_type`` (an open_clip name for open_clip state dicts)
``C2F_BLIP2_ROOT``          the folder of lavis_c2f/configs/models/c2f_caption_refiner_qvh_flant5xl.yaml
                            (eva_vit_g.pth, blip2_pretrained_flant5xl.pth, bert-base-uncased/,
                            flan-t5-xl/); ``C2F_REFINER_CKPT`` optionally a trained refiner checkpoint
``C2F_QD_DETR_CKPT``        an official QD-DETR checkpoint (``model_best.ckpt`` with ``opt``, or a
                            bare state dict with ``opt.json`` beside it)
``C2F_MESM_CKPT``           an official MESM checkpoint (``model_val_best.ckpt`` of its train.py);
                            ``C2F_MESM_TEXT_ENCODER`` optionally MESM's ``clip_text_encoder.pth``
==========================  =================================================================

Video: the real Charades clip ``../shared/data/media/charades_sample.mp4`` when present, else
a 9 s ``testsrc`` clip generated with the ffmpeg CLI (skipped when neither is available).

    C2F_CLIP_PATH=/models/clip-vit-base-patch32 .venv/bin/python -m pytest -m weights tests/weights
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.weights

REPO = Path(__file__).resolve().parents[2]
SHARED_MEDIA = REPO.parent / "shared" / "data" / "media"
CHARADES = SHARED_MEDIA / "charades_sample.mp4"
CHARADES_REF = SHARED_MEDIA / "charades_sample_clip_features.npz"   # UniVTG's CLIP ViT-B/32, 2 s clips
REFINER_YAML = REPO / "lavis_c2f" / "configs" / "models" / "c2f_caption_refiner_qvh_flant5xl.yaml"
CLIP_LENGTH = 2.0
QUERIES = ["a person opens the door and walks into the bedroom", "a dog"]   # different token counts


def env_path(var: str, kind: str, what: str) -> Path:
    """The path in ``$var``; skips (naming the variable) when unset or missing."""
    value = os.environ.get(var, "").strip()
    if not value:
        pytest.skip(f"{var} is not set: point it at {what}")
    path = Path(value).expanduser()
    ok = path.is_dir() if kind == "dir" else path.is_file()
    if not ok:
        pytest.skip(f"{var}={value}: {'folder' if kind == 'dir' else 'file'} not found ({what})")
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """The real Charades clip, else a generated 9 s testsrc clip (moving pattern, 25 fps)."""
    if CHARADES.is_file():
        return CHARADES
    if shutil.which("ffmpeg") is None:
        pytest.skip(f"no test video: {CHARADES} is missing and the ffmpeg CLI is not installed")
    path = tmp_path_factory.mktemp("video") / "testsrc.mp4"
    subprocess.run(["ffmpeg", "-y", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=320x240:rate=25", "-t", "9", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    str(path)], check=True, capture_output=True)
    return path


# =========================================================================== shared checks


def check_extraction(bb, video_path: Path, out: Path) -> np.ndarray:
    """Extract ``video_path`` with ``bb`` into the Moment-DETR layout and check it; returns the
    stored (n_clips, D) features."""
    from lavis_c2f.data.features import NpzDirStore, VideoFeatureLoader
    from lavis_c2f.video.decode import decode_clips
    from lavis_c2f.video.probe import probe
    from lavis_c2f.video.extract import extract_corpus

    res = extract_corpus(video_path.parent, out, bb, clip_length=CLIP_LENGTH, frames_per_clip=1, workers=0,
                         videos=[video_path], progress=False, print_summary=False)
    assert res.summary.ok == [str(video_path)], res.summary.failed
    row = res.rows[0]
    info = probe(video_path)
    n = row["n_clips"]
    # one clip per clip_length seconds, the last one kept when at least half of it is in the video
    assert n == info.n_clips(CLIP_LENGTH) and abs(n - info.duration / CLIP_LENGTH) <= 0.5 + 1e-6, (n, info.duration)
    assert row["weights_id"] == bb.weights_id and row["backbone"] == bb.name

    feats = np.load(out / "clip_features" / f"{row['vid']}.npz")["features"]
    assert feats.shape == (n, bb.dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert np.linalg.norm(feats - feats.mean(0), axis=1).max() > 1e-3, "every clip got the same feature"
    # the stored rows are the backbone's features of the sampled frames
    clips = decode_clips(video_path, CLIP_LENGTH, 1, size=bb.decode_size)
    np.testing.assert_allclose(feats, bb.encode_clips(clips.frames), rtol=1e-4, atol=1e-5)

    # what a Moment-DETR/QD-DETR dataset reads: L2-normalised clips + the two TEF columns
    loaded = VideoFeatureLoader([NpzDirStore(out / "clip_features")], normalize=True, use_tef=True).load(row["vid"])
    assert loaded.shape == (n, bb.dim + 2)
    np.testing.assert_allclose(np.linalg.norm(loaded[:, :bb.dim], axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(loaded[:, -2], np.arange(n) / n, atol=1e-6)
    np.testing.assert_allclose(loaded[:, -1], np.arange(1, n + 1) / n, atol=1e-6)
    return feats


def check_frames_and_text(bb, video_path: Path, out: Path, n_tokens) -> None:
    """Identical frames give identical features, text is deterministic, and the query files
    have Moment-DETR's layout. ``n_tokens(q)``: expected token rows of query ``q``."""
    from lavis_c2f.video.decode import decode_clips
    from lavis_c2f.video.extract import write_query_features

    frames = decode_clips(video_path, CLIP_LENGTH, 1, size=bb.decode_size).frames[:, 0]
    a, b = frames[0], frames[len(frames) // 2]
    assert not np.array_equal(a, b)
    f = bb.encode_frames(np.stack([a, a, b]))
    assert f.shape == (3, bb.dim) and f.dtype == np.float32
    np.testing.assert_allclose(f[0], f[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(bb.encode_frames(a[None])[0], f[0], rtol=1e-5, atol=1e-5)
    assert np.abs(f[0] - f[2]).max() > 1e-4, "different frames gave the same feature"

    t1, t2 = bb.encode_text(QUERIES), bb.encode_text(QUERIES)
    for x, y, q in zip(t1, t2, QUERIES):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.pooled, y.pooled)
        assert x.tokens.shape == (n_tokens(q), bb.text_dim) and x.pooled.shape == (bb.dim,)
        assert np.isfinite(x.tokens).all() and np.isfinite(x.pooled).all()
    assert not np.allclose(t1[0].pooled, t1[1].pooled)

    paths = write_query_features(bb, list(enumerate(QUERIES)), out)
    for (qid, q), p, tf in zip(enumerate(QUERIES), paths, t1):
        assert Path(p).name == f"qid{qid}.npz"
        with np.load(p) as z:
            assert set(z.files) == {"last_hidden_state", "pooler_output"}
            np.testing.assert_allclose(z["last_hidden_state"], tf.tokens, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(z["pooler_output"], tf.pooled, rtol=1e-5, atol=1e-6)


def check_against_univtg_reference(feats: np.ndarray, video_path: Path) -> None:
    """Our CLIP ViT-B/32 clip features of the Charades sample against UniVTG's (its own decoding
    and frame choice, so close, not equal): same clip count, same scale (projected, not
    normalised), and clip-by-clip cosine similarity."""
    if video_path != CHARADES or not CHARADES_REF.is_file():
        pytest.skip(f"reference features need {CHARADES} and {CHARADES_REF} (../shared)")
    ref = np.load(CHARADES_REF)["features"]
    assert feats.shape == ref.shape
    ratio = np.linalg.norm(feats, axis=1).mean() / np.linalg.norm(ref, axis=1).mean()
    assert 0.8 < ratio < 1.25, ratio
    cos = (feats * ref).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.mean() > 0.8 and cos.min() > 0.6, cos


# =========================================================================== CLIP (transformers)


@pytest.fixture(scope="module")
def hf_clip():
    from lavis_c2f.video.backbones import build_backbone

    path = env_path("C2F_CLIP_PATH", "dir", "a saved transformers CLIPModel folder, e.g. openai/clip-vit-base-patch32")
    return build_backbone("clip_hf", clip_path=str(path), batch_size=16)


def test_clip_hf_extracts_moment_detr_features(hf_clip, video, tmp_path):
    cfg = hf_clip.model.config
    assert hf_clip.dim == cfg.projection_dim and hf_clip.text_dim == cfg.text_config.hidden_size
    assert hf_clip.decode_size == hf_clip.image_size == cfg.vision_config.image_size
    assert hf_clip.weights_id.startswith("c2f_feature_clip_hf:")
    check_extraction(hf_clip, video, tmp_path / "out")


def test_clip_hf_frames_and_text(hf_clip, video, tmp_path):
    tok = hf_clip.tokenizer
    check_frames_and_text(hf_clip, video, tmp_path, lambda q: len(tok(q)["input_ids"]))


def test_clip_hf_text_equals_transformers(hf_clip):
    """``pooled`` is CLIP's ``get_text_features`` and ``tokens`` the final-LayerNorm states of
    the text transformer, for each query alone (the backbone pads the batch)."""
    feats = hf_clip.encode_text(QUERIES)
    model, tok = hf_clip.model, hf_clip.tokenizer
    for q, tf in zip(QUERIES, feats):
        enc = tok([q], return_tensors="pt")
        with torch.no_grad():
            pooled = model.get_text_features(**enc)[0]
            tokens = model.text_model(**enc).last_hidden_state[0]
        np.testing.assert_allclose(tf.pooled, pooled.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(tf.tokens, tokens.numpy(), rtol=1e-5, atol=1e-5)


def test_clip_hf_vit_b32_matches_reference_features(hf_clip, video, tmp_path):
    cfg = hf_clip.model.config
    if (cfg.projection_dim, cfg.vision_config.patch_size, cfg.vision_config.hidden_size) != (512, 32, 768):
        pytest.skip("C2F_CLIP_PATH is not CLIP ViT-B/32: the reference features are ViT-B/32")
    check_against_univtg_reference(check_extraction(hf_clip, video, tmp_path / "out"), video)


# =========================================================================== CLIP (LAVIS)


@pytest.fixture(scope="module")
def lavis_clip():
    from lavis_c2f.video.backbones import build_backbone

    path = env_path("C2F_CLIP_LAVIS_PATH", "file",
                    "a LAVIS/OpenAI CLIP checkpoint file, e.g. ViT-B-32.pt (C2F_CLIP_LAVIS_MODEL_TYPE: "
                    "open_clip name for open_clip state dicts)")
    model_type = os.environ.get("C2F_CLIP_LAVIS_MODEL_TYPE", "openai")
    return build_backbone("clip_lavis", checkpoint=str(path), model_type=model_type, batch_size=16)


def test_clip_lavis_extracts_moment_detr_features(lavis_clip, video, tmp_path):
    m = lavis_clip.model
    assert lavis_clip.dim == m.text_projection.shape[1] and lavis_clip.text_dim == m.ln_final.weight.shape[0]
    assert lavis_clip.weights_id.startswith("c2f_feature_clip_lavis:")
    check_extraction(lavis_clip, video, tmp_path / "out")


def test_clip_lavis_frames_and_text(lavis_clip, video, tmp_path):
    ctx = lavis_clip.model.context_length
    check_frames_and_text(lavis_clip, video, tmp_path,
                          lambda q: int((lavis_clip.tokenize([q], context_length=ctx) != 0).sum()))


def test_clip_lavis_pooled_equals_encode_text(lavis_clip):
    m = lavis_clip.model
    feats = lavis_clip.encode_text(QUERIES)
    with torch.no_grad():
        want = m.encode_text(lavis_clip.tokenize(QUERIES, context_length=m.context_length).to(lavis_clip.device))
    for tf, w in zip(feats, want):
        np.testing.assert_allclose(tf.pooled, w.float().cpu().numpy(), rtol=1e-5, atol=1e-5)


def test_clip_lavis_vit_b32_matches_reference_features(lavis_clip, video, tmp_path):
    conv = lavis_clip.model.visual.conv1
    if (lavis_clip.dim, conv.kernel_size[0], conv.out_channels) != (512, 32, 768):
        pytest.skip("C2F_CLIP_LAVIS_PATH is not CLIP ViT-B/32: the reference features are ViT-B/32")
    check_against_univtg_reference(check_extraction(lavis_clip, video, tmp_path / "out"), video)


# =========================================================================== BLIP-2 refiner


def test_blip2_refiner_generates_on_real_frames(video, monkeypatch):
    """The FlanT5-XL refiner of the shipped model YAML, every weight from ``$C2F_BLIP2_ROOT``
    (+ ``$C2F_REFINER_CKPT`` when set): one generation on frames of the video; the output is
    either parsed into windows inside the video or counted as a fallback to the stage-2
    windows. On CPU the precisions are switched to fp32 (minutes per query; a GPU is meant)."""
    from omegaconf import OmegaConf

    from lavis_c2f.models.refiner.hook import CaptionRefiner

    root = env_path("C2F_BLIP2_ROOT", "dir", "the BLIP-2 folder of docs/refiner.md (eva_vit_g.pth, "
                    "blip2_pretrained_flant5xl.pth, bert-base-uncased/, flan-t5-xl/)")
    monkeypatch.setenv("C2F_BLIP2_ROOT", str(root))
    model_cfg = OmegaConf.to_container(OmegaConf.load(REFINER_YAML).model, resolve=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        model_cfg.update(vit_precision="fp32", t5_precision="fp32")
    model_cfg["generation"] = dict(model_cfg["generation"], num_beams=2)
    ckpt = os.environ.get("C2F_REFINER_CKPT") or None
    if ckpt and not os.path.isfile(ckpt):
        pytest.skip(f"C2F_REFINER_CKPT={ckpt}: file not found")
    refiner = CaptionRefiner.from_config({"model": model_cfg, "checkpoint": ckpt, "device": device, "video_fps": 1.0,
                                          "sampler": {"n_frames": 4, "n_candidates": 16, "margin_s": 4.0,
                                                      "margin_ratio": 0.5}})
    assert refiner.image_size == 224
    check_one_refinement(refiner, video, monkeypatch)


def check_one_refinement(refiner, video: Path, monkeypatch) -> None:
    """One ``refine`` call on the video: the raw generation either parses into windows inside
    the video (counted as refined) or falls back to the stage-2 windows (counted by reason)."""
    from lavis_c2f.models.refiner.parsing import parse_windows
    from lavis_c2f.video.probe import probe

    texts, confs = [], []
    generate = refiner.model.generate_text

    def spy(samples, **kw):
        t, c = generate(samples, **kw)
        texts.extend(t)
        confs.extend(c)
        return t, c

    monkeypatch.setattr(refiner.model, "generate_text", spy)
    duration = probe(video).duration
    stage2 = [[round(0.1 * duration, 1), round(0.35 * duration, 1), 0.9],
              [round(0.5 * duration, 1), round(0.65 * duration, 1), 0.5]]
    windows = refiner.refine("a person walks through the door", duration, stage2, video_path=str(video),
                             captions=[(stage2[0][0], stage2[0][1], "okay I am going in now")])
    assert len(texts) == 1 and isinstance(texts[0], str)
    assert np.isfinite(confs[0]) and 0.0 < confs[0] <= 1.0 + 1e-6
    stats = refiner.stats
    assert stats.n_total == 1
    parsed = parse_windows(texts[0], duration, refiner.model.parse_cfg)
    if parsed.ok:
        assert stats.n_refined == 1 and not stats.fallback_reasons
        assert [w[:2] for w in windows[:len(parsed.windows)]] == [list(w) for w in parsed.windows]
        for st, ed, score in windows:
            assert 0.0 <= st < ed <= duration and score > 0
    else:
        assert stats.n_fallback == 1 and dict(stats.fallback_reasons) == {parsed.reason: 1}, texts[0]
        assert windows == stage2
    assert stats.summary().startswith(f"refiner: {stats.n_refined}/1 refined")


# =========================================================================== official QD-DETR


def _tef(n: int) -> torch.Tensor:
    st = torch.arange(n, dtype=torch.float32) / n
    return torch.stack([st, st + 1.0 / n], dim=1)


def test_official_qd_detr_checkpoint_runs():
    """An official checkpoint loads strictly and runs on inputs shaped from its own options:
    L2-normalised text tokens and clip features (+ TEF when ``ctx_mode`` has it), a padded
    batch of two videos; outputs are finite and well-formed, batch-independent in the
    ``correct`` mask mode, and post-process into windows inside each video."""
    from lavis_c2f.models.grounder import PostProcessConfig, load_qd_detr_checkpoint, postprocess_batch
    from lavis_c2f.models.grounder.checkpoint import torch_load

    path = env_path("C2F_QD_DETR_CKPT", "file", "an official QD-DETR checkpoint, e.g. QVHighlights model_best.ckpt")
    model = load_qd_detr_checkpoint(str(path))
    assert not model.training
    raw = torch_load(str(path))
    opt = raw.get("opt") if isinstance(raw, dict) and "opt" in raw else None
    o = vars(opt) if opt is not None and not isinstance(opt, dict) else dict(opt or {})
    if o.get("t_feat_dim") is not None:
        assert model.txt_dim == int(o["t_feat_dim"])
    use_tef = "tef" in str(o.get("ctx_mode", "video_tef"))
    max_v = int(o.get("max_v_l") or 75)
    max_q = int(o.get("max_q_l") or 32)
    clip_len = float(o.get("clip_length") or 2.0)

    g = torch.Generator().manual_seed(0)
    lv, lt = [max_v, max(2, max_v // 3)], [min(max_q, 12), min(max_q, 5)]
    bsz = 2
    vid_feat = model.vid_dim - (2 if use_tef else 0)
    src_vid = torch.zeros(bsz, max(lv), model.vid_dim)
    src_vid_mask = torch.zeros(bsz, max(lv))
    src_txt = torch.zeros(bsz, max(lt), model.txt_dim)
    src_txt_mask = torch.zeros(bsz, max(lt))
    for i in range(bsz):
        v = torch.nn.functional.normalize(torch.randn(lv[i], vid_feat, generator=g), dim=-1)
        src_vid[i, :lv[i]] = torch.cat([v, _tef(lv[i])], 1) if use_tef else v
        src_vid_mask[i, :lv[i]] = 1
        src_txt[i, :lt[i]] = torch.nn.functional.normalize(torch.randn(lt[i], model.txt_dim, generator=g), dim=-1)
        src_txt_mask[i, :lt[i]] = 1
    extra = {}
    if model.aud_dim:
        extra["src_aud"] = torch.randn(bsz, max(lv), model.aud_dim, generator=g)
    x = dict(src_txt=src_txt, src_txt_mask=src_txt_mask, src_vid=src_vid, src_vid_mask=src_vid_mask, **extra)
    with torch.no_grad():
        out = model(**x)
        again = model(**x)
        correct = model(**x, t2v_mask_mode="correct")
        alone = model(src_txt=src_txt[1:, :lt[1]], src_txt_mask=src_txt_mask[1:, :lt[1]],
                      src_vid=src_vid[1:, :lv[1]], src_vid_mask=src_vid_mask[1:, :lv[1]],
                      **{k: v[1:, :lv[1]] for k, v in extra.items()})
    nq = model.num_queries
    assert out["pred_logits"].shape == (bsz, nq, 2) and out["pred_spans"].shape == (bsz, nq, 2)
    assert out["saliency_scores"].shape == (bsz, max(lv))
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        assert torch.isfinite(out[key]).all(), key
        torch.testing.assert_close(out[key], again[key], rtol=0, atol=0)
    assert ((out["pred_spans"] > 0) & (out["pred_spans"] < 1)).all()
    assert len(out["aux_outputs"]) == len(model.transformer.decoder.layers) - 1
    for key in ("pred_logits", "pred_spans"):
        torch.testing.assert_close(alone[key][0], correct[key][1], atol=1e-5, rtol=0)

    durations = [n * clip_len for n in lv]
    rows = postprocess_batch(out, qids=[0, 1], queries=["q0", "q1"], vids=["v0", "v1"], durations=durations,
                             clip_lengths=[clip_len] * bsz, config=PostProcessConfig.official())
    for row, n, dur in zip(rows, lv, durations):
        assert len(row["pred_relevant_windows"]) == nq and len(row["pred_saliency_scores"]) == n
        scores = [w[2] for w in row["pred_relevant_windows"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert all(0 <= st <= ed for st, ed, _ in row["pred_relevant_windows"])


def test_official_mesm_checkpoint_runs():
    """An official MESM checkpoint (QVHighlights or Charades-STA release) loads strictly and
    runs on inputs shaped from its own options (video features + TEF, a padded batch of two
    videos of one group and one of another, the negative pass); with MESM's
    ``clip_text_encoder.pth`` the word features come from the tower, else random unit rows."""
    from lavis_c2f.models.grounder import load_mesm_checkpoint
    from lavis_c2f.models.grounder.checkpoint import torch_load
    from lavis_c2f.models.grounder.text_encoder import RuntimeTextEncoder

    path = env_path("C2F_MESM_CKPT", "file", "an official MESM checkpoint, e.g. model_val_best.ckpt")
    model = load_mesm_checkpoint(str(path))
    o = vars(torch_load(str(path))["opt"])
    assert not model.training and model.txt_dim == int(o["t_feat_dim"])
    max_v, max_w = int(o.get("max_video_l") or 75), int(o.get("max_words_l") or 32)
    lv = [min(max_v, 75), 20, 12]
    g = torch.Generator().manual_seed(0)
    src_vid = torch.zeros(3, max(lv), model.vid_dim)
    vid_mask = torch.zeros(3, max(lv))
    for i, n in enumerate(lv):
        feats = torch.nn.functional.normalize(torch.randn(n, model.vid_dim - 2, generator=g), dim=-1)
        st = torch.arange(n) / n
        src_vid[i, :n] = torch.cat([feats, torch.stack([st, st + 1.0 / n], 1)], 1)
        vid_mask[i, :n] = 1
    queries = ["a person opens the door and walks into the bedroom", "a dog", "a man cooks"]
    tower = os.environ.get("C2F_MESM_TEXT_ENCODER", "").strip()
    if tower:
        enc = RuntimeTextEncoder(checkpoint=tower, max_words_l=max_w)
        ids, txt_mask, _ = enc.tokenize(queries)
        src_txt = enc.encode(ids, txt_mask)
    else:
        txt_mask = torch.ones(3, 6)
        src_txt = torch.nn.functional.normalize(torch.randn(3, 6, model.txt_dim, generator=g), dim=-1)
    with torch.no_grad():
        out = model(src_txt, txt_mask, src_vid, vid_mask, vids=["a", "a", "b"], compute_neg=True)
    assert out["pred_spans"].shape == (3, model.num_queries, 2)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_spans"]).all()
    for key in ("saliency_scores", "saliency_scores_neg"):
        assert torch.isfinite(out[key][vid_mask.bool()]).all()
    assert out["saliency_neg_valid"].all()

