"""Streamlit script of ``lavis-c2f demo`` (start it with that command; see ``docs/demo.md``).

Presentation only: the search is :class:`lavis_c2f.predictor.C2FPredictor`, sources, indexing and
the quickstart are in :mod:`lavis_c2f.demo.sources`, thumbnails in :mod:`lavis_c2f.demo.thumbs`
and error messages in :mod:`lavis_c2f.demo.messages`.

Two modes: **Search the corpus** (ranked moments across the videos of an index or of the demo
corpus, with thumbnails and a player that starts at the moment) and **One video** (upload a video
or pick one, type a query, see the saliency curve with the predicted windows).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
from typing import Any, Callable, Dict, Optional

import streamlit as st

from lavis_c2f.demo import sources as src
from lavis_c2f.demo.messages import UserError, check_query, describe_error
from lavis_c2f.demo.thumbs import frame_at, saliency_thumbnail
from lavis_c2f.pipeline.quickstart_run import QuickstartRun
from lavis_c2f.search.format import format_time
from lavis_c2f.search.plot import plot_saliency
from lavis_c2f.video.probe import probe

log = logging.getLogger("lavis_c2f.demo")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

SETTINGS = src.settings_from_argv(sys.argv[1:])
SETTINGS_KEY = repr(SETTINGS)
VIDEO_TYPES = ["mp4", "mkv", "webm", "avi", "mov", "m4v", "mpg", "mpeg", "ogv", "3gp", "ts"]
PLAYER_WIDTH = 640
THUMB_NOTE = ("The demo corpus has no video files (its videos are feature files), so each thumbnail draws the "
              "video's saliency over time (stage-2 grounder output) with the moment shaded in orange.")


# =========================================================================== helpers


def show_error(exc: BaseException, where: Any = None) -> None:
    """One message in the UI; the traceback of unexpected errors goes to the server log."""
    msg, expected = describe_error(exc)
    if not expected:
        log.error("demo: unexpected error", exc_info=exc)
    (where or st).error(msg)


def guarded(fn: Callable[[], Any], where: Any = None) -> Optional[Any]:
    """``fn()``, or None after showing its error."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a message
        show_error(e, where)
        return None


@st.cache_resource(show_spinner=False, max_entries=4)
def _predictor(kind: str, path: str, settings_key: str):
    if kind == "demo":
        return src.demo_predictor(SETTINGS, path)
    if kind == "index":
        return src.index_predictor(SETTINGS, path)
    return src.video_predictor(SETTINGS)


def load_predictor(kind: str, path: str = ""):
    label = {"demo": "the demo corpus and its checkpoints", "index": "the index and its models",
             "video": f"the {SETTINGS.backbone or 'offline'} video encoder"}[kind]
    with st.spinner(f"Loading {label} ..."):
        return _predictor(kind, path, SETTINGS_KEY)


@st.cache_data(show_spinner=False, max_entries=512)
def _frame(path: str, mtime: float, t: float):
    return frame_at(path, t, height=96)


def video_thumb(path: str, t: float):
    try:
        return _frame(path, os.path.getmtime(path), round(float(t), 2))
    except Exception as e:  # noqa: BLE001 - a missing preview is not an error of the search
        log.warning("demo: no thumbnail for %s at %.1f s: %s", path, t, e)
        return None


def initial_source() -> Dict[str, str]:
    if SETTINGS.index:
        return {"kind": "index", "path": SETTINGS.index}
    if SETTINGS.run_dir:
        return {"kind": "demo", "path": SETTINGS.run_dir}
    run = QuickstartRun.latest(SETTINGS.quickstart_root)
    return {"kind": "demo", "path": str(run.path)} if run else {"kind": "", "path": ""}


def source_predictor():
    s = st.session_state.source
    return load_predictor(s["kind"], s["path"]) if s["kind"] else None


def show_modes(predictor, stages=("stage1", "stage2")) -> None:
    """One line per stage: a caption when trained, a warning when zero-shot."""
    lines = src.mode_lines(predictor, stages)
    for text, trained in lines:
        (st.caption if trained else st.warning)(text)
    if not all(trained for _, trained in lines):
        st.caption("ZERO-SHOT = no trained checkpoint for this encoder: scores come from text-clip cosines of the "
                   "backbone. Start the demo with --grounder-ckpt / --retriever-ckpt (or an index built with "
                   "--checkpoint) to use trained models.")


def player(path: str, start: float, width: Any = PLAYER_WIDTH) -> None:
    """HTML5 player of a local file (served by Streamlit), started at ``start`` (currentTime)."""
    st.video(path, start_time=int(math.floor(float(start))), autoplay=True, muted=True, width=width)
    st.caption(f"Playing {os.path.basename(path)} from {fmt(start)} (muted; unmute in the player).")


def fmt(t: float) -> str:
    return format_time(max(0.0, float(t)))


# =========================================================================== sidebar


def sidebar() -> None:
    sb = st.sidebar
    sb.header("What is searched")
    s = st.session_state.source
    if s["kind"] == "demo":
        sb.markdown(f"**Demo corpus** with the checkpoints of the quickstart run  \n`{s['path']}`")
    elif s["kind"] == "index":
        sb.markdown(f"**Index of videos**  \n`{s['path']}`")
    else:
        sb.markdown("Nothing yet: run the quickstart or index your own videos.")
    if st.session_state.get("note"):
        sb.success(st.session_state.note)

    with sb.expander("Index your own videos", expanded=not s["kind"]):
        files = st.file_uploader("Video files", type=VIDEO_TYPES, accept_multiple_files=True, key="index_files")
        folder = st.text_input("or a folder on this machine", key="index_folder", placeholder="/path/to/videos")
        st.caption(f"Encoder: {SETTINGS.backbone or 'offline'} backbone; stage 1 "
                   + ("trained (--retriever-ckpt)" if SETTINGS.retriever_ckpt else "zero-shot") + ".")
        if st.button("Build index", key="build_index"):
            build_index(files or [], folder)

    if s["kind"] != "demo":
        with sb.expander("Demo corpus"):
            quickstart_panel(key="qs_sidebar")


def build_index(files, folder: str) -> None:
    bar = st.progress(0.0, text="starting ...")

    def work():
        if files:
            video_dir, index = src.new_index_dir(SETTINGS.workdir)
            for f in files:
                src.save_upload(f.getvalue(), f.name, video_dir)
        elif folder.strip():
            video_dir = os.path.abspath(os.path.expanduser(folder.strip()))
            if not os.path.isdir(video_dir):
                raise UserError(f"folder not found: {video_dir}")
            index = src.new_index_dir(SETTINGS.workdir)[1]
        else:
            raise UserError("Choose video files or type a folder first.")
        return src.index_video_files(video_dir, index, SETTINGS, lambda f, t: bar.progress(min(1.0, f), text=t))

    rep = guarded(work)
    if rep is None:
        bar.empty()
        return
    note = f"Indexed {rep.videos} videos."
    if rep.failed:
        note += " Could not read: " + "; ".join(f"{k} ({v})" for k, v in sorted(rep.failed.items()))
    switch_source("index", rep.index, note)


def switch_source(kind: str, path: str, note: str) -> None:
    """Search ``path`` from now on (dropping the old results) and say so in the sidebar."""
    st.session_state.source = {"kind": kind, "path": path}
    st.session_state.note = note
    st.session_state.pop("corpus_results", None)
    st.rerun()


def quickstart_panel(key: str) -> None:
    st.write("The demo corpus (synthetic features, no video files) needs the checkpoints of a quickstart run. "
             f"None was found under `{SETTINGS.quickstart_root}`. The quickstart builds the corpus and trains "
             "both stages (a few minutes on CPU); its steps are shown as it runs.")
    if SETTINGS.quickstart_args:
        st.caption("Quickstart arguments (--quickstart-args): `" + " ".join(SETTINGS.quickstart_args) + "`")
    if st.button("Run the quickstart", key=key):
        bar = st.progress(0.0, text="starting ...")
        run = guarded(lambda: src.run_quickstart(SETTINGS.quickstart_root,
                                                 lambda f, t: bar.progress(min(1.0, f), text=t),
                                                 extra_args=SETTINGS.quickstart_args))
        if run:
            switch_source("demo", run, "Quickstart finished.")


# =========================================================================== corpus search


def _fill_query(text: str) -> None:
    st.session_state.corpus_query = text
    st.session_state.run_example = True


def corpus_page() -> None:
    s = st.session_state.source
    if not s["kind"]:
        st.info("Nothing to search yet. Index your own videos (sidebar), run the quickstart for the demo corpus, "
                "or start the demo with --index INDEX / --run-dir RUN. The **One video** mode works without an index.")
        quickstart_panel(key="qs_main")
        return
    p = guarded(source_predictor)
    if p is None:
        return
    demo = s["kind"] == "demo"
    show_modes(p)
    with st.form("corpus_search", border=False):
        c1, c2, c3 = st.columns([7, 1.4, 1.2], vertical_alignment="bottom")
        examples = src.example_queries(p, n=3) if demo else []
        hint = f"e.g. {examples[0]}" if examples else "describe the moment, e.g. a man opens the fridge"
        c1.text_input("Query", key="corpus_query", placeholder=hint)
        top_k = c2.number_input("Moments", min_value=1, max_value=100, value=10, key="corpus_top_k")
        submitted = c3.form_submit_button("Search", type="primary", width="stretch")
    if examples:
        st.caption("The demo corpus only knows its own vocabulary (unknown words are ignored). Try an annotated query:")
        cols = st.columns(len(examples))
        for i, (col, ex) in enumerate(zip(cols, examples)):
            col.button(ex, key=f"example_{i}", on_click=_fill_query, args=(ex,), type="tertiary", wrap=True)
    if submitted or st.session_state.pop("run_example", False):
        run_search(p, st.session_state.corpus_query, int(top_k))
    out = st.session_state.get("corpus_results")
    if out is not None and out["source"] == (s["kind"], s["path"]):
        if out["unknown"]:
            st.warning("Ignored words the demo corpus does not know: " + ", ".join(out["unknown"]))
        show_results(p, out["res"], demo)


def run_search(p, text: str, top_k: int) -> None:
    st.session_state.pop("corpus_results", None)
    st.session_state.pop("play", None)

    def work():
        q = check_query(text)
        with st.spinner("Searching ..."):
            return p.search(q, top_k=top_k)

    res = guarded(work)
    if res is None:
        return
    enc = p.text_encoder
    unknown = enc.encode(res.query).skipped if hasattr(enc, "vocabulary") else []  # the demo text encoder
    s = st.session_state.source
    st.session_state.corpus_results = {"source": (s["kind"], s["path"]), "res": res, "unknown": unknown}


def _set_play(rank: int) -> None:
    st.session_state.play = rank


def show_results(p, res, demo: bool) -> None:
    n = len(p.corpus.vids)
    st.markdown(f"#### {len(res)} moments for “{res.query}”")
    st.caption(f"{n} videos searched, {len(res.stage1)} grounded by stage 2, {res.timings['total_s']:.2f} s. "
               "Score = stage-2 window score fused with the stage-1 video score.")
    if not res:
        st.info("No moment found.")
        return
    if demo:
        st.info(THUMB_NOTE)
    playing = st.session_state.get("play")
    for line in src.iter_moment_lines(res):
        with st.container(border=True, key=f"moment_{line['rank']}"):
            c_img, c_txt, c_btn = st.columns([1.4, 5, 1.6], vertical_alignment="center")
            if demo:
                det = res.details[line["vid"]]
                thumb = guarded(lambda: saliency_thumbnail(det.saliency, det.clip_length, det.duration,
                                                           [line["start"], line["end"]]), c_img)
            else:
                thumb = video_thumb(line["path"], line["start"]) if line["path"] else None
            if thumb is not None:
                c_img.image(thumb, width=160)
            else:
                c_img.caption("no preview")
            hit = demo and src.matches_ground_truth(p, res.query, line["vid"], line["start"], line["end"])
            c_txt.markdown(f"**{line['rank']}.** `{line['vid']}` &nbsp; **{line['start_hms']} – {line['end_hms']}**"
                           f" &nbsp; ({line['length_s']:g} s)" + (" &nbsp; ✓ annotated moment" if hit else ""))
            parts = [f"score {line['score']:.3f}"]
            if line["stage1"] is not None:
                parts.append(f"stage 1 {line['stage1']:.3f}")
            if line["stage2"] is not None:
                parts.append(f"stage 2 {line['stage2']:.3f}")
            c_txt.caption(" · ".join(parts))
            if line["path"]:
                c_btn.button(f"▶ Play from {line['start_hms']}", key=f"play_{line['rank']}", on_click=_set_play,
                             args=(line["rank"],), width="stretch")
                if playing == line["rank"]:
                    if os.path.isfile(line["path"]):
                        player(line["path"], line["start"])
                    else:
                        st.error(f"The video file is gone: {line['path']}")


# =========================================================================== one video


def single_page() -> None:
    s = st.session_state.source
    choices = ["Upload a video file"]
    if s["kind"] == "index":
        choices.append("A video of the index")
    if s["kind"] == "demo":
        choices.append("A video of the demo corpus")
    how = st.radio("Video", choices, horizontal=True, key="single_source")
    if how == "Upload a video file":
        kind, path = (s["kind"], s["path"]) if s["kind"] == "index" else ("video", "")
        p = guarded(lambda: load_predictor(kind, path))
        if p is None:
            return
        show_modes(p, ("stage2",))
        up = st.file_uploader("Video file", type=VIDEO_TYPES, key="single_file")
        if up is None:
            st.caption("Upload a video to ground a query in it.")
            return
        video = encode_upload(p, up)
    else:
        p = guarded(source_predictor)
        if p is None:
            return
        show_modes(p, ("stage2",))
        vid = st.selectbox("Video", p.corpus.vids, key="single_vid")
        video = guarded(lambda: p.video(vid))
    if video is None:
        return
    st.caption(f"`{video.vid}`: {video.duration:.1f} s, {video.n_clips} clips of {video.clip_length:g} s"
               + (f", encoded with the {video.backbone} backbone" if video.path else " (feature file)") + ".")
    with st.form("single_search", border=False):
        c1, c2, c3 = st.columns([7, 1.4, 1.6], vertical_alignment="bottom")
        examples = src.example_queries(p, n=1) if video.path is None else []
        c1.text_input("Query", key="single_query",
                      placeholder=f"e.g. {examples[0]}" if examples else "what happens in the moment you look for?")
        top_k = c2.number_input("Windows", min_value=1, max_value=20, value=5, key="single_top_k")
        submitted = c3.form_submit_button("Find moments", type="primary", width="stretch")
    if submitted:
        st.session_state.pop("single_result", None)
        st.session_state.pop("single_play", None)
        out = guarded(lambda: ground(p, video, st.session_state.single_query, int(top_k)))
        if out is not None:
            st.session_state.single_result = out
    out = st.session_state.get("single_result")
    if out is not None and out["key"] == _video_key(video):
        show_single(out, video)


def _video_key(video) -> str:
    return f"{video.vid}|{video.path}|{video.weights_id}|{video.n_clips}"


def encode_upload(p, up):
    path = guarded(lambda: src.save_upload(up.getvalue(), up.name, os.path.join(SETTINGS.workdir, "uploads")))
    if path is None:
        return None
    cache = st.session_state.setdefault("encoded", {})
    key = (path, p.features_id)
    if key in cache:
        return cache[key]
    err: Optional[BaseException] = None
    with st.status(f"Reading {up.name} ...", expanded=True) as status:
        try:
            info = probe(path)
            st.write(f"{info.duration:.1f} s, {info.width}x{info.height}: {info.n_clips(p.clip_length)} clips of "
                     f"{p.clip_length:g} s to decode and encode with the {p.backbone.name} backbone")
            bar = st.progress(0.0, text="decoding and encoding clips ...")
            video = p.encode_video(path, progress=lambda done, total: bar.progress(
                min(1.0, done / max(1, total)), text=f"{done} of {total} clips encoded"))
        except Exception as e:  # noqa: BLE001 - shown below, outside the collapsed status box
            err = e
            status.update(label=f"Could not read {up.name}", state="error", expanded=False)
        else:
            status.update(label=f"{up.name} encoded", state="complete", expanded=False)
    if err is not None:
        show_error(err)
        return None
    cache[key] = video
    return video


def ground(p, video, text: str, top_k: int) -> Dict[str, Any]:
    q = check_query(text)
    with st.spinner("Grounding ..."):
        m = p.predict(q, video, top_k=top_k)
    gt = [w for v, ws in p.ground_truth(q) if v == video.vid for w in ws]
    trained = m.mode == "trained"
    digest = hashlib.sha256(f"{_video_key(video)}|{q}|{top_k}".encode()).hexdigest()[:16]
    png = os.path.join(SETTINGS.workdir, "plots", f"{digest}.png")
    plot_saliency(png, m.saliency, m.clip_length, m.duration, m.windows, gt_windows=gt or None,
                  title=f'"{m.query}" in {video.vid} (stage 2 {m.mode})',
                  ylabel="grounder saliency" if trained else "text-clip cosine (smoothed)")
    return {"key": _video_key(video), "moments": m, "png": png, "gt": gt}


def _set_single_play(start: float) -> None:
    st.session_state.single_play = start


def show_single(out: Dict[str, Any], video) -> None:
    m = out["moments"]
    st.markdown(f"#### Top {len(m.windows)} windows for “{m.query}” in `{video.vid}`")
    st.image(out["png"], width="stretch")
    st.caption("Curve: per-clip saliency; shaded: the predicted windows (darker = better rank)"
               + ("; green bars: the annotated moment." if out["gt"] else "."))
    if not m.windows:
        st.info("No window found.")
        return
    playable = bool(video.path) and os.path.isfile(video.path)
    left, right = st.columns([1, 1]) if playable else (st.container(), None)
    with left:
        for i, (a, b, score) in enumerate(m.windows, start=1):
            with st.container(border=True, key=f"window_{i}"):
                c_txt, c_btn = st.columns([3, 1.6], vertical_alignment="center")
                c_txt.markdown(f"**{i}.** **{fmt(a)} – {fmt(b)}** &nbsp; ({b - a:.1f} s) &nbsp; score {score:.3f}")
                if playable:
                    c_btn.button(f"▶ Play from {fmt(a)}", key=f"single_play_{i}", on_click=_set_single_play,
                                 args=(float(a),), width="stretch")
    if right is not None:
        start = st.session_state.get("single_play")
        with right:
            if start is None:  # ready at the best window; plays on a click
                st.video(video.path, start_time=int(math.floor(m.windows[0][0])), width="stretch")
                st.caption(f"Ready at window 1 ({fmt(m.windows[0][0])}); click a window to play it.")
            else:
                player(video.path, start, width="stretch")
    elif video.path:
        st.error(f"The video file is gone: {video.path}")


# =========================================================================== page


def main() -> None:
    st.set_page_config(page_title="Moment search - lavis-c2f", layout="wide")
    if "source" not in st.session_state:
        st.session_state.source = initial_source()
    sidebar()
    st.title("Find moments in videos")
    st.caption("Coarse-to-fine search: stage 1 retrieves the best videos, stage 2 finds the moments in each, and the "
               "two scores are fused into one ranked list.")
    mode = st.radio("Mode", ["Search the corpus", "One video"], horizontal=True, key="mode",
                    label_visibility="collapsed")
    if mode == "Search the corpus":
        corpus_page()
    else:
        single_page()


main()
