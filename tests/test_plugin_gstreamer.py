"""The `syndiffseg` GStreamer element in real pipelines (Debian's GStreamer and its Python loader)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import rt_write_video
from syndiff_stream.calibration import Profile, SmoothingSpec, save_profile
from syndiff_stream.postprocess import find_polyps
from syndiff_stream.segment import FrameSegmenter
from syndiff_stream.sources import DemoSource

GST = Path(__file__).resolve().parents[1] / "plugins" / "gstreamer"
NEEDED = ("syndiffseg", "decodebin", "videoconvert", "x264enc", "mp4mux", "pngdec", "multifilesrc", "appsink")


def gst(script, *args, env_extra=None, timeout=240):
    """Run a Python script with plugins/gstreamer/env.sh sourced, as the README does."""
    env = dict(os.environ, GST_REGISTRY=str(env_extra["registry"]), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", "-c", f'. "{GST}/env.sh" && exec "$0" "$@"', sys.executable, *map(str, (script, *args))],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gst_env(tmp_path_factory):
    env = {"registry": tmp_path_factory.mktemp("gst") / "registry.bin"}
    probe = ("import gi; gi.require_version('Gst', '1.0'); from gi.repository import Gst; Gst.init(None); "
             f"missing = [n for n in {NEEDED!r} if Gst.ElementFactory.find(n) is None]; "
             "print('missing GStreamer elements: ' + ', '.join(missing) if missing else 'ok')")
    result = gst("-c", probe, env_extra=env, timeout=120)
    if result.returncode != 0 or result.stdout.strip() != "ok":
        reason = (result.stdout.strip() or result.stderr.strip().splitlines()[-1:] or ["?"])
        pytest.skip(f"GStreamer with Python bindings unavailable ({reason if isinstance(reason, str) else reason[0]}); "
                    "install with .ci/system-deps")
    return env


@pytest.fixture(scope="module")
def halfway_profile(tmp_path_factory, rt_tiny_segmenter):
    """A profile whose threshold is the tiny random model's median probability on the demo scene,
    so its masks cover about half of the field of view (overlays and metas then have content)."""
    from syndiff_stream.preprocess import prepare

    import torch

    frames = list(DemoSource(size=(96, 128), realtime=False, frames=4, seed=2))
    x = torch.from_numpy(np.stack([prepare(f.image, 64)[0] for f in frames]))
    threshold = float(np.median(rt_tiny_segmenter.predict_proba(x).numpy()))
    path = tmp_path_factory.mktemp("profile") / "half.json"
    save_profile(Profile(name="half", threshold=round(threshold, 6), smoothing=SmoothingSpec(enabled=False)), path)
    return path


def mean_rgb(path):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24").astype(float) for f in c.decode(video=0)]
    return len(frames), np.mean([f.reshape(-1, 3).mean(0) for f in frames], axis=0)


def test_readme_pipeline_draws_overlays(gst_env, rt_tiny_model_dir, halfway_profile, tmp_path):
    clip, out = tmp_path / "clip.mp4", tmp_path / "overlay.mp4"
    rt_write_video(clip, frames=12)
    pipeline = (f"filesrc location={clip} ! decodebin ! videoconvert ! syndiffseg model={rt_tiny_model_dir} "
                f"profile={halfway_profile} ! videoconvert ! x264enc ! mp4mux ! filesink location={out}")
    result = gst(GST / "launch.py", pipeline, env_extra=gst_env)
    assert result.returncode == 0, result.stderr[-2000:]
    n_out, rgb_out = mean_rgb(out)
    n_in, rgb_in = mean_rgb(clip)
    assert n_out == n_in == 12
    # The overlay tints polyps green (codec noise moves channel means by about one level).
    assert rgb_out[1] - rgb_in[1] > 5 and abs(rgb_out[0] - rgb_in[0]) < abs(rgb_out[1] - rgb_in[1]), (rgb_out, rgb_in)


def test_meta_mode_attaches_the_segmenters_polyps(gst_env, rt_tiny_model_dir, halfway_profile, tmp_path):
    """Lossless PNG frames in: the ROI metas must be exactly what FrameSegmenter finds on them."""
    images = []
    for f in DemoSource(size=(96, 128), realtime=False, frames=5, seed=2):
        cv2.imwrite(str(tmp_path / f"{f.index:04d}.png"), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
        images.append(f.image)
    pipeline = (f"multifilesrc location={tmp_path}/%04d.png caps=image/png,framerate=10/1 ! pngdec ! videoconvert ! "
                f"video/x-raw,format=RGB ! syndiffseg model={rt_tiny_model_dir} profile={halfway_profile} mode=meta ! "
                "appsink name=sink sync=false")
    result = gst(GST / "read_polyps.py", pipeline, env_extra=gst_env)
    assert result.returncode == 0, result.stderr[-2000:]
    got = [json.loads(line)["polyps"] for line in result.stdout.splitlines()]
    segmenter = FrameSegmenter.load(rt_tiny_model_dir, profile=halfway_profile)
    expected = []
    for image in images:
        r = segmenter(image)
        expected.append([{"box": list(p.box), "area": p.area} for p in find_polyps(r.mask, r.prob)])
    assert len(got) == 5 and any(expected)
    assert [[{"box": p["box"], "area": p["area"]} for p in frame] for frame in got] == expected
    assert all(p["mask_pixels"] >= p["area"] and 0 <= p["score"] <= 1 for frame in got for p in frame)


def test_bad_model_stops_the_pipeline_with_one_line(gst_env, tmp_path):
    pipeline = f"videotestsrc num-buffers=2 ! videoconvert ! syndiffseg model={tmp_path}/absent ! fakesink"
    result = gst(GST / "launch.py", pipeline, env_extra=gst_env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "absent" in errors[0] and "does not exist" in errors[0]
