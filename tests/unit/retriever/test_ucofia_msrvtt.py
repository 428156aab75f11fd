"""UCoFiA through the project: projects/c2f/msrvtt_ucofia.yaml on generated MSR-VTT-style videos
with the reference fixture's small CLIP (28 px frames, 12 slots at 1 fps).

* evaluation (evaluate.py's main): SK-norm with the bank = every training sentence, biases once
  for the test videos; the metrics equal the model API's ``ucofia_scores`` on the same inputs;
* training (train.py's main): two BertAdam steps from the released-layout fixture checkpoint.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from frames_helpers import write_msrvtt_corpus

PROJECT = str(Path(__file__).resolve().parents[3] / "projects" / "c2f" / "msrvtt_ucofia.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, reference_fixture):
    ref = reference_fixture("ucofia_reference", "pytorch_model.bin.0")
    root = tmp_path_factory.mktemp("msrvtt_ucofia")
    write_msrvtt_corpus(root, ["video0", "video1"], ["video7", "video8", "video9"])
    opts = [f"model.checkpoint={ref / 'pytorch_model.bin.0'}", f"model.clip_weights={ref / 'clip_pretrained.pt'}",
            f"datasets.c2f_msrvtt.data_root={root}", "datasets.c2f_msrvtt.image_size=28", "run.device=cpu",
            "run.num_workers=0", "run.video_loader_workers=0", f"run.output_dir={root / 'out'}"]
    return ref, root, opts


def _summary(out: Path) -> dict:
    (job,) = [p for p in out.iterdir() if p.is_dir()]
    return json.loads((job / "summary.json").read_text()), job


def test_msrvtt_evaluation_with_sk_norm_equals_the_model_api(setup):
    from lavis_c2f.datasets.frames_builders import MSRVTTBuilder
    from lavis_c2f.evaluation.retrieval import retrieval_metrics
    from lavis_c2f.launch import evaluate_main
    from lavis_c2f.models.retriever import load_ucofia_checkpoint

    ref, root, opts = setup
    assert evaluate_main(["--cfg-path", PROJECT, "--options", *opts, f"run.output_dir={root / 'eval'}"]) == 0
    summary, job = _summary(root / "eval")
    m = json.loads((job / "result" / "test_best_metrics.json").read_text())
    assert m["num_queries"] == 3 and m["num_videos"] == 3 and m["sinkhorn_bank"] == "train"

    # the same through the API: bank = the 4 training sentences, bias once for the 3 test videos
    model = load_ucofia_checkpoint(str(ref / "pytorch_model.bin.0"), str(ref / "clip_pretrained.pt"),
                                   topk_noise_seed=0)
    cfg = {"type": "default", "dataset_type": "video_frames", "data_root": str(root),
           "annotations": {"train": {"path": "MSRVTT_train.9k.csv", "format": "msrvtt_train",
                                     "data_json": "MSRVTT_data.json"},
                           "test": {"path": "MSRVTT_JSFUSION_test.csv", "format": "msrvtt_test"}},
           "videos": {"path": "videos", "key_format": ["{vid}.mp4"]},
           "frames": {"kind": "fps", "num_frames": 12, "sample_fps": 1, "slice_mode": "uniform"},
           "image_size": 28, "train_transform": "eval",
           "tokenizer": {"kind": "clip4clip", "path": None, "max_words": 32, "padding": "max_length"}}
    ds = MSRVTTBuilder(cfg).build_datasets()
    train, test = ds["train"], ds["test"]
    with torch.no_grad():
        video = model.encode_video_batch(test.video_batch(list(range(test.num_videos))))
        bank = model.encode_text_batch(train.query_batch(list(range(len(train)))))
        q = test.query_batch(list(range(len(test))))
        sim = model.ucofia_scores(model.encode_text_batch(q), video, bank=bank)
    assert len(bank) == 4 and int(video.mask.sum(1)[0]) == 2          # 1.2 s at 1 fps: 2 of 12 frames
    ours = retrieval_metrics(sim.numpy(), q["gt_video_index"].numpy())
    for direction in ("t2v", "v2t"):
        for k in ("R@1", "R@5", "MdR", "MnR"):
            assert m["model"][direction][k] == pytest.approx(ours[direction][k]), (direction, k)
    ranks = [json.loads(line) for line in (job / "result" / "test_best_ranks.jsonl").read_text().splitlines()]
    order = np.argsort(-sim.numpy(), axis=1, kind="stable")
    assert [r["ranked_vids"][0][0] for r in ranks] == [test.videos[i] for i in order[:, 0]]


def test_two_training_steps_from_the_fixture_checkpoint(setup):
    from lavis_c2f.launch import train_main
    from lavis_c2f.models.retriever import load_ucofia_checkpoint

    ref, root, opts = setup
    argv = ["--cfg-path", PROJECT, "--options", *opts, f"run.output_dir={root / 'train'}", "run.max_epoch=1",
            "run.batch_size_train=2", "run.test_splits=[]", "datasets.c2f_msrvtt.splits=[train]"]
    assert train_main(argv) == 0                                       # 4 training pairs, batch 2: 2 steps
    _, job = _summary(root / "train")
    ckpt = torch.load(job / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    start = load_ucofia_checkpoint(str(ref / "pytorch_model.bin.0"), str(ref / "clip_pretrained.pt")).state_dict()
    sd = ckpt["model"]
    assert set(sd) == set(start) and ckpt["config"]["run"]["lr_sched"] == "c2f_bertadam_warmup_cosine"
    # the first BertAdam step has lr 0 (warm-up from 0), the second moves the weights
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(sd[k], start[k])]
    assert "global_mat_weight" in moved and "clip.model.vision_model.embeddings.patch_embedding.weight" in moved
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert float(sd["clip.model.logit_scale"]) <= np.log(100.0) + 1e-6
    # unused official parameters (buffers) never change
    assert torch.equal(sd["word_logit_weight"], start["word_logit_weight"])
    # the run's checkpoint loads strictly into the model the YAML builds from CLIP alone
    # (what evaluate.py --options run.checkpoint=... does)
    from lavis_c2f.models.checkpoint import load_model_weights
    from lavis_c2f.models.retriever import C2FUCoFiA

    fresh = C2FUCoFiA.from_config({**ckpt["config"]["model"], "checkpoint": None})
    load_model_weights(fresh, job / "checkpoint_latest.pth")
    assert torch.equal(fresh.state_dict()["global_mat_weight"], sd["global_mat_weight"])
