"""CALCE reproduced against the official code's outputs (``../shared/fixtures/calce_reference``).

Both stages: the checkpoints load with a clean key report, then for each of the two queries the
T5 encoder input (ids exactly, ``inputs_embeds`` within 1e-5), the key / non-key / kept frames,
the DPC-KNN labels and ``compress_mask`` results, the selected subtitles, the teacher-forced
loss and logits (1e-4), greedy and default-beam generation ids and the parsed windows; plus
CALCE's answer parsing on the fixture's 16 strings and its ``.srt`` handling.
"""
import hashlib

import pytest
import torch

from lavis_c2f.models.refiner import (build_calce_inputs, calce_generate, calce_post_process,
                                      calce_teacher_forcing, load_calce_checkpoint)
from lavis_c2f.models.refiner.calce_keyframes import compress_mask, dpc_knn_labels
from lavis_c2f.models.refiner.calce_text import calce_subtitles, moment_str_to_list


@pytest.fixture(scope="module")
def fx_dir(reference_fixture):
    return reference_fixture("calce_reference", "calce_reference.pt")


@pytest.fixture(scope="module")
def fx(fx_dir):
    return torch.load(fx_dir / "calce_reference.pt", map_location="cpu", weights_only=True)


def base_config(fx_dir, fx):
    p = fx_dir / "pretrained"
    return {"vit_checkpoint": str(p / "eva_vit_g_tiny.pth"), "vit_arch": fx["config"]["tiny"]["vit"],
            "bert_dir": str(p / "bert-base-uncased-tiny"), "t5_dir": str(p / "flan-t5-xl-tiny"),
            "pretrained": str(p / "blip2_pretrained_flant5xl_tiny.pth"), "precision": "fp32"}


@pytest.fixture(scope="module", params=[1, 2], ids=["stage1", "stage2"])
def loaded(request, fx_dir, fx):
    stage = request.param
    st = fx["stages"][stage]
    model = load_calce_checkpoint(str(fx_dir / st["checkpoint_file"]), base_config(fx_dir, fx))
    outs = []
    for s in st["samples"]:
        frames = s["dataset_item"]["frames_lowres_normalized"].repeat_interleave(14, -2).repeat_interleave(14, -1)
        srt = (fx_dir / s["raw"]["srt_file"]).read_text(encoding="utf-8")
        torch.manual_seed(fx["config"]["call_seed"])
        with torch.no_grad():
            x = build_calce_inputs(model, frames, s["dataset_item"]["timestamps"], s["raw"]["duration"],
                                   s["raw"]["query"], s["raw"]["items"], srt,
                                   s["raw"]["coarse_windows"] if stage == 2 else None)
        outs.append(x)
    return stage, st, model, outs


def test_checkpoint_loads_with_clean_key_report(loaded, fx):
    stage, st, model, _ = loaded
    assert model.load_report == {"missing": [], "unexpected": [], "mismatched": []}
    assert model.calce.stage == stage and not model.training
    assert model.annoying_table == st["annoying_numbers_replacement_dict"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(st["trainable_keys"])
    assert sorted(model.trainable_state_dict()) == sorted(st["checkpoint_keys"])
    state = model.state_dict()
    assert len(state) == len(st["state_dict_sha256"])
    for k, digest in st["state_dict_sha256"].items():   # every tensor as the official code loaded it
        t = state[k.replace(".base_layer.", ".")].detach().contiguous().cpu()   # peft >= 0.7 names
        assert list(t.shape) == list(st["state_dict_shapes"][k]), k
        assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == digest, k


def test_encoder_input_ids_embeddings_and_frames(loaded):
    stage, st, _, outs = loaded
    for s, x in zip(st["samples"], outs):
        ref = s["inputs"]
        assert torch.equal(x["input_ids"], ref["input_ids_with_placeholders"])
        assert x["part_lens"] == list(ref["embed_lens"])
        torch.testing.assert_close(x["inputs_embeds"], ref["inputs_embeds"], atol=1e-5, rtol=0)
        assert torch.equal(x["attention_mask"], ref["attention_mask"])
        kf = s["keyframes"]
        assert x["key_frame_idx"] == kf["key_frame_idx"]
        assert x["non_key_frame_idx"] == kf["non_key_frame_idx"]
        assert x["kept_frame_idx"] == kf["kept_frame_idx"]
        assert x["prompt_timestamps"] == pytest.approx(ref["prompt_timestamps"])
        assert x["text_prompt"] == ref["text_prompt"]
        assert [d["text"] for d in x["subtitles"]] == [d["text"] for d in ref["subtitles_after_filter"]]


def test_teacher_forcing_and_generation(loaded):
    stage, st, model, outs = loaded
    for s, x in zip(st["samples"], outs):
        with torch.no_grad():
            tf = calce_teacher_forcing(model, x, s["forward"]["target_text"])
        torch.testing.assert_close(tf["logits"], s["forward"]["logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(tf["loss"], s["forward"]["loss"], atol=1e-4, rtol=0)
        g = s["generate"]["greedy8"]
        ids = calce_generate(model, x, num_beams=1, max_new_tokens=8, min_length=1)
        assert torch.equal(ids, g["sequences"])
        text = model.t5_tokenizer.batch_decode(ids[None], skip_special_tokens=True)[0]
        assert text == g["raw_pred_windows"]
        assert calce_post_process(text, s["raw"]["duration"]) == g["pred_windows"]


@pytest.mark.slow
def test_default_beam_generation(loaded):
    stage, st, model, outs = loaded
    for s, x in list(zip(st["samples"], outs))[:1]:     # the shorter input: ~8 s per beam search
        ref = s["generate"]["official_default"]
        ids = calce_generate(model, x)          # official defaults: 5 beams, 70 new tokens
        assert torch.equal(ids, ref["sequences"])
        text = model.t5_tokenizer.batch_decode(ids[None], skip_special_tokens=True)[0]
        assert text == ref["raw_pred_windows"]
        assert calce_post_process(text, s["raw"]["duration"]) == ref["pred_windows"]


def test_clustering_and_budget_calls_match(loaded, fx):
    stage, st, _, _ = loaded
    for s in st["samples"]:
        kf = s["keyframes"]
        calls = kf["cluster_calls"]
        assert len(calls) == stage          # one DPC-KNN call in stage 1, two in stage 2
        if stage == 1:
            torch.manual_seed(fx["config"]["call_seed"])
            labels = dpc_knn_labels(calls[0]["input_x"][0], 12, 5)
            assert torch.equal(labels, calls[0]["idx_token"][0])
        for c in kf["compress_calls"]:
            key, non = compress_mask(c["key_in"].clone(), c["non_key_in"].clone(), c["target_count"])
            assert torch.equal(key, c["key_out"]) and torch.equal(non, c["non_key_out"])


def test_answer_parsing_table(fx):
    for row in fx["answer_parsing"]:
        assert moment_str_to_list(row["text"]) == row["moment_str_to_list"], row["text"]
        for d in (150, 126, None):
            assert calce_post_process(row["text"], d) == row[f"post_process_duration_{d}"], (row["text"], d)
        assert calce_post_process(row["text"], 150.0) == row["post_process_duration_150"]


def test_srt_merging_filter_and_durations(fx_dir, fx):
    for s in fx["stages"][1]["samples"]:
        text = (fx_dir / s["raw"]["srt_file"]).read_text(encoding="utf-8")
        subs, durations = calce_subtitles(text, str(fx_dir / s["raw"]["srt_file"]))
        assert subs == s["dataset_item"]["subtitles"]
        assert durations == s["dataset_item"]["subtitle_durations"]          # exactly (same float maths)
