import numpy as np

from syndiff_stream.metrics import dice, iou


def test_dice_and_iou_against_hand_computed_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:5] = True  # 20 px
    b[2:6, 0:5] = True  # 20 px, overlap 10
    assert dice(a, b) == 2 * 10 / 40
    assert iou(a, b) == 10 / 30


def test_empty_mask_policy():
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, full) == 0.0 and iou(full, empty) == 0.0
