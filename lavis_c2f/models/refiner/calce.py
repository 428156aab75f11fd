"""CALCE's model inputs, teacher forcing and generation: the one public path of the refiner.

Used alike by the refiner's dataset/training (:meth:`C2FCaptionRefiner.forward`), the pipeline
hook (:class:`~lavis_c2f.models.refiner.hook.CaptionRefiner`, hence the corpus task and the
predictor) and the fixture tests. ``model`` is a :class:`C2FCaptionRefiner` built with
``variant: calce`` (for instance by :func:`lavis_c2f.models.refiner.load_calce_checkpoint`).

T5 encoder input of one sample (:func:`build_calce_inputs`), ``L = video + subtitle + text``::

    video     for each kept frame i: its frame tokens (32 rows if key, 8 if not), then the T5
              ids of int(round(t_i)) (annoying numbers replaced, a leading lone ▁ dropped);
              then ▁> (2490), the duration's ids, <extra_id_0>
    subtitle  for each selected subtitle: ▁[ start-ids text-ids end-ids ]; then <extra_id_1>
              (no subtitle survives: one entry {start -1, end -1, "*None*"})
    text      T5TokenizerFast(calce_text_prompt(...)) with </s> (at most max_txt_len ids)

Frame tokens: the Q-Former output ``x`` (32, H) of a key frame becomes ``t5_proj(x)``; of a
non-key frame ``t5_proj(query_proj(x^T)^T)`` (``query_proj``: Linear 32 -> 8 along the token
axis). Key frames: :mod:`~lavis_c2f.models.refiner.calce_keyframes`. Subtitles: CALCE's ``.srt``
rules (:mod:`~lavis_c2f.models.refiner.calce_text`), then the top ``subtitle_topk`` by cosine
similarity of the Q-Former text-path CLS vectors of the query (``"query\\n"``) and of each
subtitle (BERT ids padded to ``max_txt_len``), in descending similarity, kept when
``> subtitle_threshold``.

Randomness: each DPC-KNN call draws one ``torch.rand`` (stage 1: one call, stage 2: two) and
the stage-2 frame budget may draw more, all on the global generator, in that order. Call
``torch.manual_seed(s)`` right before :func:`build_calce_inputs` to reproduce a result (the
official code is nondeterministic there unless seeded).

Batches: :func:`collate_calce_inputs` pads as the official code does (video and subtitle parts
on the left with zero vectors, the text part on the right with the pad token); clustering is
always per video (the official code couples the videos of a batch there; it trains and
evaluates with batch size 1).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from lavis_c2f.models.refiner.calce_keyframes import stage1_key_frames, stage2_key_frames
from lavis_c2f.models.refiner.calce_text import (NO_SUBTITLE, calce_int, calce_post_process, calce_subtitles,
                                                 calce_target_text, calce_text_prompt)

__all__ = ["build_calce_inputs", "collate_calce_inputs", "calce_teacher_forcing", "calce_generate",
           "calce_post_process", "FRAME_ROW", "PAD_ROW"]

FRAME_ROW = -1   # input_ids value of a frame-token row
PAD_ROW = -100   # input_ids value of a zero-vector padding row (batches only)
SIGN_DURATION, SIGN_VIDEO_END = ">", "<extra_id_0>"
SIGN_SUB_START, SIGN_SUB_END, SIGN_SUBTITLES_END = "[", "]", "<extra_id_1>"


# =========================================================================== token ids
def _sign_ids(model: Any, word: str) -> List[int]:
    """Ids of a separator as CALCE's ``word_embedding`` makes them (every lone ▁ removed)."""
    return [t for t in model.t5_tokenizer(word, add_special_tokens=False).input_ids if t != 3]


def _number_ids(model: Any, n: int) -> List[int]:
    """Ids of ``str(n)`` without special tokens, a leading lone ▁ (3) dropped (cached)."""
    cache = model.__dict__.setdefault("_calce_number_ids", {})
    if n not in cache:
        ids = model.t5_tokenizer(str(n), add_special_tokens=False)["input_ids"]
        cache[n] = ids[1:] if ids and ids[0] == 3 else ids
    return cache[n]


def _autocast(model: Any, dtype: Optional[torch.dtype]):
    if dtype is None or model.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


# =========================================================================== subtitles
@torch.no_grad()
def select_subtitles(model: Any, query: str, subtitles: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """CALCE's subtitle choice: the ``subtitle_topk`` subtitles most similar to the query by the
    Q-Former text path's CLS vectors, in descending similarity, with similarity
    ``> subtitle_threshold``; ``[NO_SUBTITLE]`` when none is left."""
    s = model.calce
    if not subtitles:
        return [dict(NO_SUBTITLE)]
    dev = model.device

    def cls(texts: List[str]) -> torch.Tensor:
        tok = model.tokenizer(texts, padding="max_length", truncation=True, max_length=s.max_txt_len,
                              return_tensors="pt").to(dev)
        out = model.Qformer.bert(tok.input_ids, attention_mask=tok.attention_mask, return_dict=True)
        return out.last_hidden_state[:, 0, :]

    sims = F.cosine_similarity(cls([query + "\n"]), cls([x["text"] for x in subtitles]))
    order = torch.argsort(sims, descending=True)[:s.subtitle_topk]
    chosen = [dict(subtitles[int(i)]) for i in order if sims[i] > s.subtitle_threshold]
    return chosen or [dict(NO_SUBTITLE)]


# =========================================================================== inputs
def _as_list(x: Any) -> List[float]:
    if isinstance(x, torch.Tensor):
        return [float(v) for v in x.reshape(-1).tolist()]
    return [float(v) for v in x]


def build_calce_inputs(model: Any, frames: torch.Tensor, timestamps: Any, duration: float, query: str,
                       items: Optional[Sequence[str]], srt_text: Optional[str],
                       coarse_windows: Optional[Sequence[Sequence[float]]] = None, *,
                       srt_path: str = "<srt>") -> Dict[str, Any]:
    """CALCE's T5 encoder input of one (query, video) pair (module doc).

    Args:
        model: a ``variant: calce`` refiner (stage 1 or 2).
        frames: (T, 3, S, S) processor output (BLIP mean/std normalised), in time order.
        timestamps: (T,) seconds of the frames (as the dataset passes them; rounded here).
        duration: video length in seconds.
        query: the query text.
        items: the query's items (noun phrases); ``[]`` is the explicit "no items" prompt.
        srt_text: the ``.srt`` text of the video, or None / "" (no speech).
        coarse_windows: stage 2 only: the coarse windows ``[[s, e], ...]`` seconds (written in
            the prompt as ``ref: <str(coarse_windows)>``).
        srt_path: named in errors about ``srt_text``.
    Returns:
        ``input_ids`` (L,) long (T5 id per row, :data:`FRAME_ROW` at frame rows),
        ``inputs_embeds`` (L, d_t5) float32, ``attention_mask`` (L,) long (all ones),
        ``key_frame_idx``, ``non_key_frame_idx``, ``kept_frame_idx`` (frame indices 0..T-1),
        ``part_lens`` [video, subtitle, text], ``subtitles`` (the selected ones),
        ``prompt_timestamps`` (seconds of the kept frames), ``text_prompt``, ``duration``.
    """
    s = model.calce
    if items is None and s.use_items:
        raise ValueError("build_calce_inputs: items is None; pass the query's items, or [] for the "
                         "explicit no-items prompt")
    if s.stage == 2 and coarse_windows is None:
        raise ValueError("build_calce_inputs: a stage-2 CALCE model needs coarse_windows")
    if s.stage == 1 and coarse_windows is not None:
        raise ValueError("build_calce_inputs: a stage-1 CALCE model takes no coarse_windows")
    if frames.dim() != 4:
        raise ValueError(f"frames must be (T, 3, S, S), got {tuple(frames.shape)}")
    times = _as_list(timestamps)
    t = frames.shape[0]
    if len(times) != t:
        raise ValueError(f"{t} frames but {len(times)} timestamps")
    if not duration or float(duration) <= 0:
        raise ValueError(f"duration must be positive, got {duration!r}")
    dev = model.device
    subtitles, sub_durations = calce_subtitles(srt_text, srt_path)
    query_prompt = "Query: " + query + "\n"

    with _autocast(model, model.vit_autocast_dtype):
        video_embeds = model.ln_vision(model.visual_encoder(frames.to(dev, model.vit_dtype)))   # (T, N, C)
    if s.stage == 1:
        sel = stage1_key_frames(video_embeds.mean(dim=1).clone(), query_prompt, sub_durations, duration,
                                s.num_clusters, s.cluster_k, s.bias1, s.talk_keywords)
    with _autocast(model, model.vit_autocast_dtype):
        atts = torch.ones(video_embeds.shape[:-1], dtype=torch.long, device=dev)
        q_out = model.Qformer.bert(query_embeds=model.query_tokens.expand(t, -1, -1),
                                   encoder_hidden_states=video_embeds, encoder_attention_mask=atts,
                                   return_dict=True).last_hidden_state                     # (T, Q, H)
    if s.stage == 2:
        feats = F.normalize(q_out, dim=-1).reshape(t, -1).detach()
        sel = stage2_key_frames(feats, times, coarse_windows, query_prompt, sub_durations, duration,
                                s.num_clusters, s.cluster_k, s.bias1, s.bias2, s.top_labels, s.talk_keywords)
    key_idx, non_idx, kept = sel["key_frame_idx"], sel["non_key_frame_idx"], sel["kept_frame_idx"]
    with _autocast(model, model.vit_autocast_dtype):
        key_tok = model.t5_proj(q_out[key_idx])
        non_tok = model.t5_proj(model.query_proj(q_out[non_idx].transpose(-1, -2)).transpose(-1, -2))
    tokens = {i: key_tok[j] for j, i in enumerate(key_idx)}
    tokens.update({i: non_tok[j] for j, i in enumerate(non_idx)})

    table = model.annoying_table
    ids: List[int] = []
    frame_rows: List[tuple] = []        # (row offset, frame index)
    prompt_times = [times[i] for i in kept]
    for i in kept:
        frame_rows.append((len(ids), i))
        ids.extend([FRAME_ROW] * tokens[i].shape[0])
        ids.extend(_number_ids(model, calce_int(times[i], table)))
    ids.extend(_sign_ids(model, SIGN_DURATION))
    ids.extend(_number_ids(model, calce_int(float(duration), table)))
    ids.extend(_sign_ids(model, SIGN_VIDEO_END))
    n_video = len(ids)

    chosen = select_subtitles(model, query, subtitles)
    for sub in chosen:
        text_ids = model.t5_tokenizer([sub["text"]], truncation=True, max_length=s.max_txt_len,
                                      add_special_tokens=False)["input_ids"][0]
        ids.extend(_sign_ids(model, SIGN_SUB_START))
        ids.extend(_number_ids(model, calce_int(float(sub["start"]), table)))
        ids.extend(text_ids)
        ids.extend(_number_ids(model, calce_int(float(sub["end"]), table)))
        ids.extend(_sign_ids(model, SIGN_SUB_END))
    ids.extend(_sign_ids(model, SIGN_SUBTITLES_END))
    n_sub = len(ids) - n_video

    text_prompt = calce_text_prompt(query, list(items) if s.use_items else None, coarse_windows)
    text_ids = model.t5_tokenizer(text_prompt, truncation=True, max_length=s.max_txt_len)["input_ids"]
    ids.extend(text_ids)

    input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
    tok_emb = model.t5_model.get_input_embeddings()(input_ids.clamp(min=0)).float()
    pieces, cursor = [], 0
    for row, i in frame_rows:
        pieces += [tok_emb[cursor:row], tokens[i].float()]
        cursor = row + tokens[i].shape[0]
    embeds = torch.cat(pieces + [tok_emb[cursor:]], dim=0)
    return {"input_ids": input_ids, "inputs_embeds": embeds,
            "attention_mask": torch.ones(len(ids), dtype=torch.long, device=dev),
            "key_frame_idx": key_idx, "non_key_frame_idx": non_idx, "kept_frame_idx": kept,
            "part_lens": [n_video, n_sub, len(text_ids)], "subtitles": chosen,
            "prompt_timestamps": prompt_times, "text_prompt": text_prompt, "duration": duration}


def collate_calce_inputs(inputs: Sequence[Mapping[str, Any]], pad_token_id: int = 0,
                         pad_embedding: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Stack per-sample inputs as the official ``mr_prompt_concatenation`` batches them: the video
    and subtitle parts padded on the left with zero vectors (``input_ids`` :data:`PAD_ROW`), the
    text part on the right with the pad token (``pad_embedding`` (d,), its T5 embedding).
    Returns ``input_ids`` (B, L), ``inputs_embeds`` (B, L, d), ``attention_mask`` (B, L)."""
    if not inputs:
        raise ValueError("collate_calce_inputs: empty batch")
    d = inputs[0]["inputs_embeds"].shape[-1]
    dev = inputs[0]["inputs_embeds"].device
    if pad_embedding is None:
        pad_embedding = torch.zeros(d, device=dev)
    parts = []
    for x in inputs:
        lens = x["part_lens"]
        if sum(lens) != x["input_ids"].shape[0]:
            raise ValueError(f"part_lens {lens} do not add up to {x['input_ids'].shape[0]} rows")
        cuts = [0, lens[0], lens[0] + lens[1], sum(lens)]
        parts.append([(x["input_ids"][a:b], x["inputs_embeds"][a:b]) for a, b in zip(cuts, cuts[1:])])
    ids_out, emb_out, att_out = [], [], []
    for p in range(3):
        width = max(pp[p][0].shape[0] for pp in parts)
        ids_p, emb_p, att_p = [], [], []
        for pp in parts:
            i, e = pp[p]
            n = width - i.shape[0]
            pad_ids = torch.full((n,), PAD_ROW if p < 2 else pad_token_id, dtype=torch.long, device=dev)
            pad_emb = (torch.zeros(n, d, device=dev) if p < 2 else pad_embedding.to(dev).float().expand(n, d))
            ones, zeros = torch.ones(i.shape[0], dtype=torch.long, device=dev), torch.zeros(n, dtype=torch.long, device=dev)
            if p < 2:
                ids_p.append(torch.cat([pad_ids, i])), emb_p.append(torch.cat([pad_emb, e]))
                att_p.append(torch.cat([zeros, ones]))
            else:
                ids_p.append(torch.cat([i, pad_ids])), emb_p.append(torch.cat([e, pad_emb]))
                att_p.append(torch.cat([ones, zeros]))
        ids_out.append(torch.stack(ids_p)), emb_out.append(torch.stack(emb_p)), att_out.append(torch.stack(att_p))
    return {"input_ids": torch.cat(ids_out, 1), "inputs_embeds": torch.cat(emb_out, 1),
            "attention_mask": torch.cat(att_out, 1)}


def _batched(model: Any, inputs: Mapping[str, Any]):
    emb = inputs["inputs_embeds"]
    if emb.dim() == 2:
        return emb[None], inputs["attention_mask"][None], False
    return emb, inputs["attention_mask"], True


# =========================================================================== T5
def calce_teacher_forcing(model: Any, inputs: Mapping[str, Any], target_text: Union[str, Sequence[Any]]
                          ) -> Dict[str, torch.Tensor]:
    """CALCE's training loss: T5 cross-entropy of the answer (annoying numbers replaced, ``</s>``
    appended, pads ignored; decoder input = labels shifted right with start id 0).

    Args:
        inputs: one sample's :func:`build_calce_inputs` output, or a :func:`collate_calce_inputs`
            batch.
        target_text: the answer (``"[[40, 72], [96, 110]]"`` or the windows themselves), one per
            sample for a batch.
    Returns:
        ``{"loss": scalar, "logits": (labels_len, vocab)}`` ((B, labels_len, vocab) for a batch).
    """
    emb, att, batched = _batched(model, inputs)
    texts = list(target_text) if batched else [target_text]
    if len(texts) != emb.shape[0]:
        raise ValueError(f"{len(texts)} targets for a batch of {emb.shape[0]}")
    texts = [calce_target_text(x, model.annoying_table) for x in texts]
    tok = model.t5_tokenizer(texts, padding="longest", truncation=True, max_length=model.calce.max_txt_len,
                             return_tensors="pt").to(emb.device)
    labels = tok.input_ids.masked_fill(tok.input_ids == model.t5_tokenizer.pad_token_id, -100)
    with _autocast(model, model.t5_autocast_dtype):
        out = model.t5_model(inputs_embeds=emb, attention_mask=att, decoder_attention_mask=tok.attention_mask,
                             labels=labels, return_dict=True)
    return {"loss": out.loss, "logits": out.logits if batched else out.logits[0]}


def calce_generate_output(model: Any, inputs: Mapping[str, Any], num_beams: int = 5, max_new_tokens: int = 70,
                          min_length: int = 1, repetition_penalty: float = 1.0, length_penalty: float = 1.0):
    """The HuggingFace ``generate`` output (``sequences``, ``scores``, ``sequences_scores`` with
    beams) of CALCE's ``generate`` call (no sampling, ``num_return_sequences`` 1)."""
    emb, att, _ = _batched(model, inputs)
    with torch.no_grad(), _autocast(model, model.t5_autocast_dtype):
        return model.t5_model.generate(
            inputs_embeds=emb, attention_mask=att, do_sample=False, top_p=0.9, temperature=1,
            num_beams=int(num_beams), max_new_tokens=int(max_new_tokens), min_length=int(min_length),
            repetition_penalty=float(repetition_penalty), length_penalty=float(length_penalty),
            num_return_sequences=1, return_dict_in_generate=True, output_scores=True)


def calce_generate(model: Any, inputs: Mapping[str, Any], num_beams: int = 5, max_new_tokens: int = 70,
                   min_length: int = 1, repetition_penalty: float = 1.0, length_penalty: float = 1.0
                   ) -> torch.Tensor:
    """Generated ids, starting with the decoder start id, as the official ``generate`` returns them
    (defaults: the official ones, 5 beams, 70 new tokens). (L,) for one sample, (B, L) for a
    batch. Decode with ``model.t5_tokenizer.batch_decode(ids, skip_special_tokens=True)`` and
    parse with :func:`calce_post_process`."""
    out = calce_generate_output(model, inputs, num_beams, max_new_tokens, min_length, repetition_penalty,
                                length_penalty)
    return out.sequences if inputs["inputs_embeds"].dim() == 3 else out.sequences[0]
