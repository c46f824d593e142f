"""Where a synthetic polyp goes and what shape it has; blending pixels into a frame.

Shapes come from real annotations (re-placed with a random affine transform) or are parametric
(ellipse, lobed blob) with a controlled equivalent diameter, since small polyps matter most.
Placement keeps every pixel inside the scope's field of view and away from polyps already in
the frame, whose masks stay in the label.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from syndiff_stream.preprocess import FOV_THRESHOLD

SHAPE_KINDS = ("ellipse", "blob")


def field_of_view_mask(image: np.ndarray, margin: int = 0, threshold: int = FOV_THRESHOLD) -> np.ndarray:
    """Pixels of the scope's image (largest bright region, holes filled), shrunk by `margin` pixels."""
    bright = (image.max(axis=2) > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if n <= 1:
        return np.zeros(image.shape[:2], bool)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    contours, _ = cv2.findContours(largest, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = cv2.drawContours(np.zeros_like(largest), contours, -1, 1, thickness=cv2.FILLED)
    if margin > 0:
        filled = cv2.erode(filled, _disk(margin), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return filled.astype(bool)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def equivalent_diameter(mask: np.ndarray) -> float:
    return 2.0 * math.sqrt(float(mask.sum()) / math.pi)


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def parametric_shape(rng: np.random.Generator, diameter: float) -> tuple[np.ndarray, dict]:
    """An ellipse or a lobed blob whose area equals a disk of `diameter` pixels (cropped to its box)."""
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    aspect = float(rng.uniform(1.0, 1.6))
    angle = float(rng.uniform(0, 180))
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    radius = np.ones_like(theta)
    harmonics = []
    if kind == "blob":  # a few low-frequency lobes: sessile / lobulated outlines
        for k in (2, 3, 4):
            amp, phase = float(rng.uniform(0, 0.12)), float(rng.uniform(0, 2 * np.pi))
            radius = radius + amp * np.cos(k * theta + phase)
            harmonics.append([k, round(amp, 4), round(phase, 4)])
    pts = np.stack([radius * np.cos(theta) * aspect, radius * np.sin(theta) / aspect], 1)
    rot = np.deg2rad(angle)
    pts = pts @ np.array([[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]])
    area = 0.5 * abs(np.dot(pts[:, 0], np.roll(pts[:, 1], 1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], 1)))
    pts *= math.sqrt(math.pi * (diameter / 2) ** 2 / area)
    pts -= pts.min(0) - 1
    size = np.ceil(pts.max(0)).astype(int) + 2
    ss = 8  # rasterise 8x finer and area-average: a 5-pixel polyp keeps its area (fillPoly alone overfills)
    fine = np.zeros((size[1] * ss, size[0] * ss), np.uint8)
    cv2.fillPoly(fine, [np.round(pts * ss * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    canvas = cv2.resize(fine, (size[0], size[1]), interpolation=cv2.INTER_AREA) >= 128
    params = {"kind": kind, "diameter_px": round(float(diameter), 2), "aspect": round(aspect, 4),
              "angle": round(angle, 2), "harmonics": harmonics}
    return _crop(canvas), params


def largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def affine_patch(mask: np.ndarray, rng: np.random.Generator, diameter: float,
                 image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Re-shape a real annotation (its largest polyp): random rotation, flip, shear, aspect, scaled to
    `diameter`. The donor image, when given, gets the same transform (copy-paste)."""
    comp = largest_component(mask)
    if not comp.any():
        raise ValueError("annotation holds no polyp")
    ys, xs = np.nonzero(comp)
    pad = 4
    y0, y1 = max(0, ys.min() - pad), min(mask.shape[0], ys.max() + 1 + pad)
    x0, x1 = max(0, xs.min() - pad), min(mask.shape[1], xs.max() + 1 + pad)
    m = comp[y0:y1, x0:x1].astype(np.float32)
    angle = float(rng.uniform(-180, 180))
    shear = float(rng.uniform(-10, 10))
    stretch = float(rng.uniform(0.8, 1.25))
    flip = bool(rng.integers(2))
    scale = diameter / equivalent_diameter(comp)
    lin = np.array([[scale * stretch, 0], [0, scale / stretch]])
    lin = lin @ np.array([[1, math.tan(math.radians(shear))], [0, 1]])
    if flip:
        lin = lin @ np.array([[-1, 0], [0, 1]])
    rot = math.radians(angle)
    lin = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]]) @ lin
    h, w = m.shape
    corners = (np.array([[0, 0], [w, 0], [0, h], [w, h]]) - [w / 2, h / 2]) @ lin.T
    out_w, out_h = (np.ceil(corners.max(0) - corners.min(0)).astype(int) + 2).tolist()
    shift = np.array([out_w / 2, out_h / 2]) - lin @ np.array([w / 2, h / 2])
    matrix = np.hstack([lin, shift[:, None]]).astype(np.float32)
    warped = cv2.warpAffine(m, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderValue=0) >= 0.5
    if not warped.any():  # degenerate tiny target: keep one pixel rather than nothing
        warped[out_h // 2, out_w // 2] = True
    ys, xs = np.nonzero(warped)
    box = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
    patch = None
    if image is not None:
        warped_img = cv2.warpAffine(image[y0:y1, x0:x1], matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REFLECT)
        patch = warped_img[box[0]:box[1], box[2]:box[3]]
    params = {"kind": "annotation", "diameter_px": round(float(diameter), 2), "angle": round(angle, 2),
              "shear": round(shear, 2), "stretch": round(stretch, 4), "flip": flip, "scale": round(scale, 4)}
    return warped[box[0]:box[1], box[2]:box[3]], patch, params


def allowed_region(image: np.ndarray, existing: np.ndarray, margin: int) -> np.ndarray:
    """Inside the field of view (minus a margin) and at least `margin` pixels from existing polyps."""
    fov = field_of_view_mask(image, margin)
    near = cv2.dilate(existing.astype(np.uint8), _disk(max(1, margin))).astype(bool)
    return fov & ~near


def place(shape: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """Top-left (y, x) where every pixel of `shape` lands in `allowed`, drawn uniformly; None if none.

    Counts forbidden pixels under the shape at every offset with one correlation (DFT-backed in
    OpenCV for large kernels), so the search is exact, not trial and error."""
    h, w = shape.shape
    H, W = allowed.shape
    if h > H or w > W:
        return None
    forbidden = (~allowed).astype(np.float32)
    kernel = shape.astype(np.float32)
    hits = cv2.filter2D(forbidden, -1, kernel, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)
    ok = hits[:H - h + 1, :W - w + 1] < 0.5
    ys, xs = np.nonzero(ok)
    if len(ys) == 0:
        return None
    i = rng.integers(len(ys))
    y, x = int(ys[i]), int(xs[i])
    if np.any(shape & ~allowed[y:y + h, x:x + w]):  # filter2D is float arithmetic: verify exactly
        return None
    return y, x


def paste_mask(shape: np.ndarray, at: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    out = np.zeros(size, bool)
    y, x = at
    out[y:y + shape.shape[0], x:x + shape.shape[1]] = shape
    return out


def feather_alpha(mask: np.ndarray, radius: float) -> np.ndarray:
    """1 inside the mask, fading to 0 over ~radius pixels outside it: hides the seam, keeps the label."""
    m = mask.astype(np.float32)
    if radius <= 0:
        return m
    soft = cv2.GaussianBlur(cv2.dilate(m, _disk(max(1, round(radius / 2)))), (0, 0), radius / 2)
    return np.maximum(m, soft)


def blend(base: np.ndarray, overlay: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = overlay.astype(np.float32) * alpha[..., None] + base.astype(np.float32) * (1 - alpha[..., None])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def copy_paste(base: np.ndarray, patch: np.ndarray, shape: np.ndarray, at: tuple[int, int],
               method: str = "seamless", feather: float = 3.0) -> np.ndarray:
    """Paste a donor polyp patch at `at`: Poisson blending (cv2.seamlessClone) or a feathered alpha."""
    y, x = at
    h, w = shape.shape
    full = base.copy()
    full[y:y + h, x:x + w] = np.where(shape[..., None], patch, full[y:y + h, x:x + w])
    mask = paste_mask(shape, at, base.shape[:2])
    if method == "feather":
        return blend(base, full, feather_alpha(mask, feather))
    if method != "seamless":
        raise ValueError(f"unknown blend {method!r}: choose seamless or feather")
    pad = 8  # seamlessClone refuses regions that touch the border
    src = cv2.copyMakeBorder(full, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    dst = cv2.copyMakeBorder(base, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    region = cv2.dilate(cv2.copyMakeBorder(mask.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0),
                        _disk(2)) * 255
    bx, by, bw, bh = cv2.boundingRect(region)
    out = cv2.seamlessClone(src, dst, region, (bx + bw // 2, by + bh // 2), cv2.NORMAL_CLONE)
    return out[pad:-pad, pad:-pad]
