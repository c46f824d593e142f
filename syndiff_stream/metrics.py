"""Overlap metrics on binary masks. Empty-mask policy: both empty scores 1 (a correct "no polyp"),
exactly one empty scores 0."""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, target).sum() / total)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    union = np.logical_or(pred, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, target).sum() / union)
