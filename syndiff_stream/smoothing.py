"""Temporal smoothing of per-frame probabilities into stable masks, and a measurement of what it buys.

A per-frame segmenter flickers: border pixels and faint false positives switch on and off from one
frame to the next, which reads as noise on a live overlay. Three remedies, each with a knob:
  EMA          p_t = alpha * prob_t + (1 - alpha) * p_{t-1}, reset on a scene cut (a large frame
               difference) or a moved field of view, so a cut never blends two scenes;
  hysteresis   a pixel turns on at p >= high and stays on while p >= low (temporal: it uses the
               previous mask), so values hovering at the threshold do not toggle;
  min area     connected components smaller than a fraction of the field of view are dropped.
`Smoother.off(threshold)` is the identity: mask = prob >= threshold at source resolution, exactly
what the model predicts frame by frame.

`evaluate_smoothing` measures Dice against true masks and flicker (mean 1 - IoU of consecutive
masks) with and without smoothing on the same probabilities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import cv2
import numpy as np

from .frames import Frame
from .metrics import dice, iou
from .preprocess import FieldOfView, to_source

THUMB = 32  # scene-cut detection compares 32x32 grey thumbnails


@dataclass(frozen=True)
class SmoothingConfig:
    alpha: float = 0.6  # weight of the newest frame; 1 disables the EMA
    high: float = 0.5  # turn on at p >= high ...
    low: float = 0.35  # ... stay on while p >= low
    min_area: float = 0.002  # fraction of the field of view; smaller components are dropped
    cut_threshold: float = 0.15  # mean |difference| of thumbnails (0..1) that counts as a scene cut
    fov_tolerance: float = 0.05  # field-of-view change (fraction of its size) that resets the EMA

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0 <= self.low <= self.high <= 1:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")

    @classmethod
    def off(cls, threshold: float = 0.5) -> "SmoothingConfig":
        return cls(alpha=1.0, high=threshold, low=threshold, min_area=0.0, cut_threshold=math.inf)


def thumbnail(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components with fewer than `min_pixels` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False
    return keep[labels]


class Smoother:
    """Stateful per-stream smoother: feed frames in order with `update`."""

    def __init__(self, config: SmoothingConfig | None = None):
        self.config = config or SmoothingConfig()
        self.cuts = 0
        self.reset()

    @classmethod
    def off(cls, threshold: float = 0.5) -> "Smoother":
        return cls(SmoothingConfig.off(threshold))

    def reset(self) -> None:
        self.ema: np.ndarray | None = None
        self.fov: FieldOfView | None = None
        self.thumb: np.ndarray | None = None
        self.mask: np.ndarray | None = None

    def is_cut(self, thumb: np.ndarray, fov: FieldOfView) -> bool:
        cfg = self.config
        if self.thumb is None or self.fov is None:
            return False
        moved = max(abs(a - b) for a, b in zip(
            (fov.x0, fov.y0, fov.x1, fov.y1), (self.fov.x0, self.fov.y0, self.fov.x1, self.fov.y1)))
        if moved > cfg.fov_tolerance * max(fov.width, fov.height):
            return True
        return float(np.abs(thumb - self.thumb).mean()) > cfg.cut_threshold

    def update(self, image: np.ndarray, prob: np.ndarray, fov: FieldOfView) -> tuple[np.ndarray, np.ndarray]:
        """Source frame (H, W, 3), model-resolution probability (S, S), its field of view ->
        (smoothed probability at source resolution, bool mask at source resolution)."""
        cfg = self.config
        h, w = image.shape[:2]
        thumb = thumbnail(image) if math.isfinite(cfg.cut_threshold) else None
        if self.ema is not None and (self.ema.shape != prob.shape or self.mask.shape != (h, w)
                                     or (thumb is not None and self.is_cut(thumb, fov))):
            self.cuts += 1
            self.reset()
        prob = prob.astype(np.float32)
        self.ema = prob if self.ema is None or cfg.alpha >= 1 else cfg.alpha * prob + (1 - cfg.alpha) * self.ema
        self.fov, self.thumb = fov, thumb
        prob_src = to_source(self.ema, fov, h, w)
        mask = prob_src >= cfg.high
        if self.mask is not None and cfg.low < cfg.high:
            mask |= self.mask & (prob_src >= cfg.low)
        mask = remove_small(mask, cfg.min_area * fov.width * fov.height)
        self.mask = mask
        return prob_src, mask


# ---- measurement --------------------------------------------------------------------------------

def flicker(masks: list[np.ndarray]) -> float:
    """Mean 1 - IoU of consecutive masks (0: perfectly stable; two empty masks count as stable)."""
    if len(masks) < 2:
        return 0.0
    return float(np.mean([1 - iou(a, b) for a, b in zip(masks, masks[1:])]))


@dataclass(frozen=True)
class SmoothingReport:
    frames: int
    dice_raw: float
    dice_smoothed: float
    flicker_raw: float
    flicker_smoothed: float
    flicker_truth: float  # the true masks' own frame-to-frame change: motion, not noise

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def evaluate_smoothing(frames: Iterable[Frame], predict: Callable[[Frame], tuple[np.ndarray, FieldOfView]],
                       config: SmoothingConfig | None = None, threshold: float = 0.5) -> SmoothingReport:
    """Run `predict(frame) -> (model-resolution prob, fov)` once per frame and score the raw and
    the smoothed masks against each frame's true mask (mean per-frame Dice) and for flicker."""
    raw, smooth = Smoother.off(threshold), Smoother(config)
    raw_masks, smooth_masks, truths = [], [], []
    for frame in frames:
        if frame.truth is None:
            raise ValueError(f"frame {frame.index} of {frame.source_id} has no true mask to score against")
        prob, fov = predict(frame)
        raw_masks.append(raw.update(frame.image, prob, fov)[1])
        smooth_masks.append(smooth.update(frame.image, prob, fov)[1])
        truths.append(frame.truth)
    return SmoothingReport(
        frames=len(truths),
        dice_raw=float(np.mean([dice(m, t) for m, t in zip(raw_masks, truths)])),
        dice_smoothed=float(np.mean([dice(m, t) for m, t in zip(smooth_masks, truths)])),
        flicker_raw=flicker(raw_masks), flicker_smoothed=flicker(smooth_masks), flicker_truth=flicker(truths),
    )
