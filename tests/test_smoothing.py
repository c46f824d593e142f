import cv2
import numpy as np
import pytest

from syndiff_stream.preprocess import FieldOfView, find_field_of_view, prepare_mask, to_source
from syndiff_stream.smoothing import (SmoothingConfig, Smoother, evaluate_smoothing, flicker, remove_small)
from syndiff_stream.sources import DemoSource

FOV = FieldOfView(0, 0, 32, 32)


def image(value=100):
    return np.full((32, 32, 3), value, np.uint8)


def test_off_is_exactly_the_per_frame_threshold():
    rng = np.random.default_rng(0)
    smoother = Smoother.off(0.5)
    for _ in range(3):
        prob = rng.random((16, 16)).astype(np.float32)
        fov = FieldOfView(2, 3, 30, 29)
        prob_src, mask = smoother.update(image(), prob, fov)
        assert np.array_equal(mask, to_source(prob, fov, 32, 32) >= 0.5)


def test_ema_blends_frames_and_resets_on_a_scene_cut():
    smoother = Smoother(SmoothingConfig(alpha=0.5, min_area=0))
    smoother.update(image(100), np.ones((8, 8), np.float32), FOV)
    prob, _ = smoother.update(image(100), np.zeros((8, 8), np.float32), FOV)
    assert np.allclose(prob, 0.5)
    prob, _ = smoother.update(image(250), np.zeros((8, 8), np.float32), FOV)  # a cut: no blending
    assert np.allclose(prob, 0.0) and smoother.cuts == 1


def test_temporal_hysteresis_keeps_pixels_on_between_low_and_high():
    smoother = Smoother(SmoothingConfig(alpha=1.0, high=0.6, low=0.3, min_area=0))
    p = np.full((8, 8), 0.45, np.float32)
    assert not smoother.update(image(), p, FOV)[1].any()  # never reached high: off
    smoother.update(image(), np.full((8, 8), 0.7, np.float32), FOV)
    assert smoother.update(image(), p, FOV)[1].all()  # was on, still above low: stays on
    assert not smoother.update(image(), np.full((8, 8), 0.2, np.float32), FOV)[1].any()


def test_min_area_drops_small_components():
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True
    mask[8:18, 8:18] = True
    kept = remove_small(mask, 10)
    assert kept[10, 10] and not kept[1, 1]


def test_flicker_measures_change_between_consecutive_masks():
    a, b = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert flicker([a, a, a]) == 0.0
    assert flicker([a, b, a]) == 1.0


def test_config_is_validated():
    with pytest.raises(ValueError):
        SmoothingConfig(low=0.6, high=0.5)


def test_smoothing_lowers_flicker_without_costing_dice():
    """A jittery per-frame predictor on a moving demo sequence: smoothing must cut flicker and keep
    Dice within one point (the same measurement `bench --smoothing` reports for a real model)."""
    frames = list(DemoSource(size=(144, 180), realtime=False, frames=40, seed=3))
    assert sum(f.truth.any() for f in frames) > 30  # polyps in view: a real test of Dice

    def jittery(frame):
        fov = find_field_of_view(frame.image)
        soft = cv2.GaussianBlur(prepare_mask(frame.truth, fov, 64).astype(np.float32), (0, 0), 1.5)
        noise = cv2.GaussianBlur(np.random.default_rng(frame.index).standard_normal((64, 64)).astype(np.float32), (0, 0), 2)
        return np.clip(soft + 0.9 * noise, 0, 1), fov

    report = evaluate_smoothing(frames, jittery, SmoothingConfig())
    assert report.frames == 40
    assert report.flicker_smoothed < 0.5 * report.flicker_raw
    assert report.dice_smoothed >= report.dice_raw - 0.01
