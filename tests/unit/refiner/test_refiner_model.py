"""The tiny refiner end to end on CPU: build from local folders, forward/backward, generate,
prediction rows, fine-tuning modes, checkpoints, configuration errors, no network."""
import os
import shutil
import socket

import pytest
import torch

from lavis_c2f.common.errors import CheckpointMismatchError, ConfigError
from lavis_c2f.models.refiner.srt import Caption
from lavis_c2f.testing.tiny_refiner import build_tiny_refiner, tiny_refiner_config


def make_batch(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return {
        "frames": torch.randn(2, 3, 3, size, size, generator=g),
        "frame_mask": torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float32),
        "frame_times": [[2.0, 6.0, 10.0], [1.0, 5.0]],
        "qid": [1, 2], "query": ["a man talks", "a dog runs"], "vid": ["v1", "v2"],
        "duration": torch.tensor([20.0, 30.0]), "region": torch.tensor([[0.0, 12.0], [0.0, 8.0]]),
        "stage2_windows": [[[2.0, 8.0, 0.9], [14.0, 18.0, 0.3]], []],
        "stage2_saliency": [[0.1, 0.2], None],
        "captions": [[Caption(3, 5, "hello there")], []],
        "target_windows": [[(4.0, 8.0)], []],
        "n_ref_windows": [1, 1],
    }


def test_forward_backward_only_trainable_get_gradients(tiny_root):
    model = build_tiny_refiner(tiny_root).train()
    out = model(make_batch())
    assert set(out) == {"loss"} and torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    assert model.t5_proj.weight.grad.abs().sum() > 0
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B.default.weight")]
    assert lora_b and all(p.grad is not None for p in lora_b) and any(p.grad.abs().sum() > 0 for p in lora_b)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_modes_requires_grad_sets(tiny_root):
    lora = build_tiny_refiner(tiny_root, finetune="lora")
    names = _trainable(lora)      # CALCE's qformer_freeze_lora: LoRA + t5_proj + ln_vision
    assert names == {n for n in names if n.startswith(("t5_proj.", "ln_vision."))
                     or n.endswith(("lora_A.default.weight", "lora_B.default.weight"))}
    assert {"t5_proj.weight", "t5_proj.bias", "ln_vision.weight", "ln_vision.bias"} <= names
    assert len(lora.lora_layers) == 36  # 2 encoder blocks x 7 + 2 decoder blocks x 11 linear layers
    assert all(n.startswith("t5_model.base_model.model.") for n in names if "lora" in n)

    qf = build_tiny_refiner(tiny_root, finetune="qformer")
    names = _trainable(qf)
    assert names == {n for n, _ in qf.named_parameters()
                     if n.startswith(("Qformer.", "ln_vision.", "t5_proj.")) or n == "query_tokens"}
    assert not any(n.startswith(("t5_model.", "visual_encoder.")) for n in names) and qf.lora_layers == []

    both = build_tiny_refiner(tiny_root, finetune="lora_qformer")
    names = _trainable(both)
    assert any(n.startswith("Qformer.") for n in names) and any(n.endswith("lora_B.default.weight") for n in names)
    assert not any(n.startswith("visual_encoder.") for n in names)
    assert not any(n.startswith("t5_model.") and "lora" not in n for n in names)

    assert _trainable(build_tiny_refiner(tiny_root, finetune="none")) == set()
    unfrozen = build_tiny_refiner(tiny_root, finetune="qformer", freeze_vit=False)
    assert any(n.startswith("visual_encoder.") for n in _trainable(unfrozen))


def test_interleaved_inputs_layout(tiny_model):
    batch = make_batch()
    inputs, att, prompts = tiny_model.build_inputs(batch)
    q = tiny_model.num_query_token
    assert inputs.shape[0] == 2 and inputs.shape[-1] == tiny_model.t5_model.config.d_model
    tok = tiny_model.t5_tokenizer
    for i, p in enumerate(prompts):
        n_frames = sum(isinstance(s, int) for s in p.segments)
        n_text = sum(len(tok(s, add_special_tokens=False).input_ids) for s in p.segments if isinstance(s, str))
        assert int(att[i].sum()) == n_frames * q + n_text + 1  # + </s>
        assert att[i, : int(att[i].sum())].all() and not att[i, int(att[i].sum()):].any()  # right padding
    with torch.no_grad():
        first = tiny_model.encode_frames(batch["frames"][0, :1])[0]
    torch.testing.assert_close(inputs[0, :q], first)  # the prompt starts with frame 0
    assert prompts[0].text.startswith('<frame> t=2s speech: "hello there" <frame> t=6s')
    assert "Coarse windows: [[2, 8]]" in prompts[0].text
    bad = make_batch()
    bad["frame_times"][1] = [1.0]
    with pytest.raises(ValueError, match="frame_mask"):
        tiny_model.build_inputs(bad)


def test_generate_and_batch_independence(tiny_model):
    batch = make_batch()
    texts, conf = tiny_model.generate_text(batch)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert all(0.0 < c <= 1.0 for c in conf)
    for i in range(2):
        single = {k: (v[i:i + 1] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()}
        n = int(batch["frame_mask"][i].sum())
        single["frames"] = single["frames"][:, :n]
        single["frame_mask"] = single["frame_mask"][:, :n]
        t1, _ = tiny_model.generate_text(single)
        assert t1[0] == texts[i]
    greedy, gconf = tiny_model.generate_text(batch, num_beams=1)
    assert len(greedy) == 2 and all(0.0 < c <= 1.0 for c in gconf)


def test_predict_batch_rows_and_fallback_counter(tiny_model):
    batch = make_batch()
    tiny_model.refine_stats.reset()
    tiny_model.train()
    with pytest.raises(RuntimeError, match="eval"):
        tiny_model.predict_batch(batch)
    tiny_model.eval()
    texts, conf = tiny_model.generate_text(batch)
    rows = tiny_model.predict_batch(batch)
    assert [r["qid"] for r in rows] == [1, 2] and rows[0]["vid"] == "v1"
    assert rows[0]["pred_saliency_scores"] == [0.1, 0.2] and "pred_saliency_scores" not in rows[1]
    for r in rows:
        for st, ed, s in r["pred_relevant_windows"]:
            assert st < ed
    stats = tiny_model.refine_stats
    assert stats.n_total == 2
    # the untrained model's text decides: refined or fell back, never a crash
    from lavis_c2f.models.refiner.parsing import parse_windows
    n_ok = sum(parse_windows(t, float(d)).ok for t, d in zip(texts, batch["duration"]))
    assert stats.n_refined == n_ok and stats.n_fallback == 2 - n_ok


def test_refine_rows_refined_and_fallback(tiny_model):
    batch = make_batch()
    tiny_model.refine_stats.reset()
    rows, results = tiny_model.refine_rows(batch, ["[[4, 8]]", "garbage"], [0.5, 0.5])
    assert results[0].ok and not results[1].ok
    assert rows[0][0] == [4.0, 8.0, 0.9]  # score_mode stage2: the best stage-2 score
    assert [w[:2] for w in rows[0][1:]] == [[2.0, 8.0], [14.0, 18.0]]  # stage-2 tail, lower scores
    assert rows[1] == [[0.0, 8.0, 0.0]]  # no stage-2 windows: the search region, score 0
    assert tiny_model.refine_stats.as_dict()["fallback_reasons"] == {"no_windows": 1}
    rows, _ = tiny_model.refine_rows(batch, ["[[30, 12]]", "[]"], [1.0, 1.0])
    assert rows[0] == [[2.0, 8.0, 0.9], [14.0, 18.0, 0.3]]  # reversed window: stage 2 kept


def test_training_steps_reduce_loss(tiny_root):
    torch.manual_seed(0)
    model = build_tiny_refiner(tiny_root, finetune="lora_qformer").train()
    batch = make_batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_overfit_one_sample(tiny_root):
    torch.manual_seed(0)
    model = build_tiny_refiner(tiny_root, finetune="lora_qformer", lora={"r": 8, "alpha": 16.0, "dropout": 0.0})
    batch = make_batch()
    batch = {k: (v[:1] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    first = None
    for _ in range(60):
        loss = model(batch)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    model.eval()
    texts, _ = model.generate_text(batch, num_beams=1)
    assert texts[0].replace(" ", "") == "[[4,8]]"
    rows = model.predict_batch(batch)
    assert rows[0]["pred_relevant_windows"][0][:2] == [4.0, 8.0] and model.refine_stats.n_refined == 1


def test_checkpoints_roundtrip(tiny_root, tmp_path):
    a = build_tiny_refiner(tiny_root, seed=0)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n.endswith("lora_B.default.weight"):
                p.normal_()
    path = tmp_path / "refiner.pth"
    torch.save({"model": a.trainable_state_dict()}, path)
    saved = set(a.trainable_state_dict())     # LAVIS's rule: trainable + tied aliases and buffers
    assert _trainable(a) <= saved
    assert saved - _trainable(a) == {"t5_model.base_model.model.encoder.embed_tokens.weight",
                                     "t5_model.base_model.model.decoder.embed_tokens.weight",
                                     "Qformer.bert.embeddings.position_ids"}
    b = build_tiny_refiner(tiny_root, seed=1)
    b.load_checkpoint(str(path))
    for n, p in a.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(dict(b.named_parameters())[n], p)
    torch.save({"model": {**a.trainable_state_dict(), "nonsense.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"bad\.pth.*\n  unexpected keys \(1\): nonsense\.weight"):
        b.load_checkpoint(str(tmp_path / "bad.pth"))
    partial = {k: v for k, v in a.trainable_state_dict().items() if "t5_proj" not in k}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(\d+\): t5_proj\."):
        b.load_checkpoint(str(tmp_path / "partial.pth"))


def test_blip2_checkpoint_loading(tiny_root, tmp_path):
    a = build_tiny_refiner(tiny_root, seed=0)
    keep = a.BLIP2_REQUIRED
    state = {k: v for k, v in a.state_dict().items() if k.startswith(keep)}
    state["visual_encoder.unused_extra"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "blip2.pth")
    cfg = tiny_refiner_config(tiny_root, seed=1, load_pretrained=True, pretrained=str(tmp_path / "blip2.pth"))
    torch.manual_seed(1)
    from lavis_c2f.models.refiner.model import C2FCaptionRefiner
    b = C2FCaptionRefiner.from_config(cfg)
    torch.testing.assert_close(b.query_tokens, a.query_tokens)
    torch.testing.assert_close(b.t5_proj.weight, a.t5_proj.weight)
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("Qformer.")}}, tmp_path / "x.pth")
    with pytest.raises(ConfigError, match="not a BLIP-2 checkpoint"):
        b.load_blip2_checkpoint(str(tmp_path / "x.pth"))
    with pytest.raises(ConfigError, match="pretrained"):
        b.load_blip2_checkpoint(str(tmp_path / "missing.pth"))


def test_missing_local_paths_raise_clear_errors(tiny_root, tmp_path):
    from lavis_c2f.models.refiner.model import C2FCaptionRefiner

    def build(**kw):
        return C2FCaptionRefiner.from_config(tiny_refiner_config(tiny_root, **kw))

    with pytest.raises(ConfigError, match=r"model\.bert_dir: directory not found: .*nowhere"):
        build(bert_dir=str(tmp_path / "nowhere"))
    t5_no_weights = tmp_path / "t5"
    t5_no_weights.mkdir()
    for f in ("config.json", "tokenizer.json", "spiece.model"):
        shutil.copy(os.path.join(tiny_root, "t5", f), t5_no_weights / f)
    with pytest.raises(ConfigError, match=r"model\.t5_dir: .* has none of \['pytorch_model.bin'"):
        build(t5_dir=str(t5_no_weights))
    with pytest.raises(ConfigError, match=r"model\.vit_checkpoint: missing"):
        build(vit_arch=None, vit_checkpoint=None)
    with pytest.raises(ConfigError, match=r"model\.vit_checkpoint: file not found: .*eva_vit_g.pth"):
        build(vit_arch=None, vit_checkpoint=str(tmp_path / "eva_vit_g.pth"))
    cfg = tiny_refiner_config(tiny_root)
    cfg.pop("bert_dir")
    with pytest.raises(ConfigError, match=r"model\.bert_dir: missing"):
        C2FCaptionRefiner.from_config(cfg)
    with pytest.raises(ConfigError, match="unknown key"):
        build(t5_model="google/flan-t5-xl")
    with pytest.raises(ConfigError, match="finetune"):
        build(finetune="full")
    with pytest.raises(ConfigError, match=r"model\.lora: unknown"):
        build(lora={"rank": 4})


def test_build_needs_no_network(tiny_root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = build_tiny_refiner(tiny_root).eval()
    texts, _ = model.generate_text(make_batch())
    assert len(texts) == 2


def test_registered_and_yaml_config():
    from lavis.common.registry import registry

    from lavis_c2f.models.refiner import ensure_registered
    from lavis_c2f.models.refiner.model import C2FCaptionRefiner

    ensure_registered()
    assert registry.get_model_class("c2f_caption_refiner") is C2FCaptionRefiner
    assert registry.get_builder_class("c2f_refiner") is not None
    for mt in ("tiny", "qvh_flant5xl"):
        assert os.path.isfile(C2FCaptionRefiner.default_config_path(mt))
    with pytest.raises(ConfigError):
        C2FCaptionRefiner.default_config_path("nope")
