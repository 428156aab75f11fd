"""CALCE's parts without the reference fixture: text rules, key frames, the dataset, the builder,
the tiny model through the public path and the pipeline hook, configuration errors."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.models.refiner import build_calce_inputs, calce_generate, calce_teacher_forcing
from lavis_c2f.models.refiner.calce_keyframes import (compress_mask, dilate, dpc_knn_labels, stage1_key_frames,
                                                      talk_mask)
from lavis_c2f.models.refiner.calce_text import (annoying_replacement, calce_int, calce_subtitles,
                                                 calce_target_text, calce_text_filter, calce_text_prompt,
                                                 parse_calce_srt)
from lavis_c2f.models.refiner.data import (ArrayFrameSource, CalceDataConfig, CalceDataset, RefinerDatasetBuilder,
                                           calce_frame_indices, collate_calce)
from lavis_c2f.models.refiner.hook import CaptionRefiner
from lavis_c2f.models.refiner.model import CalceSettings
from lavis_c2f.testing.tiny_refiner import build_tiny_refiner

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"


# ----------------------------------------------------------------------------- text rules
def test_srt_rules_merge_filter_and_errors(tmp_path):
    srt = ("\ufeff1\r\n00:00:01,000 --> 00:00:02,000\r\nSo, yeah!\r\n\r\n2\r\n00:00:02,000 --> 00:00:03,500\r\n"
           "So, yeah!\r\n\r\n3\r\n00:00:09,000 --> 00:00:10,250\r\nUh oh\r\n\r\n"
           "4\r\n00:00:11,000 --> 00:00:12,000\r\nThe dog (barks) at 3 cats\r\n")
    subs, durs = calce_subtitles(srt)
    assert subs == [{"start": 1.0, "text": "so", "end": 3.5}, {"start": 11.0, "text": "dog barks at 3 cats", "end": 12.0}]
    assert durs == [[1.0, 3.5], [9.0, 12.0]]             # raw entries chained within 2.5 s
    assert calce_text_filter("¿Dónde está el lago?") is None and calce_text_filter("...") is None
    assert calce_subtitles(None) == ([], []) and calce_subtitles("") == ([], [])
    with pytest.raises(DataFormatError, match=r"x\.srt:2.*bad subtitle time"):
        parse_calce_srt("1\n00:00:xx --> 00:00:02,000\nhi\n", "x.srt")
    with pytest.raises(DataFormatError, match="without a 'start --> end'"):
        parse_calce_srt("hello\n", "y.srt")


def test_numbers_prompt_and_target():
    table = annoying_replacement([112, 113, 128])
    assert table == {112: 111, 113: 114, 128: 129}          # n + j, then n - j, for j = 0, 1, ...
    assert calce_int(112.4, table) == 111 and calce_int(2.5, table) == 2 and calce_int(3.5, table) == 4
    assert calce_target_text([[40, 112]], table) == "[[40, 111]]"
    assert calce_target_text("[[1120, 5]]", {112: 113}) == "[[1130, 5]]"       # str.replace, as CALCE
    assert calce_text_prompt("q", ["a", "b"], [[1, 2]]).startswith("Query: q\nref: [[1, 2]]\nItems: a,b\nGiven")
    assert calce_text_prompt("q", None) == ("Query: q\nGiven the video and the subtitle and the query, find the "
                                            "query relevant windows.\nRelevant windows: ")


# ----------------------------------------------------------------------------- key frames
def test_dpc_knn_is_seeded_and_handles_short_inputs():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a = dpc_knn_labels(x, 12, 5)
    torch.manual_seed(5)
    assert torch.equal(a, dpc_knn_labels(x, 12, 5)) and int(a.max()) == 11
    few = dpc_knn_labels(x[:4], 12, 5)                    # fewer frames than clusters: one each
    assert sorted(few.tolist()) == [0, 1, 2, 3]
    masked = dpc_knn_labels(x, 4, 5, mask=(torch.arange(30) < 10).int())
    assert masked.shape == (30,)
    assert dilate(torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.int), 1).tolist() == [0, 1, 1, 1, 0, 0]
    assert talk_mask([[5.0, 10.0]], 75, 150).nonzero().flatten().tolist() == [2, 3, 4, 5]


def test_stage1_talk_override_and_compress_fallback_is_reproducible():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    sel = stage1_key_frames(x, "Query: a man talks\n", [[0.0, 3.0]], 20.0, num_clusters=4, k=3)
    assert sel["key_frame_idx"] == [0, 1, 2, 3] and sel["kept_frame_idx"] == list(range(20))
    key = torch.tensor([1, 0] * 10, dtype=torch.int)     # runs of length 1: only the random fallback helps
    non = torch.tensor([0, 1] * 10, dtype=torch.int)
    torch.manual_seed(3)
    k1, n1 = compress_mask(key.clone(), non.clone(), 10)
    torch.manual_seed(3)
    k2, n2 = compress_mask(key.clone(), non.clone(), 10)
    assert torch.equal(k1, k2) and torch.equal(n1, n2) and int(k1.sum() + n1.sum()) <= 10


# ----------------------------------------------------------------------------- data
def video(n=40, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), np.arange(n) + 0.5


def records():
    return [MomentRecord(qid="a", query="a man talks about boots", vid="v1", duration=40.3,
                         relevant_windows=[(10.0, 20.0)], items=["man", "boots"], source="x.json[0]",
                         extra={"coarse_windows": [[8, 22]]}),
            MomentRecord(qid="b", query="a dog runs", vid="v2", duration=30.0, relevant_windows=[(4.0, 12.0)],
                         items=["dog"], source="x.json[1]")]


def test_head_sampling_dataset_and_coarse_windows(tmp_path):
    assert calce_frame_indices(4500, 75)[:3].tolist() == [0, 60, 120] and len(calce_frame_indices(5, 75)) == 5
    src = ArrayFrameSource({"v1": video(), "v2": video(30, seed=1)})
    (tmp_path / "v1.srt").write_text("1\n00:00:05,000 --> 00:00:08,000\nnice boots\n", encoding="utf-8")
    ds = CalceDataset(records(), src, CalceDataConfig(stage=1, n_frms=16), image_size=32, captions_dir=str(tmp_path))
    s = ds[0]
    assert s["frames"].shape == (16, 3, 32, 32) and s["timestamps"].dtype == torch.float32
    assert s["items"] == ["man", "boots"] and "nice boots" in s["srt_text"] and ds[1]["srt_text"] is None
    assert s["coarse_windows"] is None and s["calce_seed"] == 0 and ds[1]["calce_seed"] == 1
    preds = {"b": {"windows": [[4.4, 11.6, 0.8], [20.0, 25.0, 0.1]], "saliency": None}}
    ds2 = CalceDataset(records(), src, CalceDataConfig(stage=2, n_frms=16, n_coarse=1, round_duration=True),
                       image_size=32, coarse=preds)
    s0, s1 = ds2[0], ds2[1]
    assert s0["coarse_windows"] == [[8, 22]] and s1["coarse_windows"] == [[4, 12]] and s0["duration"] == 40.0
    assert s0["timestamps"].tolist() == pytest.approx([round(t, 2) for t in s0["timestamps"].tolist()])
    batch = collate_calce([s0, s1])
    assert batch["duration"] == [40.0, 30.0] and len(batch["frames"]) == 2
    none = CalceDataset(records(), src, CalceDataConfig(items="none", n_frms=8), image_size=32)
    assert none[0]["items"] == []
    bad = records()
    bad[1].items = None
    with pytest.raises(DataFormatError, match=r"x\.json\[1\].*no 'items'.*calce\.items: none"):
        CalceDataset(bad, src, CalceDataConfig(), image_size=32)
    with pytest.raises(DataFormatError, match="no coarse windows"):
        CalceDataset(records(), src, CalceDataConfig(stage=2), image_size=32)
    whole = CalceDataset(records(), src, CalceDataConfig(stage=2, n_frms=8), image_size=32,
                         on_missing_coarse="whole_video")
    assert whole[1]["coarse_windows"] == [[0, 30]]
    with pytest.raises(ConfigError, match=r"calce\.items"):
        CalceDataConfig.from_mapping({"items": "spacy"})
    with pytest.raises(ConfigError, match="unknown key"):
        CalceDataConfig.from_mapping({"frames": 75})


def test_builder_reads_calce_json(tmp_path):
    rows = [{"video": "v1", "qid": "Q_1", "query": "a man talks", "duration": 40, "items": ["man"],
             "relevant_windows": [[10, 20]], "stage1_result": [[8, 22]]}]
    (tmp_path / "val.json").write_text(json.dumps(rows))
    frames = tmp_path / "frames" / "v1"
    frames.mkdir(parents=True)
    from PIL import Image

    for k in range(12):
        Image.fromarray(np.full((32, 32, 3), 20 * k, dtype=np.uint8)).save(frames / f"{k:03d}.png")
    cfg = {"variant": "calce", "calce": {"stage": 2, "n_frms": 8}, "data_root": str(tmp_path),
           "annotations": {"val": {"path": "val.json", "format": "calce"}},
           "frames": {"type": "folder", "path": "frames", "fps": 0.3}, "image_size": 32}
    ds = RefinerDatasetBuilder(cfg).build_datasets()["val"]
    s = ds[0]
    assert isinstance(ds, CalceDataset) and s["coarse_windows"] == [[8, 22]] and s["frames"].shape[0] == 8
    with pytest.raises(ConfigError, match="variant"):
        RefinerDatasetBuilder({**cfg, "variant": "calse"})


# ----------------------------------------------------------------------------- model and hook
@pytest.fixture(scope="module")
def calce_model(tiny_root):
    return build_tiny_refiner(tiny_root, variant="calce").eval()


def test_tiny_calce_model_public_path(calce_model):
    frames, times = video(24)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    srt = "1\n00:00:02,000 --> 00:00:04,000\nlook at the dog\n"
    torch.manual_seed(0)
    a = build_calce_inputs(calce_model, x, times, 24.0, "a dog runs", ["dog"], srt)
    torch.manual_seed(0)
    b = build_calce_inputs(calce_model, x, times, 24.0, "a dog runs", ["dog"], srt)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["inputs_embeds"], b["inputs_embeds"])
    n_frame_rows = int((a["input_ids"] == -1).sum())
    assert n_frame_rows == 8 * len(a["key_frame_idx"]) + 2 * len(a["non_key_frame_idx"])
    assert sorted(a["key_frame_idx"] + a["non_key_frame_idx"]) == a["kept_frame_idx"] == list(range(24))
    assert sum(a["part_lens"]) == a["input_ids"].shape[0] and a["text_prompt"].endswith("Relevant windows: ")
    tf = calce_teacher_forcing(calce_model, a, "[[4, 10]]")
    assert tf["logits"].dim() == 2 and torch.isfinite(tf["loss"])
    ids = calce_generate(calce_model, a, num_beams=1, max_new_tokens=4)
    assert ids[0].item() == 0 and ids.dim() == 1
    with pytest.raises(ValueError, match="items is None"):
        build_calce_inputs(calce_model, x, times, 24.0, "q", None, None)
    with pytest.raises(ValueError, match="takes no coarse_windows"):
        build_calce_inputs(calce_model, x, times, 24.0, "q", [], None, [[1, 2]])


def test_hook_items_modes_and_stage2(calce_model, tmp_path):
    frames, times = video(30)
    h = CaptionRefiner(calce_model)
    with pytest.raises(ConfigError, match="items: none"):
        h.refine("a dog runs", 30.0, [[4.0, 12.0, 0.9]], frames=frames, timestamps=times)
    out = h.refine("a dog runs", 30.0, [[4.0, 12.0, 0.9]], frames=frames, timestamps=times, items=["dog"])
    assert out and all(len(w) == 3 for w in out) and h.stats.n_total == 1
    h2 = CaptionRefiner(calce_model, items="none", n_frms=12)
    assert h2.refine("a dog runs", 30.0, [], frames=frames, timestamps=times)
    with pytest.raises(ConfigError, match="refiner.items"):
        CaptionRefiner(calce_model, items="maybe")


def test_hook_stage2_uses_stage2_windows_as_coarse(tiny_root, monkeypatch):
    model = build_tiny_refiner(tiny_root, variant="calce", calce={"stage": 2, "num_clusters": 4, "bias1": 2,
                                                                  "max_txt_len": 64}).eval()
    seen = {}
    from lavis_c2f.models.refiner import hook as hook_mod

    real = hook_mod.build_calce_inputs

    def spy(*args, **kw):
        seen["coarse"] = args[7]
        return real(*args, **kw)

    monkeypatch.setattr(hook_mod, "build_calce_inputs", spy)
    frames, times = video(40)
    h = CaptionRefiner(model, items="none")
    assert h.n_frms == 150
    h.refine("q", 40.0, [[3.6, 9.2, 0.2], [20.2, 30.7, 0.9]], frames=frames, timestamps=times)
    assert seen["coarse"] == [[20, 31]]                     # the best window (n_ref_windows 1), whole seconds


def test_real_video_through_decord(calce_model, tmp_path):
    mp4 = SHARED / "data" / "media" / "charades_sample.mp4"
    if not mp4.is_file():
        pytest.skip(f"../shared not found: {mp4}")
    from lavis_c2f.models.refiner.data import VideoFileFrameSource

    src = VideoFileFrameSource(str(mp4.parent), ext=".mp4", image_size=32)
    raw, times = src.calce_frames("charades_sample", 10)
    assert raw.shape[1:] == (32, 32, 3) and len(times) == 10 and times[0] == 0.0 and np.all(np.diff(times) > 0)
    h = CaptionRefiner(calce_model, items="none", n_frms=10)
    assert h.refine("a person opens a door", 30.0, [[2.0, 6.0, 0.7]], video_path=str(mp4))
    assert "frames_unavailable" not in h.stats.fallback_reasons
    assert h.refine("q", 30.0, [[2.0, 6.0, 0.7]], video_path=str(tmp_path / "none.mp4")) == [[2.0, 6.0, 0.7]]


def test_settings_and_loader_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.calce\.stage"):
        CalceSettings.from_mapping({"stage": 3})
    with pytest.raises(ConfigError, match="unknown key"):
        CalceSettings.from_mapping({"bias": 1})
    from lavis_c2f.models.refiner import load_calce_checkpoint

    with pytest.raises(ConfigError, match="unknown key"):
        load_calce_checkpoint("x.pth", {"vit": "x"})
    with pytest.raises(ConfigError, match="pretrained: missing"):
        load_calce_checkpoint("x.pth", {"vit_checkpoint": "a", "bert_dir": "b", "t5_dir": "c"})
    cfg = {"vit_checkpoint": "a", "bert_dir": "b", "t5_dir": "c", "pretrained": "d"}
    with pytest.raises(ConfigError, match="file not found"):
        load_calce_checkpoint(str(tmp_path / "x.pth"), cfg)
    torch.save({"model": {}, "config": {"model": {"arch": "blip2_t5"}}}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="arch is 'blip2_t5'"):
        load_calce_checkpoint(str(tmp_path / "other.pth"), cfg)
    torch.save({"model": {}, "config": {"model": {"arch": "blip2_calce_stage1", "input_time_format": "frame_indices"}}},
               tmp_path / "fi.pth")
    with pytest.raises(ConfigError, match="frame_indices"):
        load_calce_checkpoint(str(tmp_path / "fi.pth"), cfg)


def test_train_crop_keeps_the_clip_aligned():
    from lavis_c2f.models.refiner.data import random_resized_crop

    frames = np.stack([np.full((32, 32, 3), 10 * k, dtype=np.uint8) for k in range(5)])
    torch.manual_seed(0)
    out = random_resized_crop(frames, 32)
    assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8
    assert [int(out[k].mean()) for k in range(5)] == [10 * k for k in range(5)]   # one crop, constant frames
