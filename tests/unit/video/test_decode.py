"""Probing and clip decoding on real files: the Charades clip of ../shared and ffmpeg-made files."""
from __future__ import annotations

import numpy as np
import pytest

from lavis_c2f.video.decode import (ClipFrames, VideoDecodeError, decode_all_frames, decode_clips, decode_many,
                                    decord_available, ffmpeg_available, iter_clip_batches, output_size, sample_times,
                                    select_frames)
from lavis_c2f.video.probe import DecodeSummary, num_clips, probe, probe_many

from conftest import CHARADES_FEATS, ffmpeg_fps_frames, read_ids

# --------------------------------------------------------------------------- pure helpers


def test_num_clips_rounds_half_up_like_ffmpeg_fps():
    assert num_clips(30.7, 2.0) == 15
    assert num_clips(3.3334, 2.0) == 2      # remainder 1.33 >= half a clip
    assert num_clips(2.9, 2.0) == 1         # remainder 0.9 < 1
    assert num_clips(0.4, 2.0) == 1         # any positive duration has a clip
    assert num_clips(0.0, 2.0) == 0
    assert num_clips(150.0, 2.0) == 75
    with pytest.raises(ValueError):
        num_clips(10, 0)


def test_sample_times_centres_and_uniform_frames():
    np.testing.assert_allclose(sample_times(3, 2.0, 1)[:, 0], [1.0, 3.0, 5.0])
    np.testing.assert_allclose(sample_times(2, 2.0, 4), [[0.25, 0.75, 1.25, 1.75], [2.25, 2.75, 3.25, 3.75]])


def test_select_frames_takes_last_frame_strictly_before_target():
    ft = np.arange(10) / 10.0  # frames at 0.0, 0.1, ...
    assert select_frames(ft, np.array([0.35, 0.3, 0.0, 5.0, -1.0])).tolist() == [3, 2, 0, 9, 0]
    with pytest.raises(ValueError):
        select_frames(np.zeros(0), np.array([1.0]))


def test_output_size():
    assert output_size(270, 480, 224) == (224, 398)     # int(480 * 224 / 270), as Moment-DETR's loader
    assert output_size(480, 270, 224) == (398, 224)
    assert output_size(270, 480, None) == (270, 480)
    assert output_size(270, 480, (100, 50)) == (100, 50)
    with pytest.raises(ValueError):
        output_size(10, 10, 0)


# --------------------------------------------------------------------------- real Charades clip


def test_charades_probe(charades):
    info = probe(charades)
    assert info.has_video and info.has_audio and not info.vfr
    assert info.duration == pytest.approx(30.7, abs=0.05)
    assert info.fps == pytest.approx(14.985, abs=0.01)
    assert (info.width, info.height, info.rotation) == (480, 270, 0)
    assert info.n_frames == 460 and info.codec == "h264"
    assert info.n_clips(2.0) == 15
    # the UniVTG CLIP features of this clip have one row per 2 s clip
    if CHARADES_FEATS.is_file():
        assert np.load(CHARADES_FEATS)["features"].shape == (info.n_clips(2.0), 512)


def test_charades_decord_and_pyav_agree(charades):
    if not decord_available():
        pytest.skip("decord not installed")
    a = decode_clips(charades, 2.0, 1, size=224, backend="decord")
    b = decode_clips(charades, 2.0, 1, size=224, backend="pyav")
    assert a.frames.shape == b.frames.shape == (15, 1, 224, 398, 3)
    assert a.backends == ["decord"] and b.backends == ["pyav"]
    np.testing.assert_allclose(a.times, b.times, atol=1e-3)   # the same frames were chosen
    np.testing.assert_allclose(a.times[:, 0], np.arange(15) * 2 + 1 - 1 / 14.985, atol=0.07)
    diff = np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16)).mean()
    assert diff < 3.0   # only the scalers' interpolation differs


def test_charades_sequential_and_seek_give_identical_frames(charades):
    seq_stats, seek_stats = {}, {}
    seq = np.concatenate([b.frames for b in iter_clip_batches(charades, 2.0, 2, size=112, backend="pyav",
                                                               mode="sequential", stats=seq_stats)])
    seek = np.concatenate([b.frames for b in iter_clip_batches(charades, 2.0, 2, size=112, backend="pyav",
                                                                mode="seek", stats=seek_stats)])
    assert seq.shape == (15, 2, 112, 199, 3)
    np.testing.assert_array_equal(seq, seek)
    assert seq_stats["seeks"] == 0 and seek_stats["seeks"] > 0


def test_charades_batches_bound_memory_and_match_full_decode(charades):
    batches = list(iter_clip_batches(charades, 2.0, 1, size=64, batch_clips=4, backend="pyav"))
    assert [b.start for b in batches] == [0, 4, 8, 12]
    assert [len(b.frames) for b in batches] == [4, 4, 4, 3]
    full = decode_clips(charades, 2.0, 1, size=64, backend="pyav")
    np.testing.assert_array_equal(np.concatenate([b.frames for b in batches]), full.frames)


def test_decode_all_frames_baseline_contains_the_sampled_frames(charades):
    frames, times = decode_all_frames(charades, size=64)
    assert frames.shape[0] == 460 and times.shape == (460,)
    clips = decode_clips(charades, 2.0, 1, size=64, backend="pyav")
    idx = select_frames(times, clips.targets)
    np.testing.assert_array_equal(frames[idx[:, 0]], clips.frames[:, 0])


# --------------------------------------------------------------------------- generated files


@pytest.mark.parametrize("backend", ["decord", "pyav", "ffmpeg"])
@pytest.mark.parametrize("fpc,rate", [(1, "0.5"), (3, "1.5")])
def test_frames_match_ffmpeg_fps_filter(media, backend, fpc, rate):
    """The frame chosen for each sample is the one ffmpeg's fps filter (Moment-DETR's loader) emits."""
    if backend == "decord" and not decord_available():
        pytest.skip("decord not installed")
    if backend == "ffmpeg" and not ffmpeg_available():
        pytest.skip("ffmpeg not installed")
    ref = read_ids(ffmpeg_fps_frames(media["id30"], rate))
    got = decode_clips(media["id30"], 2.0, fpc, backend=backend)
    assert got.frames.shape[:2] == (2, fpc)
    ids = read_ids(got.frames)
    # ffmpeg emits round(D * rate) frames (5 for 3.33 s at 1.5/s); the clip grid has 2 x 3 samples,
    # a sample past the end takes the last frame (99)
    assert ids[:len(ref)] == ref
    assert ids[len(ref):] == [99] * (len(ids) - len(ref))
    if backend != "ffmpeg":
        np.testing.assert_allclose(got.times.reshape(-1)[:len(ref)], np.asarray(ref) / 30.0, atol=1e-4)


def test_vfr_uses_timestamps(media):
    info = probe(media["vfr"])
    assert info.vfr
    assert info.n_frames == 100
    assert info.duration == pytest.approx(1.0 + 70 / 10.0, abs=0.11)
    backends = ["pyav"] + (["decord"] if decord_available() else [])
    for b in backends:
        got = decode_clips(media["vfr"], 2.0, 1, backend=b)
        ids = read_ids(got.frames)
        # centres 1, 3, 5, 7 s: frame 29 (0.967 s); 30 + k with 1 + k/10 < t strictly
        assert ids == [29, 49, 69, 89], b
        # index / fps would have picked frames 29, 89, ... instead
    ref = read_ids(ffmpeg_fps_frames(media["vfr"], "0.5"))
    assert ref == [29, 49, 69, 89]


def test_rotation_metadata_gives_display_orientation(media):
    info = probe(media["rot90"])
    assert info.rotation == 90
    assert (info.width, info.height) == (48, 64)
    got = decode_clips(media["rot90"], 2.0, 1, backend="auto")
    assert got.frames.shape == (2, 1, 64, 48, 3)
    assert got.backends[0] == "pyav"  # decord mis-decodes rotated streams
    # ffmpeg autorotates: its output is the display orientation
    ref = ffmpeg_fps_frames(media["rot90"], "0.5", w=48, h=64)
    assert np.abs(got.frames[:, 0].astype(int) - ref.astype(int)).mean() < 1.0
    unrot = decode_clips(media["id30"], 2.0, 1, backend="pyav").frames
    np.testing.assert_array_equal(np.rot90(unrot[:, 0], 1, axes=(1, 2)), got.frames[:, 0])


def test_resize_on_decode_keeps_aspect(media):
    got = decode_clips(media["id30"], 2.0, 1, size=24, backend="pyav")
    assert got.frames.shape == (2, 1, 24, 32, 3)
    rot = decode_clips(media["rot90"], 2.0, 1, size=24)
    assert rot.frames.shape == (2, 1, 32, 24, 3)


@pytest.mark.parametrize("name,needle", [
    ("audio_only", "audio-only"),
    ("empty", "empty file"),
    ("zero_frames", "zero-length"),
    ("notvideo", "not a readable media file"),
    ("trunc_fs", "truncated"),
    ("trunc_moov", "not a readable media file"),
])
def test_bad_files_give_clear_errors(media, name, needle):
    path = media[name]
    with pytest.raises(VideoDecodeError) as ei:
        decode_clips(path, 2.0, 1)
    assert ei.value.path == str(path)
    assert needle in ei.value.reason
    assert str(path) in str(ei.value)


def test_probe_audio_only_reports_no_video(media):
    info = probe(media["audio_only"])
    assert not info.has_video and info.has_audio
    assert info.duration == pytest.approx(2.0, abs=0.1)


def test_missing_file(tmp_path):
    with pytest.raises(VideoDecodeError, match="file not found"):
        probe(tmp_path / "nope.mp4")


def test_full_file_of_the_truncated_ones_decodes(media):
    a = decode_clips(media["full_fs"], 2.0, 1, size=32)
    assert a.frames.shape[0] == 4 and a.info.has_audio


def test_batch_helpers_continue_and_summarise(media, capsys):
    seen = []
    paths = [media[n] for n in ("id30", "empty", "notvideo", "audio_only", "trunc_fs", "rot90")]
    summary = decode_many(paths, lambda p, cf: seen.append((p, cf.frames.shape)), size=16)
    assert isinstance(summary, DecodeSummary)
    assert [p for p, _ in seen] == [str(media["id30"]), str(media["rot90"])]
    assert len(summary.ok) == 2 and len(summary.failed) == 4
    out = capsys.readouterr().out
    assert "2 ok, 4 failed" in out and "empty file (0 bytes)" in out and "audio-only" in out
    infos, s2 = probe_many(paths)
    assert set(infos) == {str(media["id30"]), str(media["rot90"])} and len(s2.failed) == 4


def test_backend_argument_validation(media):
    with pytest.raises(ValueError):
        decode_clips(media["id30"], 2.0, 1, backend="opencv")
    with pytest.raises(ValueError):
        list(iter_clip_batches(media["id30"], 2.0, 1, mode="random"))
    assert isinstance(decode_clips(media["id30"], 2.0, 1, backend="pyav"), ClipFrames)
