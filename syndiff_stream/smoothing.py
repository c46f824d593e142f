"""Temporal smoothing of per-frame probabilities into stable masks, and a measurement of what it buys.

A per-frame segmenter flickers: border pixels and faint false positives switch on and off from one
frame to the next, which reads as noise on a live overlay. The remedies, each with a knob:
  EMA          p_t = alpha * prob_t + (1 - alpha) * p_{t-1}, reset on a scene cut (a large frame
               difference) or a moved field of view, so a cut never blends two scenes;
  motion       before blending, the memory (p_{t-1} and the previous mask) is warped along a dense
               optical flow (DIS, on a `flow_size` grey thumbnail of the field of view) from the
               previous frame to this one, so it follows the scope instead of staying where the
               polyp was; pixels whose warped previous grey value does not match this frame's
               (`mismatch`: an occlusion, a jump the flow could not follow) forget their memory;
  hysteresis   a pixel turns on at p >= high and stays on while p >= low (temporal: it uses the
               previous, warped mask), so values hovering at the threshold do not toggle; off by
               default (low = high): it cost Dice on CVC-ClinicDB sequences (docs/runtime.md);
  support      a component is shown only if this frame's own prediction (prob >= high) touches
               it: memory may shape and steady a polyp the model sees now, never keep one it no
               longer sees (no ghost after a jump, zero frames of hysteresis for a whole polyp);
  min area     connected components smaller than a fraction of the field of view are dropped.
`Smoother.off(threshold)` is the identity: mask = prob >= threshold at source resolution, exactly
what the model predicts frame by frame; `Smoother.off(threshold, min_area)` also drops components
under the minimum area, the per-frame half of a checkpoint's operating point.

`evaluate_smoothing` measures Dice against true masks, frames with a false-positive component and
flicker (mean 1 - IoU of consecutive masks) with and without smoothing on the same probabilities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Iterable

import cv2
import numpy as np

from .frames import Frame
from .metrics import dice, iou
from .postprocess import Components, components
from .preprocess import FieldOfView, to_source, to_source_mask

THUMB = 32  # scene-cut detection compares 32x32 grey thumbnails


@dataclass(frozen=True)
class SmoothingConfig:
    alpha: float = 0.6  # weight of the newest frame; 1 disables the EMA
    high: float = 0.5  # turn on at p >= high ...
    low: float = 0.5  # ... stay on while p >= low (off by default: it cost Dice on CVC-ClinicDB)
    min_area: float = 0.002  # fraction of the field of view; smaller components are dropped
    cut_threshold: float = 0.15  # mean |difference| of thumbnails (0..1) that counts as a scene cut
    fov_tolerance: float = 0.05  # field-of-view change (fraction of its size) that resets the EMA
    motion: bool = True  # warp the memory along the optical flow between consecutive frames
    flow_size: int = 96  # side of the grey field-of-view thumbnail the flow is computed on
    mismatch: float = 0.1  # grey difference (0..1) after warping above which a pixel forgets
    support: bool = True  # show a component only where this frame's own prediction touches it

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0 <= self.low <= self.high <= 1:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")

    @classmethod
    def at(cls, threshold: float, hysteresis: float = 0.0, min_area: float = 0.0) -> "SmoothingConfig":
        """The default smoothing for a model with this operating point (a `min_area` of 0: the
        smoothing's own default)."""
        return cls(high=threshold, low=max(threshold - hysteresis, 0.0), **({"min_area": min_area} if min_area else {}))

    @classmethod
    def off(cls, threshold: float = 0.5, min_area: float = 0.0) -> "SmoothingConfig":
        """No temporal smoothing: each frame's own mask, less components under `min_area`."""
        return cls(alpha=1.0, high=threshold, low=threshold, min_area=min_area, cut_threshold=math.inf,
                   motion=False, support=False)

    @property
    def is_off(self) -> bool:
        """No temporal smoothing (a minimum area is a per-frame rule, allowed)."""
        return self.alpha >= 1 and self.low == self.high and not self.support

    def describe(self) -> str:
        if self.is_off:
            return "off" + (f" (min area {self.min_area})" if self.min_area else "")
        parts = [f"ema {self.alpha}" + (" along the flow" if self.motion and self.alpha < 1 else "")]
        parts += [f"hysteresis {self.high}/{self.low}"] if self.low < self.high else []
        return ", ".join(parts + (["support"] if self.support else []) + [f"min area {self.min_area}"])


def shrink(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """INTER_AREA down to (width, height), halving first while the image is still more than twice
    as large: OpenCV's area resize has a fast path for exactly 2x and a slow general one, which at
    1920x1080 took 2.5-3.7 ms a thumbnail (most of the smoother's time at that size) against
    about 0.3 ms this way. Both are box averages; they differ by each halving's rounding (at most two
    grey levels, half a level on average at 1920x1080), the same for every frame a cut compares. An
    odd side loses its last row or column before a halving: the fast path needs exactly 2x, and a
    field-of-view crop of 1065x1065 took 0.8 ms through the general one."""
    while gray.shape[1] >= 4 * width and gray.shape[0] >= 4 * height:
        h, w = gray.shape[0] // 2, gray.shape[1] // 2
        gray = cv2.resize(gray[:2 * h, :2 * w], (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)


def thumbnail(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return shrink(gray, THUMB, THUMB).astype(np.float32) / 255


def remove_small(mask: np.ndarray, min_pixels: float, support: np.ndarray | None = None) -> np.ndarray:
    """Drop 8-connected components with fewer than `min_pixels` pixels, and, given a `support`
    mask, those that do not touch it."""
    return remove_small_components(mask, min_pixels, support)[0]


def remove_small_components(mask: np.ndarray, min_pixels: float,
                            support: np.ndarray | None = None) -> tuple[np.ndarray, Components | None]:
    """`remove_small`, and the labelling of the mask it returns (None where it labelled nothing), for
    `find_polyps`: at 1920x1080 with a polyp over a third of the frame, one labelling is 3.5 ms."""
    if (min_pixels <= 1 and support is None) or not mask.any():
        return mask, None
    cc = components(mask)
    keep = cc.stats[:, cv2.CC_STAT_AREA] >= min_pixels
    if support is not None:
        keep &= np.bincount(cc.box_labels[support[cc.box]], minlength=cc.count) > 0
    keep[0] = False
    if keep[1:].all():  # the usual frame: nothing to remove
        return mask.astype(bool, copy=False), cc
    out = np.zeros(mask.shape, bool)
    out[cc.box] = np.take(keep, cc.box_labels)  # half the time of keep[labels] (2.2 ms at 1080p)
    return out, cc.keep(keep)


# ---- motion ------------------------------------------------------------------------------------

def flow_gray(image: np.ndarray, fov: FieldOfView, size: int) -> np.ndarray:
    """The field of view as a `size` x `size` uint8 grey thumbnail (what the flow is computed on)."""
    crop = image[fov.y0:fov.y1, fov.x0:fov.x1]
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY) if crop.ndim == 3 else crop
    return shrink(gray, size, size)


class Motion:
    """Dense optical flow (DIS) from the previous thumbnail to the current one."""

    def __init__(self):
        self.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)

    def flow(self, prev: np.ndarray, curr: np.ndarray) -> np.ndarray:
        """(h, w, 2) float32: current pixel x came from previous pixel x + flow[x] (in thumbnail pixels)."""
        return self.dis.calc(curr, prev, None)


@lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> np.ndarray:
    grid = np.empty((height, width, 2), np.float32)
    grid[..., 0], grid[..., 1] = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)[:, None]
    grid.flags.writeable = False
    return grid


def sample_map(flow: np.ndarray, height: int, width: int) -> np.ndarray:
    """remap() coordinates (height, width, 2) that pull a (height, width) image of the previous
    frame along `flow` (computed on a smaller grid over the same field of view) into the current frame."""
    fh, fw = flow.shape[:2]
    if (fh, fw) != (height, width):
        flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
        flow *= np.float32((width / fw, height / fh))
    return _pixel_grid(height, width) + flow


def warp(image: np.ndarray, flow: np.ndarray, nearest: bool = False) -> np.ndarray:
    """The previous frame's `image` (any size covering the flow's field of view) moved along `flow`
    into the current frame; what comes from outside the image is 0."""
    h, w = image.shape[:2]
    return cv2.remap(image, sample_map(flow, h, w), None, cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def matched(prev: np.ndarray, curr: np.ndarray, flow: np.ndarray, tolerance: float) -> np.ndarray:
    """bool (h, w): where the previous thumbnail, warped, matches the current one (memory is valid)."""
    inside = warp(np.full(prev.shape, 255, np.uint8), flow, nearest=True) > 0
    diff = cv2.absdiff(warp(prev, flow), curr).astype(np.float32) / 255
    return inside & (cv2.blur(diff, (3, 3)) <= tolerance)


class Smoother:
    """Stateful per-stream smoother: feed frames in order with `update`."""

    def __init__(self, config: SmoothingConfig | None = None):
        self.config = config or SmoothingConfig()
        self.cuts = 0
        self.motion = Motion() if self.config.motion else None
        self.reset()

    @classmethod
    def off(cls, threshold: float = 0.5, min_area: float = 0.0) -> "Smoother":
        return cls(SmoothingConfig.off(threshold, min_area))

    def reset(self) -> None:
        self.ema: np.ndarray | None = None
        self.fov: FieldOfView | None = None
        self.thumb: np.ndarray | None = None
        self.gray: np.ndarray | None = None  # flow thumbnail of the previous frame
        self.mask: np.ndarray | None = None
        self.components: Components | None = None  # the labelling of the last mask, where one was made

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
        """Source frame (H, W, 3) RGB or (H, W) grey, model-resolution probability (S, S), its field of view ->
        (smoothed probability at source resolution, bool mask at source resolution)."""
        cfg = self.config
        h, w = image.shape[:2]
        if image.ndim == 3 and (self.motion or math.isfinite(cfg.cut_threshold)):
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # once for both thumbnails
        thumb = thumbnail(image) if math.isfinite(cfg.cut_threshold) else None
        if self.ema is not None and (self.ema.shape != prob.shape or self.mask.shape != (h, w)
                                     or (thumb is not None and self.is_cut(thumb, fov))):
            self.cuts += 1
            self.reset()
        prob = prob.astype(np.float32)
        memory, valid, prev_mask = self.ema, None, self.mask
        gray = flow_gray(image, fov, cfg.flow_size) if self.motion else None
        if self.motion and memory is not None:
            memory, valid, prev_mask = self.follow(gray, memory, prev_mask, fov, h, w)
        if memory is None or cfg.alpha >= 1:
            self.ema = prob
        else:
            blend = cfg.alpha * prob + (1 - cfg.alpha) * memory
            self.ema = blend if valid is None else np.where(valid, blend, prob)
        self.fov, self.thumb, self.gray = fov, thumb, gray
        prob_src = to_source(self.ema, fov, h, w)
        mask = prob_src >= cfg.high
        if prev_mask is not None and cfg.low < cfg.high:
            mask |= prev_mask & (prob_src >= cfg.low)
        support = to_source_mask(prob, fov, h, w, cfg.high) if cfg.support and mask.any() else None  # else unused
        mask, self.components = remove_small_components(mask, cfg.min_area * fov.width * fov.height, support)
        self.mask = mask
        return prob_src, mask

    def follow(self, gray: np.ndarray, ema: np.ndarray, prev_mask: np.ndarray, fov: FieldOfView,
               h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Warp the memory from the previous frame into this one: (EMA at model resolution, where
        it is valid, the mask at source resolution or None without hysteresis). Pixels whose
        warped grey value does not match this frame's forget it."""
        cfg = self.config
        flow = self.motion.flow(self.gray, gray)
        valid = matched(self.gray, gray, flow, cfg.mismatch).astype(np.uint8)
        s = ema.shape[0]
        ema, ema_valid = warp(ema, flow), cv2.resize(valid, (s, s), interpolation=cv2.INTER_NEAREST) > 0
        if cfg.low >= cfg.high:  # no hysteresis: the previous mask is not used
            return ema, ema_valid, None
        crop = (slice(fov.y0, fov.y1), slice(fov.x0, fov.x1))
        keep = cv2.resize(valid, (fov.width, fov.height), interpolation=cv2.INTER_NEAREST) > 0
        moved = np.zeros((h, w), bool)
        moved[crop] = (warp(prev_mask[crop].astype(np.uint8), flow, nearest=True) > 0) & keep
        return ema, ema_valid, moved


# ---- measurement --------------------------------------------------------------------------------

def flicker(masks: list[np.ndarray]) -> float:
    """Mean 1 - IoU of consecutive masks (0: perfectly stable; two empty masks count as stable)."""
    if len(masks) < 2:
        return 0.0
    return float(np.mean([1 - iou(a, b) for a, b in zip(masks, masks[1:])]))


def has_false_positive(mask: np.ndarray, truth: np.ndarray) -> bool:
    """Does the mask have an 8-connected component that does not touch the true mask (a false alarm)?"""
    if not mask.any():
        return False
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return bool((np.bincount(labels[truth.astype(bool)], minlength=n)[1:] == 0).any())


@dataclass(frozen=True)
class SmoothingReport:
    frames: int
    dice_raw: float
    dice_smoothed: float
    flicker_raw: float
    flicker_smoothed: float
    flicker_truth: float  # the true masks' own frame-to-frame change: motion, not noise
    fp_raw: float = 0.0  # fraction of frames with a false-positive component
    fp_smoothed: float = 0.0

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def evaluate_smoothing(frames: Iterable[Frame], predict: Callable[[Frame], tuple[np.ndarray, FieldOfView]],
                       config: SmoothingConfig | None = None, threshold: float = 0.5) -> SmoothingReport:
    """Run `predict(frame) -> (model-resolution prob, fov)` once per frame and score the raw and
    the smoothed masks against each frame's true mask (mean per-frame Dice, frames with a
    false-positive component) and for flicker."""
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
        fp_raw=float(np.mean([has_false_positive(m, t) for m, t in zip(raw_masks, truths)])),
        fp_smoothed=float(np.mean([has_false_positive(m, t) for m, t in zip(smooth_masks, truths)])),
    )
