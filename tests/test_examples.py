"""Every example runs, with a tiny model (SYNDIFF_MODEL) and small inputs."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np

from conftest import rt_write_video
from syndiff_stream.backends import make_backend
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.publish import Publisher
from syndiff_stream.sources import open_source

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name, *args, env_model, timeout=120, **kwargs):
    env = dict(os.environ, SYNDIFF_MODEL=str(env_model), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def test_segment_frame(rt_tiny_model_dir, tmp_path):
    image = np.zeros((90, 120, 3), np.uint8)
    cv2.circle(image, (60, 45), 40, (170, 90, 80), -1)
    cv2.imwrite(str(tmp_path / "f.png"), image)
    done = example("segment_frame.py", tmp_path / "f.png", "--out", tmp_path / "m.png", env_model=rt_tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_GRAYSCALE).shape == (90, 120)


def test_process_folder(rt_tiny_model_dir, tmp_path):
    (tmp_path / "rec").mkdir()
    for name in ("p1", "p2"):
        rt_write_video(tmp_path / "rec" / f"{name}.mp4", frames=5, size=(60, 80))
    done = example("process_folder.py", tmp_path / "rec", tmp_path / "out", env_model=rt_tiny_model_dir)
    assert done.returncode == 0, done.stderr
    for name in ("p1", "p2"):
        assert (tmp_path / "out" / name / "overlay.mp4").is_file()
        assert len(list((tmp_path / "out" / name / "masks").glob("*.png"))) == 5


def test_capture_live_with_a_file_standing_in_for_the_device(rt_tiny_model_dir, rt_video, rt_endpoint):
    done = example("capture_live.py", rt_video, "--backend", "eager", "--publish", rt_endpoint,
                   "--max-frames", 12, env_model=rt_tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert "shown" in done.stdout and "dropped" in done.stdout


def test_subscribe_overlays(rt_tiny_model_dir, rt_tiny_segmenter, rt_video, tmp_path, rt_endpoint):
    pub = Publisher(rt_endpoint, overlay=True)
    proc = {}
    runner = threading.Thread(target=lambda: proc.setdefault("done", example(
        "subscribe_overlays.py", rt_endpoint, "--out", tmp_path / "ov", "--timeout", 60,
        env_model=rt_tiny_model_dir)))
    runner.start()
    assert pub.wait_for_subscribers(1, timeout=60)
    Pipeline(open_source(str(rt_video)), make_backend("eager", rt_tiny_segmenter), [pub]).run()
    runner.join(timeout=90)
    assert proc["done"].returncode == 0, proc["done"].stderr
    assert len(list((tmp_path / "ov").glob("*.png"))) == 12


def test_send_udp_feeds_a_live_pipeline(rt_tiny_model_dir, rt_tiny_segmenter, tmp_path):
    import socket

    from syndiff_stream.frames import Mode

    clip = tmp_path / "clip.mp4"
    rt_write_video(clip, frames=12, size=(72, 96), codec="libx264")  # H.264, as scopes and encoders send
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        url = f"udp://127.0.0.1:{s.getsockname()[1]}"
    # bursty pacing, looping long enough for the receiver to join at the next keyframe
    sender = subprocess.Popen([sys.executable, str(EXAMPLES / "send_udp.py"), clip, url, "--pace", "pts",
                               "--loops", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pipeline = Pipeline(open_source(url), make_backend("eager", rt_tiny_segmenter), mode=Mode.LIVE,
                            max_frames=10)
        stats = pipeline.run()
    finally:
        sender.kill()
        _, err = sender.communicate(timeout=30)
    assert stats.frames_in == 10 and stats.frames_out + stats.dropped == 10, err
    assert stats.source_size == (72, 96)
