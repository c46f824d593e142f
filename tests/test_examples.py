"""Every example runs, with a tiny model (SYNDIFF_MODEL) and small inputs."""

import json
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


def example(name, *args, env_model, timeout=900, **kwargs):  # a hang guard, not a timing check
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
    assert pub.wait_for_subscribers(1, timeout=900)  # the example's imports alone took minutes on a loaded machine
    Pipeline(open_source(str(rt_video)), make_backend("eager", rt_tiny_segmenter), [pub]).run()
    runner.join(timeout=900)
    assert proc["done"].returncode == 0, proc["done"].stderr
    assert len(list((tmp_path / "ov").glob("*.png"))) == 12


def test_stalled_subscriber(rt_tiny_model_dir, rt_video, rt_endpoint):
    done = example("stalled_subscriber.py", rt_video, "--backend", "eager", "--publish", rt_endpoint,
                   env_model=rt_tiny_model_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["frames_out"] == report["healthy_received"] == 12 and report["in_order"]


def test_measure_smoothing_on_a_tiny_sequence_folder(rt_tiny_model_dir, tmp_path):
    """CVC-ClinicDB layout (images/N.png, masks/N.png, sequences.csv): two sequences of three frames."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rows = ["frame,sequence"]
    for n in range(1, 7):
        image, mask = np.full((72, 96, 3), 120, np.uint8), np.zeros((72, 96), np.uint8)
        cv2.circle(image, (30 + 5 * n, 36), 14, (200, 110, 90), -1)
        cv2.circle(mask, (30 + 5 * n, 36), 14, 255, -1)
        cv2.imwrite(str(tmp_path / "images" / f"{n}.png"), image)
        cv2.imwrite(str(tmp_path / "masks" / f"{n}.png"), mask)
        rows.append(f"{n},{1 + (n > 3)}")
    (tmp_path / "sequences.csv").write_text("\n".join(rows) + "\n")
    done = example("measure_smoothing.py", "--cvc", tmp_path, "--kinds", "cvc x1", "--backend", "eager",
                   "--settings", "off", "default", "--json", tmp_path / "r.json", env_model=rt_tiny_model_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())["cvc x1"]
    assert report["off"]["frames"] == report["default"]["frames"] == 6
    assert {"dice", "fp_frames", "flicker", "flicker_truth"} <= set(report["default"])


def test_clinicdb_clips_then_eval_video_on_a_clip(rt_tiny_model_dir, tmp_path):
    """Sequences -> clips + mask folders, which `eval-video` takes as a video with masks."""
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    for n in range(1, 7):
        image = np.full((48, 64, 3), 120, np.uint8)
        cv2.circle(image, (20 + n, 24), 8, (220, 120, 110), -1)
        cv2.imwrite(str(tmp_path / "d" / "images" / f"{n}.png"), image)
        cv2.imwrite(str(tmp_path / "d" / "masks" / f"{n}.png"), cv2.circle(np.zeros((48, 64), np.uint8), (20 + n, 24), 8, 255, -1))
    (tmp_path / "d" / "sequences.csv").write_text("frame,sequence\n" + "".join(f"{n},{1 + n // 4}\n" for n in range(1, 7)))
    done = example("clinicdb_clips.py", tmp_path / "d", tmp_path / "clips", env_model=rt_tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "clips" / "seq-01-masks").glob("*.png"))) == 3
    done = subprocess.run([sys.executable, "-m", "syndiff_trainer.cli", "eval-video", str(tmp_path / "clips" / "seq-02.mp4"),
                           "--masks", str(tmp_path / "clips" / "seq-02-masks"), "--model", str(rt_tiny_model_dir),
                           "--backend", "eager", "--device", "cpu", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"frames": 3' in done.stdout


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
