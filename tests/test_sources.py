import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import rt_write_video
from syndiff_stream.frames import Mode
from syndiff_stream.sources import (AVSource, DemoSource, ImageFolderSource, PseudoVideoSource, SourceError,
                                    is_stream, open_source)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg-train"


def test_video_file_every_frame_in_order(tmp_path):
    written = rt_write_video(tmp_path / "v.mp4", frames=10, size=(60, 80))
    src = open_source(str(tmp_path / "v.mp4"))
    assert isinstance(src, AVSource) and src.default_mode is Mode.RECORDED and src.fps == 25
    frames = list(src)
    src.close()
    assert [f.index for f in frames] == list(range(10))
    assert all(b.pts > a.pts for a, b in zip(frames, frames[1:]))
    assert frames[0].shape == (60, 80) and frames[0].source_id == "v"
    assert np.abs(frames[5].image.astype(int) - written[5]).mean() < 12  # lossy codec, same picture


def test_open_source_names_what_is_wrong(tmp_path):
    with pytest.raises(SourceError, match="nope.mp4"):
        open_source(str(tmp_path / "nope.mp4"))
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(SourceError, match="junk.mp4"):
        open_source(str(tmp_path / "junk.mp4"))
    with pytest.raises(SourceError, match="/dev/video99"):
        open_source("v4l2:/dev/video99")  # a device spec goes to the v4l2 demuxer


def test_demo_is_deterministic_has_masks_and_a_circular_fov():
    a = DemoSource(size=(96, 120), realtime=False, frames=4, seed=1)
    b = DemoSource(size=(96, 120), realtime=False, frames=4, seed=1)
    fa, fb = list(a), list(b)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.truth, y.truth) for x, y in zip(fa, fb))
    c = list(DemoSource(size=(96, 120), realtime=False, frames=1, seed=2))[0]
    assert not np.array_equal(c.image, fa[0].image)
    assert fa[0].image[0, 0].max() == 0 and fa[0].image[48, 60].max() > 50  # black outside the scope
    assert not np.array_equal(fa[0].truth, fa[3].truth) or not fa[0].truth.any()  # lesions move
    assert a.default_mode is Mode.RECORDED and DemoSource(size=(96, 120)).default_mode is Mode.LIVE


def test_demo_in_live_mode_keeps_its_frame_rate():
    src = DemoSource(size=(48, 60), fps=50, frames=6, realtime=True)
    start = time.perf_counter()
    list(src)
    assert time.perf_counter() - start >= 5 / 50 * 0.95


def _dataset(root, n=2):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = np.full((100, 140, 3), 60, np.uint8)
        mask = np.zeros((100, 140), np.uint8)
        mask[30 + i * 5:60, 40:90] = 255
        img[mask > 0] = 220
        cv2.imwrite(str(root / "images" / f"p{i}.png"), img)
        cv2.imwrite(str(root / "masks" / f"p{i}.png"), mask)
    return root


def test_pseudo_video_moves_smoothly_with_aligned_masks(tmp_path):
    src = open_source(f"pseudo:{_dataset(tmp_path / 'ds')}", size=(60, 80))
    assert isinstance(src, PseudoVideoSource) and src.default_mode is Mode.RECORDED
    src.frames_per_image = 8
    frames = list(src)
    assert len(frames) == len(src) == 16
    for f in frames:
        assert f.shape == (60, 80) and f.truth.shape == (60, 80)
        if f.truth.sum() > 20:  # the bright square is where the mask says it is
            assert f.image[f.truth].mean() > 180 > f.image[~f.truth].mean()
    within = [np.abs(a.image.astype(int) - b.image).mean() for a, b in zip(frames[:7], frames[1:8])]
    assert 0 < max(within)  # the camera moves
    assert not np.array_equal(frames[0].image, frames[7].image)


def test_image_folder_source(tmp_path):
    root = _dataset(tmp_path / "ds", n=3)
    with_masks = list(open_source(str(root)))
    assert len(with_masks) == 3 and all(f.truth is not None for f in with_masks)
    plain = list(ImageFolderSource(root / "images"))
    assert len(plain) == 3 and plain[0].truth is None and plain[0].shape == (100, 140)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared Kvasir-SEG data not present")
def test_pseudo_video_over_real_images():
    src = PseudoVideoSource(SHARED_DATA, size=(144, 180), frames_per_image=3, limit_images=2)
    frames = list(src)
    assert len(frames) == 6 and all(f.truth.shape == (144, 180) for f in frames)


@pytest.mark.parametrize("spec, stream", [
    ("udp://127.0.0.1:5600", True), ("RTSP://scope/live", True), ("v4l2:/dev/video0", True), ("/dev/video2", True),
    ("clip.mp4", False), ("demo", False), ("pseudo:/data", False), (None, False), ("C:/videos/a.mp4", False),
])
def test_is_stream_names_sources_that_deliver_whether_read_or_not(spec, stream):
    assert is_stream(spec) is stream


def test_a_looping_demo_replays_its_first_frames_with_fresh_indices():
    frames = list(DemoSource(size=(48, 64), realtime=False, frames=7, seed=3, loop=3))
    plain = list(DemoSource(size=(48, 64), realtime=False, frames=3, seed=3))
    assert [f.index for f in frames] == list(range(7))
    for i, f in enumerate(frames):
        assert np.array_equal(f.image, plain[i % 3].image) and np.array_equal(f.truth, plain[i % 3].truth)
    replay = iter(DemoSource(size=(48, 64), realtime=False, frames=4, seed=3, loop=3))
    next(replay).image[:] = 0  # a stage drawing on a frame does not change its later replays
    assert np.array_equal([*replay][-1].image, plain[0].image)


def test_a_looping_demo_renders_before_any_clock_starts():
    """Rendering on the first pass put 30 ms a 1920x1080 frame inside a live run's clock: a burst of
    late frames and a p99 set by the renderer, not the pipeline."""
    demo = DemoSource(size=(48, 64), realtime=False, frames=9, seed=3, loop=4)
    demo.render = None  # any render from here on would raise
    assert [f.index for f in demo] == list(range(9))
    assert len(DemoSource(size=(48, 64), realtime=False, frames=2, seed=3, loop=4)._rendered) == 2
