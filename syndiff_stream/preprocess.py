"""Frame <-> model input: find the scope's field of view, crop, resize, normalise; and back.

Training and inference both go through `prepare`, so the model always sees the field of view
cropped and squeezed to the model's square input the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FOV_THRESHOLD = 20  # scopes render outside the field of view as near-black
FOV_MIN_FRACTION = 0.25  # a smaller bright region is a dark frame, not a field of view
FOV_PROBE_SIZE = 128  # detection runs on a thumbnail (nearest-neighbour: 0.02 ms vs 1 ms for area)


@dataclass(frozen=True)
class FieldOfView:
    """Crop box (x0, y0, x1, y1) in source pixels, half-open."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def full(cls, height: int, width: int) -> "FieldOfView":
        return cls(0, 0, width, height)

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def find_field_of_view(frame: np.ndarray, threshold: int = FOV_THRESHOLD) -> FieldOfView:
    """Bounding box of the largest bright region: the scope's image without its black border."""
    h, w = frame.shape[:2]
    scale = FOV_PROBE_SIZE / max(h, w)
    small = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_NEAREST)
    gray = small.max(axis=2) if small.ndim == 3 else small
    bright = (gray > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if n <= 1:
        return FieldOfView.full(h, w)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh, area = stats[best]
    if bw * bh < FOV_MIN_FRACTION * gray.shape[0] * gray.shape[1]:
        return FieldOfView.full(h, w)
    x0, y0 = int(np.floor(x / scale)), int(np.floor(y / scale))
    x1, y1 = int(np.ceil((x + bw) / scale)), int(np.ceil((y + bh) / scale))
    return FieldOfView(max(0, x0), max(0, y0), min(w, x1), min(h, y1))


def crop_resize(frame: np.ndarray, fov: FieldOfView, size: int, interpolation=cv2.INTER_AREA) -> np.ndarray:
    crop = frame[fov.y0:fov.y1, fov.x0:fov.x1]
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def to_model_range(x):
    """Pixel values 0..255 as floats (numpy or torch, any layout) -> [-1, 1], the model's input
    range. The one copy: CPU preprocessing here, the GPU path (engine.prepare_on_device) and the
    trainer's batches all use it."""
    return x * (1 / 127.5) - 1.0


def normalize(image_u8: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1], the model's input."""
    return np.moveaxis(to_model_range(image_u8.astype(np.float32)), -1, -3)


def prepare(frame: np.ndarray, size: int, fov: FieldOfView | None = None) -> tuple[np.ndarray, FieldOfView]:
    """RGB frame -> (model input (3, size, size) float32, field of view used)."""
    if fov is None:
        fov = find_field_of_view(frame)
    return normalize(crop_resize(frame, fov, size)), fov


def prepare_mask(mask: np.ndarray, fov: FieldOfView, size: int) -> np.ndarray:
    """Bool mask at source resolution -> bool mask at model resolution, cropped like its frame."""
    soft = crop_resize(mask.astype(np.float32), fov, size, interpolation=cv2.INTER_AREA)
    return soft >= 0.5


def to_source(prob: np.ndarray, fov: FieldOfView, height: int, width: int) -> np.ndarray:
    """Model-resolution probability (S, S) -> probability at source resolution (zero outside the FOV).
    The border is written with the resize's output in one pass (not zeros, then a copy into them):
    at 1920x1080 this map is 8 MB a frame."""
    return _bordered(_resized(prob, fov), fov, height, width)


def to_source_mask(prob: np.ndarray, fov: FieldOfView, height: int, width: int, threshold: float) -> np.ndarray:
    """`to_source(...) >= threshold` for a threshold above 0, thresholded inside the field of view and
    bordered as one byte a pixel instead of four (the smoother's support map, every frame)."""
    if not threshold > 0:
        return to_source(prob, fov, height, width) >= threshold
    return _bordered((_resized(prob, fov) >= threshold).view(np.uint8), fov, height, width).view(bool)


def _resized(prob: np.ndarray, fov: FieldOfView) -> np.ndarray:
    return cv2.resize(prob.astype(np.float32, copy=False), (fov.width, fov.height), interpolation=cv2.INTER_LINEAR)


def _bordered(inside: np.ndarray, fov: FieldOfView, height: int, width: int) -> np.ndarray:
    if (fov.width, fov.height) == (width, height):
        return inside
    return cv2.copyMakeBorder(inside, fov.y0, height - fov.y1, fov.x0, width - fov.x1, cv2.BORDER_CONSTANT, value=0)
