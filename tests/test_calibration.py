"""Calibration profiles: format, measurement, and what `run --profile` does with them."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import rt_write_video
from syndiff_stream.calibration import (ColorSpec, FovSpec, Profile, ProfileError, ProfilePreprocessor,
                                        calibrate_profile, color_correction, fixed_fov, load_manifest, load_profile,
                                        read_frames, save_profile)
from syndiff_stream.cli import app
from syndiff_stream.frames import Frame
from syndiff_stream.smoothing import SmoothingConfig
from syndiff_stream.sources import DemoSource, PseudoVideoSource

REPO = Path(__file__).resolve().parents[1]
KVASIR = REPO.parent / "shared" / "data" / "kvasir-seg-train"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_shipped_default_profile_is_the_runtime_default():
    profile = load_profile(REPO / "calibration" / "default.json")
    assert profile == Profile(name="default", calibrated=profile.calibrated)
    cfg = profile.smoothing_config()
    assert cfg == SmoothingConfig.at(0.5)  # as cli.smoothing_config


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_profile_round_trips(tmp_path, suffix):
    profile = Profile(name="olympus-190", scope="CF-HQ190", site="ward 3", threshold=0.42,
                      fov=FovSpec(mode="fixed", box=(10, 4, 150, 116), frame_size=(120, 160)),
                      color=ColorSpec(method="gain_offset", gain=(1.1, 0.9, 1.0), offset=(-3, 2, 0)))
    assert load_profile(save_profile(profile, tmp_path / f"p{suffix}")) == profile


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(threshold=1.5), "threshold"),
    (lambda d: d.update(thresold=0.5), "thresold"),
    (lambda d: d["fov"].update(mode="fixed"), "fov"),
    (lambda d: d["fov"].update(mode="fixed", box=[0, 0, 500, 10], frame_size=[120, 160]), "does not fit"),
    (lambda d: d["color"].update(method="gain_offset", gain=[9, 1, 1]), "gains"),
    (lambda d: d.pop("format"), "not a calibration profile"),
])
def test_bad_profile_is_one_line_before_any_frame(tmp_path, rt_tiny_model_dir, monkeypatch, edit, named):
    data = json.loads((REPO / "calibration" / "default.json").read_text())
    edit(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=named):
        load_profile(path)

    def no_source(*args, **kwargs):
        raise AssertionError("a source was opened before the profile was checked")

    monkeypatch.setattr("syndiff_stream.sources.open_source", no_source)
    result = invoke("run", "demo", "--model", rt_tiny_model_dir, "--profile", path, "--publish", "")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and named in result.output


def test_profile_for_another_frame_size_fails_before_decoding(tmp_path, rt_tiny_model_dir, rt_video):
    profile = Profile(fov=FovSpec(mode="fixed", box=(0, 0, 700, 500), frame_size=(576, 720)))
    save_profile(profile, tmp_path / "p.json")
    result = invoke("run", rt_video, "--model", rt_tiny_model_dir, "--profile", tmp_path / "p.json", "--publish", "")
    assert result.exit_code == 2 and "720x576" in result.output and "160x120" in result.output


def test_fixed_fov_only_when_frames_agree():
    frames = list(DemoSource(size=(120, 160), realtime=False, frames=4))
    spec = fixed_fov(frames)
    assert spec.mode == "fixed" and spec.frame_size == (120, 160)
    x0, y0, x1, y1 = spec.box
    assert x1 - x0 < 160 and y1 - y0 <= 120  # the circular scope image, not the whole frame
    mixed = frames + list(DemoSource(size=(144, 180), realtime=False, frames=1))
    assert fixed_fov(mixed).mode == "auto"


def test_color_correction_undoes_a_colour_cast():
    """A scope whose red channel reads 20% low and blue 15 levels high: the measured gain/offset
    bring the frames back to what the same scene measures without the cast."""
    frames = list(DemoSource(size=(120, 160), realtime=False, frames=6, seed=3))
    cast = ColorSpec(method="gain_offset", gain=(0.8, 1.0, 1.0), offset=(0, 0, 15))
    cast_frames = [Frame(cast.apply(f.image), "cast", f.index, None) for f in frames]
    fov = fixed_fov(frames)
    fixed = color_correction(cast_frames, fov)
    reference = color_correction(frames, fov)
    corrected = [fixed.apply(f.image).astype(float) for f in cast_frames]
    expected = [reference.apply(f.image).astype(float) for f in frames]
    inside = frames[0].image.max(axis=2) > 20
    err = np.mean([np.abs(c - e)[inside].mean() for c, e in zip(corrected, expected)])
    assert err < 4, f"mean error {err:.1f} levels after correction"
    assert fixed.gain[0] > 1.15 * reference.gain[0]


def test_profile_preprocessor_applies_fov_and_colour():
    frame = next(iter(DemoSource(size=(120, 160), realtime=False, frames=1)))
    profile = Profile(fov=FovSpec(mode="fixed", box=(20, 10, 140, 110), frame_size=(120, 160)),
                      color=ColorSpec(method="gain_offset", gain=(0.5, 0.5, 0.5)))
    item = ProfilePreprocessor(64, profile)(frame)
    assert (item.fov.x0, item.fov.y0, item.fov.x1, item.fov.y1) == (20, 10, 140, 110)
    plain = ProfilePreprocessor(64, Profile(fov=profile.fov))(frame)
    assert item.x.mean() < plain.x.mean() - 0.2  # half the brightness reached the model
    assert item.frame.image is frame.image  # overlays are drawn on the original colours


def test_calibration_finds_the_threshold_that_maximises_dice():
    """A fake model whose probability is 0.3 inside the true mask and 0.1 outside: only a
    threshold in (0.1, 0.3] gives Dice 1, and calibration must find one."""
    frames = list(DemoSource(size=(96, 128), realtime=False, frames=8, seed=1))

    def predict(x):
        out = []
        for f in frames[predict.i:predict.i + len(x)]:
            from syndiff_stream.preprocess import find_field_of_view, prepare_mask

            truth = prepare_mask(f.truth, find_field_of_view(f.image), 64)
            out.append(np.where(truth, 0.3, 0.1).astype(np.float32))
        predict.i = (predict.i + len(x)) % len(frames)
        return np.stack(out)

    predict.i = 0
    profile = calibrate_profile(frames, predict, 64, name="demo")
    assert 0.1 < profile.threshold <= 0.3
    assert profile.calibrated["dice_raw"] > 0.9 > profile.calibrated["dice_raw_default_threshold"]
    assert profile.calibrated["labelled"] and profile.fov.mode == "fixed"


@pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"real images not found at {KVASIR}")
def test_calibrate_command_on_labelled_real_frames_then_run_with_it(tmp_path, rt_tiny_model_dir):
    """Frames of a camera gliding over Kvasir-SEG images (one frame size, true masks) written as
    PNGs; calibrate measures a profile with an INT8 manifest; run applies it."""
    src = PseudoVideoSource(KVASIR, size=(96, 128), frames_per_image=4, limit_images=3)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for f in src:
        cv2.imwrite(str(tmp_path / "images" / f"{f.index:04d}.png"), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(tmp_path / "masks" / f"{f.index:04d}.png"), f.truth.astype(np.uint8) * 255)
    out = tmp_path / "site.json"
    result = invoke("calibrate", "--frames", tmp_path / "images", "--masks", tmp_path / "masks", "--model",
                    rt_tiny_model_dir, "--out", out, "--int8-frames", 4, "--backend", "eager", "--name", "ward3")
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert profile.name == "ward3" and profile.calibrated["frames"] == 12 and profile.calibrated["labelled"]
    assert {"dice_smoothed", "flicker_smoothed"} <= set(profile.calibrated)
    assert len(profile.int8.frames) == 4 and len(load_manifest(profile.int8)) == 4
    result = invoke("run", tmp_path / "images", "--model", rt_tiny_model_dir, "--profile", out, "--publish", "",
                    "--backend", "eager", "--masks", tmp_path / "pred", "--quiet")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "pred").glob("*.png"))) == 12


def test_calibrate_a_video_without_masks(tmp_path, rt_tiny_model_dir):
    video = tmp_path / "clip.mp4"
    rt_write_video(video, frames=10)
    frames, manifest = read_frames(video, limit=5)
    assert [f.index for f in frames] == [0, 2, 4, 7, 9] and all(m.index == f.index for m, f in zip(manifest, frames))
    result = invoke("calibrate", "--frames", video, "--model", rt_tiny_model_dir, "--out", tmp_path / "p.yaml",
                    "--backend", "eager", "--int8-frames", 3)
    assert result.exit_code == 0, result.output
    profile = load_profile(tmp_path / "p.yaml")
    assert profile.fov.mode == "fixed" and profile.fov.frame_size == (120, 160)
    assert profile.threshold == 0.5 and not profile.calibrated["labelled"]
    assert len(load_manifest(profile.int8)) == 3


def test_changed_calibration_file_is_detected(tmp_path):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    _, manifest = read_frames(tmp_path)
    profile = Profile(int8={"frames": [m.model_dump() for m in manifest]})
    cv2.imwrite(str(image), np.full((8, 8, 3), 9, np.uint8))
    with pytest.raises(ProfileError, match="changed since calibration"):
        load_manifest(profile.int8)
