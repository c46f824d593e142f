import cv2
import numpy as np
import pytest

from syndiff_stream.preprocess import FieldOfView, find_field_of_view, prepare_mask, to_source, to_source_mask
from syndiff_stream.smoothing import (Motion, SmoothingConfig, Smoother, evaluate_smoothing, flicker, flow_gray,
                                     has_false_positive, matched, remove_small, shrink, warp)
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
    smoother = Smoother(SmoothingConfig(alpha=0.5, min_area=0, motion=False))
    smoother.update(image(100), np.ones((8, 8), np.float32), FOV)
    prob, _ = smoother.update(image(100), np.zeros((8, 8), np.float32), FOV)
    assert np.allclose(prob, 0.5)
    prob, _ = smoother.update(image(250), np.zeros((8, 8), np.float32), FOV)  # a cut: no blending
    assert np.allclose(prob, 0.0) and smoother.cuts == 1


def test_temporal_hysteresis_keeps_pixels_on_between_low_and_high():
    smoother = Smoother(SmoothingConfig(alpha=1.0, high=0.6, low=0.3, min_area=0, support=False))
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
    """A jittery per-frame predictor on a moving demo sequence: smoothing must cut flicker by more
    than a third, keep Dice within one point and add no false-positive frames (the same
    measurement `bench --smoothing` reports for a real model)."""
    frames = list(DemoSource(size=(144, 180), realtime=False, frames=40, seed=3))
    assert sum(f.truth.any() for f in frames) > 30  # polyps in view: a real test of Dice

    def jittery(frame):
        fov = find_field_of_view(frame.image)
        soft = cv2.GaussianBlur(prepare_mask(frame.truth, fov, 64).astype(np.float32), (0, 0), 1.5)
        noise = cv2.GaussianBlur(np.random.default_rng(frame.index).standard_normal((64, 64)).astype(np.float32), (0, 0), 2)
        return np.clip(soft + 0.9 * noise, 0, 1), fov

    report = evaluate_smoothing(frames, jittery, SmoothingConfig())
    assert report.frames == 40
    assert report.flicker_smoothed < 0.6 * report.flicker_raw
    assert report.dice_smoothed >= report.dice_raw - 0.01
    assert report.fp_smoothed <= report.fp_raw


def test_support_drops_components_the_current_frame_does_not_see():
    smoother = Smoother(SmoothingConfig(alpha=0.5, high=0.5, low=0.5, min_area=0, motion=False))
    p = np.zeros((8, 8), np.float32)
    p[2:6, 2:6] = 1.0
    assert smoother.update(image(), p, FOV)[1][16, 16]
    prob, mask = smoother.update(image(), np.zeros((8, 8), np.float32), FOV)
    assert prob[16, 16] >= 0.5 and not mask.any()  # memory alone (p = 0.5) shows nothing


def test_has_false_positive_is_a_component_that_misses_the_truth():
    truth, mask = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    truth[2:8, 2:8] = mask[4:10, 4:10] = True
    assert not has_false_positive(mask, truth) and not has_false_positive(np.zeros_like(mask), truth)
    mask[15:18, 15:18] = True
    assert has_false_positive(mask, truth)


# ---- motion ------------------------------------------------------------------------------------

def texture(h=400, w=480, seed=0):
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 4)
    return cv2.normalize(t, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def test_warp_with_zero_flow_is_the_identity_at_any_size():
    flow = np.zeros((24, 24, 2), np.float32)
    state = np.random.default_rng(1).random((96, 96)).astype(np.float32)
    assert np.allclose(warp(state, flow), state, atol=1e-5)
    assert np.array_equal(warp((state > 0.5).astype(np.uint8), flow, nearest=True), (state > 0.5).astype(np.uint8))


@pytest.mark.parametrize("dx, dy", [(-20, 12), (9, 0), (0, -15)])
def test_flow_follows_a_camera_shift_and_warp_moves_the_memory_with_it(dx, dy):
    tex = texture()
    prev, curr = tex[60:316, 100:356], tex[60 - dy:316 - dy, 100 - dx:356 - dx]  # content moves by (dx, dy)
    fov = FieldOfView(0, 0, 256, 256)
    g0, g1 = flow_gray(prev, fov, 96), flow_gray(curr, fov, 96)
    flow = Motion().flow(g0, g1)
    # current pixel x came from x + flow: the content moved by -flow, in thumbnail pixels
    assert np.allclose(np.median(flow.reshape(-1, 2), axis=0) * 256 / 96, (-dx, -dy), atol=1.5)
    state = np.zeros((256, 256), np.float32)
    state[100:140, 110:150] = 1
    ys, xs = np.nonzero(warp(state, flow) > 0.5)
    assert abs(xs.mean() - (129.5 + dx)) < 2 and abs(ys.mean() - (119.5 + dy)) < 2
    assert matched(g0, g1, flow, 0.1).mean() > 0.8  # the same scene, followed: memory stays valid


def test_memory_is_forgotten_where_the_warped_frame_does_not_match():
    tex = texture()[:256, :256]
    g0 = flow_gray(tex, FieldOfView(0, 0, 256, 256), 96)
    g1 = g0.copy()
    g1[:, 48:] = 255  # the right half changed beyond recognition (glare)
    valid = matched(g0, g1, Motion().flow(g0, g1), 0.1)
    assert valid[:, :40].mean() > 0.9 and valid[:, 56:].mean() < 0.1


def jump_sequence(camera_jump: bool, frames_before=6, frames_after=6, size=(240, 320)):
    """A textured scene with a polyp (bright disc) whose view jumps across the frame at
    `frames_before`: either the polyp moves (the scene stays), or the camera jumps (everything moves).
    Yields (image, model-resolution probability, old position mask, new position mask)."""
    h, w = size
    big = cv2.cvtColor(texture(2 * h, 2 * w, seed=4), cv2.COLOR_GRAY2RGB)
    fov = FieldOfView(0, 0, w, h)
    for i in range(frames_before + frames_after):
        after = i >= frames_before
        img = big[:h, :w].copy() if not (after and camera_jump) else big[h // 2:h // 2 + h, w // 2:w // 2 + w].copy()
        centre = (w - 70, h - 60) if after else (70, 60)
        cv2.circle(img, centre, 35, (230, 150, 140), -1)
        polyp = np.zeros((h, w), np.uint8)
        cv2.circle(polyp, centre, 35, 1, -1)
        prob = cv2.GaussianBlur(cv2.resize(polyp.astype(np.float32), (64, 64)), (0, 0), 1.0)
        old = np.zeros((h, w), bool)
        cv2.circle(old.view(np.uint8), (70, 60), 35, 1, -1)
        yield img, np.clip(prob * 1.1, 0, 1), fov, after, old


@pytest.mark.parametrize("camera_jump", [False, True], ids=["polyp jumps", "camera jumps"])
@pytest.mark.parametrize("config", [SmoothingConfig(), SmoothingConfig(support=False)], ids=["default", "motion only"])
def test_no_ghost_at_the_old_position_after_a_jump(camera_jump, config):
    """The default shows no mask at the old position from the first frame after the jump (zero
    frames of hysteresis for a whole polyp); so does the motion warp alone."""
    smoother = Smoother(config)
    for img, prob, fov, after, old in jump_sequence(camera_jump):
        mask = smoother.update(img, prob, fov)[1]
        assert mask.any()  # the polyp is found, before and after
        if after:
            assert not (mask & old).any()


def test_the_old_ema_left_a_ghost_after_a_jump():
    """What issue 15 reported, kept as a check that the jump test above can fail: the previous
    default (EMA 0.6, hysteresis 0.5/0.35, no motion, no support)."""
    smoother = Smoother(SmoothingConfig(low=0.35, motion=False, support=False))
    ghosts = []
    for img, prob, fov, after, old in jump_sequence(camera_jump=False):
        mask = smoother.update(img, prob, fov)[1]
        if after:
            ghosts.append((mask & old).any())
    assert ghosts[0]


def test_off_with_a_minimum_area_drops_only_the_small_components():
    prob = np.zeros((32, 32), np.float32)
    prob[1:3, 1:3] = 0.9  # 4 px: under 1 % of the field of view
    prob[10:20, 10:20] = 0.9
    _, mask = Smoother.off(0.5, min_area=0.01).update(image(), prob, FOV)
    assert mask.sum() == 100 and not mask[1:3, 1:3].any()
    assert SmoothingConfig.off(0.5, 0.01).is_off and SmoothingConfig.off(0.5, 0.01).describe() == "off (min area 0.01)"


def test_the_runtime_takes_a_checkpoints_operating_point():
    from syndiff_stream.calibration import Profile
    from syndiff_stream.model import preset_config
    from syndiff_stream.stages import default_smoothing

    chosen = preset_config("tiny", threshold=0.7, min_area=0.01)
    on, off = default_smoothing(True, chosen), default_smoothing(False, chosen)
    assert (on.high, on.min_area, on.is_off) == (0.7, 0.01, False)
    assert (off.high, off.min_area, off.is_off) == (0.7, 0.01, True)
    unset = default_smoothing(True, preset_config("tiny"))  # an older checkpoint: the smoothing's own minimum
    assert unset.min_area == SmoothingConfig().min_area and default_smoothing(False, preset_config("tiny")).min_area == 0
    profile = Profile.for_model(chosen)
    assert profile.threshold == 0.7 and profile.smoothing_config(False).min_area == 0.01
    with pytest.raises(ValueError, match="min_area"):
        preset_config("tiny", min_area=1.5)


@pytest.mark.parametrize("size", [(1080, 1920), (576, 720), (75, 101)])
def test_shrink_is_the_area_resize_to_a_grey_level(size):
    """The halving steps first change rounding only: at most two grey levels from one INTER_AREA
    resize (under one on average), and exactly it when the image is too small to halve."""
    rng = np.random.default_rng(0)
    gray = cv2.GaussianBlur((rng.random(size) * 255).astype(np.uint8), (0, 0), 4)
    for side in (32, 96):
        direct = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA).astype(int)
        fast = shrink(gray, side, side).astype(int)
        assert fast.shape == (side, side) and np.abs(fast - direct).max() <= 2 and np.abs(fast - direct).mean() < 1
        if size[0] < 4 * side:
            assert (fast == direct).all()


@pytest.mark.parametrize("size", [(1065, 1065), (1067, 1063)])
def test_an_odd_side_loses_its_last_row_or_column_before_halving(size):
    """A field-of-view crop has odd sides as often as not; halving it exactly needs an even one. The
    thumbnail is the one of the crop a pixel smaller, about a grey level from the direct resize on
    this fine texture (sigma 4 pixels: more detail than a colonoscopy frame holds)."""
    rng = np.random.default_rng(0)
    gray = cv2.GaussianBlur((rng.random(size) * 255).astype(np.uint8), (0, 0), 4)
    for side in (32, 96):
        even = gray[:size[0] // 2 * 2, :size[1] // 2 * 2]
        assert (shrink(gray, side, side) == shrink(even, side, side)).all()
        direct = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA).astype(int)
        assert np.abs(shrink(gray, side, side).astype(int) - direct).mean() <= 1.0


@pytest.mark.parametrize("fov", [FieldOfView(0, 0, 48, 32), FieldOfView(5, 2, 41, 30), FieldOfView(0, 3, 48, 29)])
def test_to_source_is_the_resized_map_inside_the_field_of_view_and_zero_outside(fov):
    prob = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    expected = np.zeros((32, 48), np.float32)
    expected[fov.y0:fov.y1, fov.x0:fov.x1] = cv2.resize(prob, (fov.width, fov.height), interpolation=cv2.INTER_LINEAR)
    out = to_source(prob, fov, 32, 48)
    assert out.dtype == np.float32 and out.shape == (32, 48) and np.array_equal(out, expected)
    for threshold in (0.5, 0.0):  # the support map: thresholded inside, bordered as bytes
        support = to_source_mask(prob, fov, 32, 48, threshold)
        assert support.dtype == bool and np.array_equal(support, expected >= threshold)
