"""Frame-index sampling rules (T-MASS, CLIP4Clip) and decoding frames by index."""
import numpy as np
import pytest

from lavis_c2f.video.decode import VideoDecodeError, decode_frames
from lavis_c2f.video.probe import probe
from lavis_c2f.video.frame_sampling import FrameSampling, fps_frame_indices, tmass_frame_indices

from conftest import read_ids


def test_tmass_uniform_takes_interval_middles_and_repeats_the_last_frame():
    # linspace(0, 100, 13).astype(int) = 0 8 16 25 33 41 50 58 66 75 83 91 100
    assert tmass_frame_indices(100, 12).tolist() == [3, 11, 20, 28, 36, 45, 53, 61, 70, 78, 86, 95]
    assert tmass_frame_indices(5, 12).tolist() == [0, 1, 2, 3, 4] + [4] * 7
    assert tmass_frame_indices(1, 3).tolist() == [0, 0, 0]


def test_tmass_rand_stays_inside_the_official_range():
    rng = np.random.default_rng(0)
    b = np.linspace(0, 100, 13).astype(int)
    seen = set()
    for _ in range(200):
        idx = tmass_frame_indices(100, 12, "rand", rng)
        assert np.all(idx >= b[:-1]) and np.all(idx <= b[1:] - 2)    # random.choice(range(lo, hi))
        seen.update(idx.tolist())
    assert len(seen) > 40
    assert tmass_frame_indices(12, 12, "rand", rng).tolist() == list(range(12))   # one-frame intervals
    with pytest.raises(ValueError, match="at least one frame"):
        tmass_frame_indices(0, 12)


def test_fps_rule_one_frame_per_second_then_linspace():
    assert fps_frame_indices(100, 30.0, 12).tolist() == [0, 30, 60, 90]
    assert fps_frame_indices(100, 29.97, 12).tolist() == [0, 29, 58, 87]       # int(29.97) = 29, as OpenCV
    assert fps_frame_indices(91, 29.9999999, 12).tolist() == [0, 30, 60, 90]
    long = fps_frame_indices(1000, 25.0, 12)                                    # 40 seconds -> 12 of 40
    assert long.tolist() == (np.linspace(0, 39, 12, dtype=int) * 25).tolist()
    assert fps_frame_indices(1000, 25.0, 12, slice_mode="head").tolist() == [25 * i for i in range(12)]
    assert fps_frame_indices(1000, 25.0, 12, sample_fps=2, slice_mode="tail")[-1] == 987
    idx, mask = FrameSampling(kind="fps", num_frames=6).indices(100, 30.0)
    assert idx.tolist() == [0, 30, 60, 90] and mask.tolist() == [1, 1, 1, 1, 0, 0]
    idx, mask = FrameSampling(num_frames=6).indices(3, 30.0)
    assert idx.tolist() == [0, 1, 2, 2, 2, 2] and mask.tolist() == [1] * 6
    with pytest.raises(ValueError, match="kind"):
        FrameSampling(kind="random")


@pytest.mark.parametrize("name,backend", [("id30", "decord"), ("id30", "pyav"), ("vfr", "decord"),
                                          ("vfr", "pyav"), ("rot90", "auto")])
def test_decode_frames_returns_exactly_the_requested_frames(media, backend, name):
    want = [3, 11, 95, 95, 0, 99, 50]
    frames = decode_frames(media[name], want, backend=backend)
    assert frames.shape[0] == len(want) and frames.dtype == np.uint8
    if name == "rot90":                      # display orientation: turn back to read the ids
        frames = np.rot90(frames, -1, axes=(1, 2))
    assert read_ids(frames) == want
    info = probe(media[name])
    assert decode_frames(info, [], backend=backend).shape[0] == 0
    with pytest.raises(ValueError, match="frame index 100 out of range"):
        decode_frames(info, [1, 100], backend=backend)


def test_decode_frames_names_bad_files(media):
    with pytest.raises(VideoDecodeError, match="notvideo.mp4"):
        decode_frames(media["notvideo"], [0])
    with pytest.raises(VideoDecodeError, match="audio_only.mp4: no video stream"):
        decode_frames(media["audio_only"], [0])
