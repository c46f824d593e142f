import numpy as np

from syndiff_stream.postprocess import find_polyps


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
