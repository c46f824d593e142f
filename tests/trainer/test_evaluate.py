import math

import numpy as np
import pytest

from syndiff_trainer.evaluate import fold_table, surface_metrics


def square(top, left, size, shape=(64, 64)):
    m = np.zeros(shape, bool)
    m[top:top + size, left:left + size] = True
    return m


def test_hd95_and_nsd_of_identical_and_shifted_masks():
    a = square(10, 10, 20)
    assert surface_metrics(a, a) == (0.0, 1.0)
    hd95, nsd = surface_metrics(square(13, 10, 20), a)  # shifted 3 px down
    assert hd95 == pytest.approx(3.0)
    assert 0.0 < nsd < 1.0  # top/bottom edges are 3 px apart: beyond the 2 px tolerance
    _, nsd_within = surface_metrics(square(11, 10, 20), a)  # 1 px: within tolerance
    assert nsd_within == 1.0


def test_empty_mask_policy_for_surface_metrics():
    empty = np.zeros((64, 64), bool)
    assert surface_metrics(empty, empty) == (0.0, 1.0)
    hd95, nsd = surface_metrics(empty, square(0, 0, 5))
    assert hd95 == pytest.approx(math.hypot(64, 64)) and nsd == 0.0


def test_fold_table_reports_mean_and_std():
    rows = [{"dice": 0.8, "iou": 0.7, "hd95": 10.0, "nsd": 0.5}, {"dice": 0.9, "iou": 0.8, "hd95": 20.0, "nsd": 0.7}]
    table = fold_table(rows, "t")
    assert "85.0 ± 5.0" in table and "75.0 ± 5.0" in table and "15.0 ± 5.0" in table


def test_bootstrap_ci_resamples_groups_not_images():
    from syndiff_trainer.evaluate import bootstrap_ci

    values = np.array([1.0] * 10 + [0.0] * 10)
    lo, hi = bootstrap_ci(values)  # 20 independent images
    assert lo < 0.5 < hi and hi - lo < 0.5
    glo, ghi = bootstrap_ci(values, groups=["a"] * 10 + ["b"] * 10)  # really two samples
    assert glo == 0.0 and ghi == 1.0
    assert bootstrap_ci(values) == bootstrap_ci(values)  # seeded


def test_small_polyps_are_found_when_half_covered():
    from syndiff_trainer.evaluate import polyp_recall, recall_summary

    truth = square(2, 2, 8) | square(40, 40, 20)  # 64 px (1.6 % of 64x64) and 400 px
    pred = square(2, 2, 8)
    pred[2:6, :] = False  # half of the small one covered
    found = polyp_recall(pred | square(45, 40, 4), truth)
    assert found == [(64 / 4096, True), (400 / 4096, False)]
    summary = recall_summary([("x", *f) for f in found])
    assert summary["small_polyps"] == 1 and summary["small_polyp_recall"] == 1.0 and summary["polyps_found"] == 1


def test_paired_difference_matches_images_by_stem():
    from syndiff_trainer.data import ArrayDataset
    from syndiff_trainer.evaluate import paired_difference

    stems = ["a/1", "a/2", "b/1", "b/2"]
    ds = ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 8, 8), bool), stems, ["s1", "s1", "b/1", "b/2"])
    base = {"dice": 0.5, "by_source": {"a": {"dice": 0.4}, "b": {"dice": 0.6}},
            "images": [{"stem": s, "dice": d} for s, d in zip(stems, (0.4, 0.4, 0.5, 0.7))]}
    same = paired_difference(base, base, ds)
    assert same["dice"] == 0.0 and same["dice_ci"] == [0.0, 0.0]
    # listed in another order than the baseline: pairs are matched by stem, not by position
    new = {"images": [{"stem": s, "dice": d} for s, d in zip(stems[::-1], (1.0, 0.4, 0.4, 0.6))]}
    paired = paired_difference(new, base, ds)  # differences: a/1 +0.2, a/2 0.0, b/1 -0.1, b/2 +0.3
    assert paired["dice"] == pytest.approx(0.1)
    assert paired["by_source"]["a"]["dice"] == pytest.approx(0.1) and paired["by_source"]["b"]["dice"] == pytest.approx(0.1)
    assert -0.1 - 1e-9 <= paired["dice_ci"][0] < 0.1 < paired["dice_ci"][1] <= 0.3 + 1e-9
    assert paired["baseline_dice"] == 0.5 and paired["by_source"]["b"]["baseline_dice"] == 0.6
