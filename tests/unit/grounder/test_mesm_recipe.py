"""MESM's training recipe: video-grouped items, MESM's labels and normalisation, POS masking
weights through nltk's tagger, the official-layout text tower end to end, MESM's vocabulary
files."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from grounder_helpers import make_batch, tiny_mesm_config
from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data.features import NpzDirStore
from lavis_c2f.data.records import MomentRecord
from lavis_c2f.datasets.moment_retrieval import (GroupedMomentDataset, MomentRetrievalDataset,
                                                 group_key, mesm_window_labels,
                                                 saliency_labels_from_scores)
from lavis_c2f.models.grounder import C2FMESMQDDETR
from lavis_c2f.models.grounder.model import negative_text_index
from lavis_c2f.models.grounder.pos_weights import (PosTagger, PosTaggerUnavailable, content_weight,
                                                   pos_token_weights)
from lavis_c2f.models.grounder.text_encoder import OpenAIClipTextTower
from lavis_c2f.models.grounder.vocab import ReconstructionVocab, get_tokenizer
from lavis_c2f.ops.argsort import introsort_argsort
from lavis_c2f.processors.feature_processors import TextFeatureProcessor, VideoFeatureProcessor


# ---------------------------------------------------------------------- grouped items
def _stores(tmp_path, lengths, n_queries, dv=6, dt=4):
    rng = np.random.default_rng(0)
    v, t = tmp_path / "v", tmp_path / "t"
    v.mkdir(), t.mkdir()
    for vid, length in lengths.items():
        np.savez(v / f"{vid}.npz", features=rng.standard_normal((length, dv)).astype(np.float32))
    for qid in range(n_queries):
        np.savez(t / f"qid{qid}.npz", last_hidden_state=rng.standard_normal((3, dt)).astype(np.float32))
    return NpzDirStore(v), NpzDirStore(t, field="last_hidden_state")


def _qvh_like(tmp_path):
    vids = ["ytA_60.0_210.0", "ytB_0.0_150.0", "ytA_0.0_150.0", "ytA_60.0_210.0", "ytC_10.0_160.0"]
    recs = [MomentRecord(qid=i, query=f"q {i}", vid=v, duration=30.0,
                         relevant_windows=[(2.0 * i, 2.0 * i + 6.0)], relevant_clip_ids=[i, i + 1, i + 2],
                         saliency_scores=[[1, 2, 1], [3, 3, 3], [3, 3, 3]])
            for i, v in enumerate(vids)]
    vstore, tstore = _stores(tmp_path, {v: 15 for v in set(vids)}, len(vids))
    return MomentRetrievalDataset(recs, [vstore], tstore, clip_length=2.0, label_style="mesm")


def test_items_hold_the_queries_of_one_youtube_id_in_segment_order(tmp_path):
    base = _qvh_like(tmp_path)
    assert group_key("ytA_60.0_210.0", "youtube") == "ytA" and group_key("ytA_60.0_210.0", "video") == "ytA_60.0_210.0"
    grouped = GroupedMomentDataset(base, "youtube")
    assert len(grouped) == 3
    assert [(k, idx) for k, idx in grouped.items] == [("ytA", [2, 0, 3]), ("ytB", [1]), ("ytC", [4])]
    batch = grouped.collater([grouped[0], grouped[1]])
    assert batch["qid"] == [2, 0, 3, 1] and batch["group"] == ["ytA", "ytA", "ytA", "ytB"]
    assert batch["group_sizes"].tolist() == [3, 1]
    assert batch["clip_mask"].shape == batch["src_vid_mask"].shape and batch["clip_mask"].dtype == torch.bool
    # MESM's clip_mask: clips with a non-zero summed score
    assert batch["clip_mask"][1].nonzero().flatten().tolist() == [0, 1, 2]
    by_video = GroupedMomentDataset(base, "video")
    assert [idx for _, idx in by_video.items] == [[0, 3], [1], [2], [4]]
    chunks = GroupedMomentDataset(base, "video", max_group_size=1, seed=3)
    assert sorted(i for _, idx in chunks.items for i in idx) == list(range(5))
    assert all(len(idx) == 1 for _, idx in chunks.items)
    with pytest.raises(ValueError, match="group_by"):
        GroupedMomentDataset(base, "scene")


def test_grouped_batch_trains_with_groups_as_mesm(tmp_path, counts_file):
    """Negatives come from another group and the SS groups are the items."""
    torch.manual_seed(0)
    model = C2FMESMQDDETR.from_config(tiny_mesm_config(
        vocab_counts=counts_file, fw_tokenizer="whitespace", fw_word_weights="inverse_frequency",
        t2v_mask_mode="official"))
    model.train()
    batch = make_batch([10, 8, 12, 9], [5, 4, 7, 3],
                       [[[4.0, 10.0]], [[0.0, 4.0]], [[10.0, 20.0]], [[6.0, 12.0]]])
    batch["group"] = ["g0", "g0", "g0", "g1"]
    seen = {}
    detr_forward = model.detr.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        out = detr_forward(*args, **kwargs)
        seen["neg_valid"] = out["saliency_neg_valid"].tolist()
        return out

    model.detr.forward = spy
    out = model(batch)
    assert torch.isfinite(out["loss"]) and "loss_rec_ss" in out and "loss_rec_fw" in out
    assert seen["vids"] == batch["group"] and all(seen["neg_valid"])
    torch.manual_seed(5)
    index, _ = negative_text_index(4, "other_video", batch["group"])
    assert index.tolist()[:3] == [3, 3, 3] and index.tolist()[3] in (0, 1, 2)


# ---------------------------------------------------------------------- labels
@pytest.mark.parametrize("scores", [
    [[2, 2, 2]] * 6,                                            # all clips tied
    [[4, 4, 4], [4, 4, 4], [1, 1, 1], [4, 4, 4], [2, 2, 2]],     # ties at the top
    [[0, 0, 1], [3, 3, 3], [0, 1, 0], [1, 0, 0], [2, 2, 2]],     # ties at the bottom
    [[1, 2, 3]],                                                # one relevant clip
    [[3, 3, 3]] * 20 + [[1, 1, 1]] * 20,                        # long runs of ties
])
def test_mesm_hard_saliency_labels_follow_the_official_tie_order(scores):
    """MESM's ``get_saliency_labels_all`` is QD-DETR's: hard positive = the last of
    ``np.argsort`` (official introsort order), hard negative = the first."""
    ids = list(range(3, 3 + len(scores)))
    order = introsort_argsort(np.sum(np.array(scores), 1).astype(np.float64))
    pos, neg, _ = saliency_labels_from_scores(ids, scores, 60, np.random.default_rng(0))
    assert pos[0] == ids[order[-1]] and neg[0] == ids[order[0]]


def test_mesm_hard_saliency_labels_at_the_video_end():
    # relevant clip ids past the features' end are clamped to the last clip (as the official)
    pos, neg, all_s = saliency_labels_from_scores([8, 9, 10], [[4, 4, 4], [4, 4, 4], [4, 4, 4]], 10,
                                                  np.random.default_rng(0))
    order = introsort_argsort(np.array([12.0, 12.0, 12.0]))
    assert pos[0] == min([8, 9, 10][order[-1]], 9) and neg[0] == min([8, 9, 10][order[0]], 9)
    assert all_s.shape == (10,) and all_s[8] == all_s[9] == 12


def test_mesm_window_labels():
    rng = np.random.default_rng(0)
    pos, neg, mask = mesm_window_labels([(3.0, 7.5)], 10, 2.0, rng)
    assert mask.nonzero()[0].tolist() == [1, 2, 3]          # int(3/2) .. int(7.5/2), end included
    assert set(pos) <= {1, 2, 3} and len(pos) == 2 and not set(neg) & {1, 2, 3}
    # window at the video end: end clamped to the last clip, start clamped to the end
    _, _, mask = mesm_window_labels([(25.0, 40.0)], 10, 2.0, rng)
    assert mask.nonzero()[0].tolist() == [9]
    # one relevant clip: positives drawn with replacement; every clip relevant: negatives = positives
    pos, neg, mask = mesm_window_labels([(0.0, 30.0)], 10, 2.0, rng)
    assert mask.all() and neg == pos


def test_mesm_normalisation_styles():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    mesm = VideoFeatureProcessor(use_tef=False, norm_style="mesm")(x)
    qd = VideoFeatureProcessor(use_tef=False, norm_style="qd_detr")(x)
    torch.testing.assert_close(mesm[0], torch.tensor([0.6, 0.8]))          # x / max(||x||, 1e-12)
    torch.testing.assert_close(qd[0], torch.tensor([3.0, 4.0]) / (5.0 + 1e-5))
    assert torch.equal(mesm[1], torch.zeros(2))
    t = TextFeatureProcessor(norm_style="mesm")(np.array([[1e-6, 0.0]], dtype=np.float32))
    torch.testing.assert_close(t, torch.tensor([[1e-6 / 1e-5, 0.0]]))     # eps 1e-5, clamped
    with pytest.raises(ValueError, match="norm_style"):
        VideoFeatureProcessor(norm_style="other")


def test_mesm_dataset_keys_are_checked():
    from lavis_c2f.datasets.builders import parse_dataset_config
    base = {"annotations": {"train": {"path": "x.jsonl"}}, "video_features": [{"type": "npz", "path": "v"}],
            "text_features": {"type": "npz", "path": "t"}, "clip_length": 2.0}
    spec = parse_dataset_config(dict(base, group_by="youtube", label_style="mesm", norm_style="mesm",
                                     max_group_size=10), "c2f_qvh")
    assert (spec.group_by, spec.label_style, spec.norm_style, spec.max_group_size) == ("youtube", "mesm", "mesm", 10)
    assert spec.group_splits == ["train"]
    for key, bad in (("group_by", "scene"), ("label_style", "x"), ("norm_style", "x"), ("max_group_size", "3")):
        with pytest.raises(ConfigError, match=key):
            parse_dataset_config(dict(base, **{key: bad}), "c2f_qvh")


# ---------------------------------------------------------------------- POS weights
def test_pos_weights_from_the_registry_package():
    tagger = PosTagger()
    assert os.path.basename(tagger.source) in ("trontagger-0.1.0.pickle", "averaged_perceptron_tagger_eng")
    tags = tagger.tags("a person opens the red door quickly".split())
    assert tags[0] == "DT" and tags[1].startswith("NN") and tags[2].startswith("VB")
    assert tagger.weights("a person opens the red door quickly".split()) == [1, 2, 2, 1, 2, 2, 2]
    assert [content_weight(t) for t in ("NNS", "VBZ", "JJR", "RBS", "IN", "DT", "PRP")] == [2, 2, 2, 2, 1, 1, 1]
    # CLIP BPE pieces are tagged as one sequence; start/end get 0
    tok = get_tokenizer("clip")
    row = tok.tokenize("a man opens the door")
    w = pos_token_weights("a man opens the door", row, tok, tagger, tok.start_token, tok.end_token)
    assert w[0] == w[-1] == 0.0 and w[1:-1] == [1.0, 2.0, 2.0, 1.0, 2.0]


def test_pos_tagger_data_from_a_local_nltk_folder(tmp_path):
    from nltk.tag.perceptron import PerceptronTagger

    trainer = PerceptronTagger(load=False)
    folder = tmp_path / "nltk_data" / "taggers" / "averaged_perceptron_tagger_eng"
    folder.mkdir(parents=True)
    trainer.train([[("today", "NN"), ("is", "VBZ"), ("good", "JJ"), ("day", "NN")],
                   [("yes", "NNS"), ("it", "PRP"), ("beautiful", "JJ")]], nr_iter=2)
    trainer.save_to_json(lang="eng", loc=str(folder))
    for path in (tmp_path / "nltk_data", folder):
        tagger = PosTagger(str(path))
        assert tagger.source == str(folder) and tagger.tags(["today", "is", "good"]) == ["NN", "VBZ", "JJ"]


def test_pos_tagger_errors_say_how_to_provide_the_data(tmp_path, monkeypatch):
    with pytest.raises(PosTaggerUnavailable, match="not found"):
        PosTagger(str(tmp_path / "missing"))
    with pytest.raises(PosTaggerUnavailable, match="averaged_perceptron_tagger_eng"):
        PosTagger(str(tmp_path))
    evil = tmp_path / "evil.pickle"
    import pickle
    evil.write_bytes(pickle.dumps((os.getcwd, {}, set())))  # a reference to a function
    with pytest.raises(PosTaggerUnavailable, match="not a tagger pickle"):
        PosTagger(str(evil))
    import lavis_c2f.models.grounder.pos_weights as pw
    monkeypatch.setattr(pw, "_nltk_json_dir", lambda: None)
    monkeypatch.setattr(pw, "_package_pickle", lambda: None)
    with pytest.raises(PosTaggerUnavailable, match="textblob-aptagger.*pos_tagger.*inverse_frequency"):
        PosTagger()


# ---------------------------------------------------------------------- vocabulary files
def test_mesm_count_files_load(tmp_path):
    clip = tmp_path / "CLIP_tokenized_count.txt"
    clip.write_text("320 9939\n269 6456\n530 3631\n")
    vocab = ReconstructionVocab.from_counts_file(str(clip), 2, "clip")
    assert vocab.tokenizer == "clip" and vocab.label_of == {320: 0, 269: 1} and vocab.num_classes == 5
    glove = tmp_path / "GloVe_tokenized_count.txt"
    glove.write_text("person 15 900\nthe 7 800\n")
    assert ReconstructionVocab.from_counts_file(str(glove), 5).label_of == {"person": 0, "the": 1}
    with pytest.raises(DataFormatError, match="tokenizer"):
        ReconstructionVocab.from_counts_file(str(glove), 5, "clip")
    bad = tmp_path / "bad.txt"
    bad.write_text("320 x\n")
    with pytest.raises(DataFormatError, match=r"bad.txt:1: expected .ID COUNT."):
        ReconstructionVocab.from_counts_file(str(bad), 5)


# ---------------------------------------------------------------------- the text tower
@pytest.fixture(scope="module")
def tiny_openai_tower(tmp_path_factory) -> str:
    """A tiny random OpenAI-layout CLIP text tower saved like MESM's clip_text_encoder.pth (fp16)."""
    torch.manual_seed(0)
    tower = OpenAIClipTextTower(vocab_size=49408, context_length=40, width=64, heads=1, layers=1,
                                embed_dim=32)
    for p in tower.parameters():
        p.data.normal_(0.0, 0.05)
    state = {k: v.half() for k, v in tower.state_dict().items()}
    state["context_length"] = torch.tensor(40)  # extra entries MESM's builder deletes
    path = tmp_path_factory.mktemp("openai_tower") / "clip_text_encoder.pth"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("level", ["features", "tokens"])
def test_official_text_tower_trains_and_predicts_end_to_end(tiny_openai_tower, tmp_path, level):
    from lavis_c2f.models.grounder.vocab import count_tokens, write_counts

    b = make_batch([10, 8, 12, 9], [5, 4, 7, 3],
                   [[[4.0, 10.0]], [[0.0, 4.0]], [[10.0, 20.0]], [[6.0, 12.0]]],
                   vids=["va", "va", "vb", "vc"])
    counts, n = count_tokens(b["query"], "clip")
    counts_path = write_counts(counts, n, "clip", str(tmp_path / "counts.json"))
    cfg = tiny_mesm_config(text_encoder={"checkpoint": tiny_openai_tower, "max_words_l": 16},
                           vocab_counts=counts_path, fw_tokenizer="clip", fw_mask_level=level)
    del cfg["txt_dim"]
    torch.manual_seed(0)
    np.random.seed(0)
    model = C2FMESMQDDETR.from_config(cfg)
    enc = model.detr.text_encoder
    assert model.detr.txt_dim == enc.hidden_size == 64 and enc.checkpoint == tiny_openai_tower
    del b["src_txt"]
    model.train()
    out = model(b)
    assert torch.isfinite(out["loss"]) and out["fw_aligned_frac"] == 1.0
    out["loss"].backward()
    assert model.detr.fw_mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
    # the tower is causal: a row does not depend on the tokens after it
    ids, mask, _ = enc.tokenize(["a person opens the door", "a person"])
    feats = enc.encode(ids, mask)
    torch.testing.assert_close(feats[1, :2], feats[0, :2])
    path = model.save_checkpoint(str(tmp_path / "mesm.pth"))
    assert not any(k.startswith("detr.text_encoder.") for k in torch.load(path, weights_only=True)["model"])
    model.eval()
    rebuilt = C2FMESMQDDETR.from_checkpoint(path)
    rebuilt.eval()
    assert rebuilt.predict_batch(b) == model.predict_batch(b)


def test_text_encoder_config_needs_one_source(tiny_openai_tower, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of"):
        C2FMESMQDDETR.from_config(tiny_mesm_config(text_encoder={"max_words_l": 16}))
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(2)}, bad)
    with pytest.raises(ConfigError, match="not an OpenAI-layout"):
        C2FMESMQDDETR.from_config(tiny_mesm_config(text_encoder={"checkpoint": str(bad)}))
