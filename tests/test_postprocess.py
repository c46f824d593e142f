import numpy as np

import cv2
import pytest

from syndiff_stream.postprocess import component_means, components, find_polyps


def test_one_record_per_component_largest_first():
    mask = np.zeros((50, 60), bool)
    mask[5:15, 10:30] = True  # 200 px
    mask[30:40, 40:45] = True  # 50 px
    prob = np.where(mask, 0.9, 0.1).astype(np.float32)
    prob[30:40, 40:45] = 0.6
    polyps = find_polyps(mask, prob)
    assert [p.box for p in polyps] == [(10, 5, 30, 15), (40, 30, 45, 40)]
    assert [p.area for p in polyps] == [200, 50]
    assert np.allclose([p.score for p in polyps], [0.9, 0.6])
    x0, y0, x1, y1 = polyps[0].box
    assert (polyps[0].contour[:, 0] >= x0).all() and (polyps[0].contour[:, 0] < x1).all()
    assert polyps[0].as_dict() == {"box": [10, 5, 30, 15], "area": 200, "score": 0.9}


def test_empty_mask_has_no_polyps():
    assert find_polyps(np.zeros((8, 8), bool), np.zeros((8, 8), np.float32)) == []


def test_every_component_gets_its_outline_even_inside_a_hole():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    mask[10:30, 10:30] = False  # a ring ...
    mask[18:22, 18:22] = True  # ... with a polyp in its hole
    polyps = find_polyps(mask, mask.astype(np.float32))
    assert [p.area for p in polyps] == [500, 16]
    inner = polyps[1].contour
    assert inner[:, 0].min() >= 18 and inner[:, 0].max() <= 21


def test_many_components_stay_cheap():
    rng = np.random.default_rng(0)
    mask = rng.random((300, 300)) > 0.7  # speckle, like an untrained model's output
    polyps = find_polyps(mask, mask.astype(np.float32))
    assert sum(p.area for p in polyps) == mask.sum() and all(len(p.contour) for p in polyps)


@pytest.mark.parametrize("seed", range(20))
def test_components_in_the_bounding_box_equal_labelling_the_whole_frame(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((72, 90), bool)
    if seed:  # seed 0: the empty mask
        y, x = rng.integers(0, 60), rng.integers(0, 75)
        mask[y:y + rng.integers(2, 12), x:x + rng.integers(2, 15)] = rng.random() > 0.3
        mask |= rng.random(mask.shape) > 0.995
    cc = components(mask)
    n_ref, labels_ref, stats_ref, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    assert cc.count == n_ref and (cc.labels == labels_ref).all() and (cc.stats == stats_ref).all()
    assert (cc.labels[cc.box] > 0).sum() == mask.sum()  # every component inside the box


def test_outlines_are_at_frame_coordinates():
    mask = np.zeros((60, 80), bool)
    mask[40:50, 60:70] = True
    (polyp,) = find_polyps(mask, mask.astype(np.float32))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    assert (polyp.contour == contours[0].reshape(-1, 2)).all()


@pytest.mark.parametrize("seed", range(12))
def test_component_means_equal_a_bincount_over_the_labels(seed):
    """Each component's own box and mask (ring-and-hole overlaps included) give its mean exactly
    as a bincount over the whole label image does."""
    rng = np.random.default_rng(seed)
    mask = rng.random((61, 83)) > 0.8
    mask[7:40, 9:50] = True
    mask[12:35, 14:45] = False  # a ring whose box holds other components
    mask[20:25, 20:30] = seed % 2 == 0
    prob = rng.random(mask.shape).astype(np.float32)
    cc = components(mask)
    sums = np.bincount(cc.labels.ravel(), weights=prob.ravel(), minlength=cc.count)
    reference = sums / np.maximum(cc.stats[:, cv2.CC_STAT_AREA], 1)
    means = component_means(cc, prob)
    assert means[0] == 0 and np.allclose(means[1:], reference[1:], rtol=1e-6, atol=1e-7)


def polyp_records(polyps):
    return [(p.box, p.area, p.score, p.contour.tolist()) for p in polyps]


@pytest.mark.parametrize("seed", range(12))
def test_the_labelling_after_small_region_removal_gives_the_polyps_a_fresh_one_does(seed):
    """`finish` labels a frame once: the removal's labelling, less the components it removed, is
    the removed mask's labelling (same polyps, scores and outlines as labelling it again)."""
    from syndiff_stream.smoothing import remove_small_components

    rng = np.random.default_rng(seed)
    mask = rng.random((61, 83)) > 0.93  # specks, most of them removed
    mask[7:40, 9:50] = True
    mask[12:35, 14:45] = False  # a ring around an island
    mask[20:25, 20:30] = seed % 2 == 0
    prob = rng.random(mask.shape).astype(np.float32)
    support = rng.random(mask.shape) > 0.5 if seed % 3 == 0 else None
    removed, cc = remove_small_components(mask, 2 + seed % 4, support)
    assert cc is not None and set(cc.ids) < set(range(1, cc.count))  # something was removed
    assert polyp_records(find_polyps(removed, prob, cc)) == polyp_records(find_polyps(removed, prob))
    assert [removed.sum()] == [sum(cc.stats[cc.ids, cv2.CC_STAT_AREA])]
