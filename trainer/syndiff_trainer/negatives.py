"""Polyp-free data: crops of the training centres' own frames away from the polyp (for training
and for validation), and folders of polyp-free frames (for validation only).

Every image of the three training centres shows a polyp, while most of a colonoscopy shows none;
a model that never saw an empty target lights up on normal mucosa. The crops give it empty
targets from the same scopes and centres it trains on: windows of the frame, shaped like its field
of view, that keep a margin from every polyp pixel and still cover mostly the scope's image, so
they hold what a real empty frame holds (folds, lumen, highlights, the field-of-view edge, the
corner box and on-screen text), each resized to model resolution as a whole frame is.

A crop belongs to the group of the frame it was cut from, so a split never trains on a crop of a
validation frame. Crops are decoded once and cached, like the frames (`data.load_dataset`).

Crops are close-ups; a colonoscopy's empty frames are mostly whole views of folds and lumen. Erased
frames (`erase_polyps`) are those: the training frame itself, its polyp filled in from the mucosa
around it. The fill leaves a smooth patch a network could read as "empty here", so every erased
frame comes with a decoy, the same frame with the same patch painted where there is no polyp and
its polyp kept: a patch then says nothing about whether a polyp is in view.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
from rich.progress import track

from syndiff_stream.atomic import atomic_path
from syndiff_stream.datasets import IMAGE_SUFFIXES, DatasetError, find_pairs, read_image, read_mask
from syndiff_stream.preprocess import crop_resize, find_field_of_view

from .data import DEFAULT_CACHE, ArrayDataset, sample_seed

FREE_MARK = "~free"  # stem of a crop: <frame stem>~free<k>
ERASED_MARK = "~erased"  # the frame, its polyp filled in: empty mask
DECOY_MARK = "~decoy"  # the frame with a fill where there is no polyp: its own mask
MAX_ERASED_AREA = 0.35  # a larger polyp leaves too little mucosa to fill it from
SCALES = (0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # crop side / field-of-view side, largest first
MIN_SCOPE_COVER = 0.7  # a crop must be at least this much scope image (not black border)
DARK = 20  # grey level under which a pixel is border, not scope image


def _grown(mask: np.ndarray, pad: int) -> np.ndarray:
    """`mask` (uint8) with every pixel within `pad` of it: a polyp and the margin kept from it."""
    if pad <= 0:
        return mask.astype(np.uint8)
    return cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1, 2 * pad + 1)))


def crop_windows(mask: np.ndarray, image: np.ndarray, count: int, rng: np.random.Generator,
                 min_scale: float = 0.3, margin: float = 0.03) -> list[tuple[int, int, int, int]]:
    """Up to `count` windows (x0, y0, x1, y1) of the frame with no polyp pixel within `margin`
    (a fraction of the frame's longer side), shaped like its field of view at one of `SCALES`
    (>= `min_scale`) and mostly scope image. The first is the largest that fits; the others are
    drawn at any scale that fits, so crops range from near-whole frames to close-ups."""
    fov = find_field_of_view(image)
    h, w = mask.shape
    pad = int(round(margin * max(h, w)))
    blocked = _grown(mask, pad)
    grey = image.max(axis=2) if image.ndim == 3 else image
    polyp_sum = cv2.integral(blocked)
    scope_sum = cv2.integral((grey >= DARK).astype(np.uint8))
    fits: list[tuple[int, int, np.ndarray]] = []  # (window width, height, valid top-left corners)
    for scale in (s for s in SCALES if s >= min_scale - 1e-9):
        ww, wh = max(8, int(fov.width * scale)), max(8, int(fov.height * scale))
        if ww > w or wh > h:
            continue
        step = max(2, min(ww, wh) // 16)
        ys, xs = np.mgrid[0:h - wh + 1:step, 0:w - ww + 1:step]
        ys, xs = ys.ravel(), xs.ravel()

        def window_sum(table):
            return table[ys + wh, xs + ww] - table[ys, xs + ww] - table[ys + wh, xs] + table[ys, xs]

        ok = (window_sum(polyp_sum) == 0) & (window_sum(scope_sum) >= MIN_SCOPE_COVER * ww * wh)
        if ok.any():
            fits.append((ww, wh, np.stack([xs[ok], ys[ok]], 1)))
    windows = []
    for k in range(count if fits else 0):
        ww, wh, corners = fits[0] if k == 0 else fits[rng.integers(len(fits))]
        x0, y0 = corners[rng.integers(len(corners))]
        windows.append((int(x0), int(y0), int(x0 + ww), int(y0 + wh)))
    return windows


def load_crops(root: str | Path, size: int, per_image: int, seed: int = 0, min_scale: float = 0.3,
               margin: float = 0.03, cache_dir: Path | None = DEFAULT_CACHE, progress: bool = True,
               skip_unpaired: bool = False) -> ArrayDataset:
    """Polyp-free crops of a dataset folder's frames at model resolution, empty masks, stems
    `<frame>~free<k>`; a frame whose polyp leaves no room gives none. Cached by file list,
    mtimes and every parameter."""
    pairs = find_pairs(root, skip_unpaired=skip_unpaired)
    params = [size, per_image, seed, min_scale, margin, SCALES, MIN_SCOPE_COVER, DARK]
    key = hashlib.sha256(json.dumps([params, [(str(p.image.resolve()), p.image.stat().st_mtime_ns,
                                               p.mask.stat().st_mtime_ns) for p in pairs]]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{Path(root).name}-free-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return ArrayDataset(data["images"], data["masks"], [str(s) for s in data["stems"]])
    images, stems = [], []
    for i, pair in enumerate(track(pairs, description=f"cutting polyp-free crops of {len(pairs)} frames",
                                   disable=not progress)):
        try:
            image, mask = read_image(pair.image), read_mask(pair.mask)
        except DatasetError:
            if skip_unpaired:
                continue
            raise
        rng = np.random.default_rng(sample_seed(seed, i))
        for k, (x0, y0, x1, y1) in enumerate(crop_windows(mask, image, per_image, rng, min_scale, margin)):
            images.append(cv2.resize(image[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA))
            stems.append(f"{pair.stem}{FREE_MARK}{k}")
    images_ = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    ds = ArrayDataset(images_, np.zeros((len(stems), size, size), bool), stems)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.savez(tmp, images=ds.images, masks=ds.masks, stems=np.array(ds.stems))
    return ds


def parent_stem(stem: str) -> str:
    """The frame a crop was cut from (`kvasir/abc~free1` -> `kvasir/abc`)."""
    return stem.split(FREE_MARK, 1)[0]


def crops_of(crops: ArrayDataset, frames: ArrayDataset) -> ArrayDataset:
    """The crops cut from `frames` (same source prefixes), each in its frame's group."""
    group = dict(zip(frames.stems, frames.groups))
    keep = [i for i, s in enumerate(crops.stems) if parent_stem(s) in group]
    out = crops.subset(keep)
    out.groups = [group[parent_stem(s)] for s in out.stems]
    return out


def load_polyp_free(root: str | Path, size: int, cache_dir: Path | None = DEFAULT_CACHE,
                    progress: bool = False) -> ArrayDataset:
    """A folder of polyp-free frames (`images/`, or the images directly; optional sequences.csv
    frame,sequence for groups) at model resolution with empty masks. For validation only."""
    root = Path(root)
    folder = root / "images" if (root / "images").is_dir() else root
    if not folder.is_dir():
        raise DatasetError(f"polyp-free folder {root} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"polyp-free folder {folder} holds no images")
    key = hashlib.sha256(json.dumps([size, [(str(p.resolve()), p.stat().st_mtime_ns) for p in files]]).encode()
                         ).hexdigest()[:16]
    path = Path(cache_dir) / f"{root.name}-frames-{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            images, stems = data["images"], [str(s) for s in data["stems"]]
    else:
        images, stems = [], []
        for p in track(files, description=f"decoding {len(files)} polyp-free frames", disable=not progress):
            image = read_image(p)
            images.append(crop_resize(image, find_field_of_view(image), size))
            stems.append(p.stem)
        images = np.stack(images)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                np.savez(tmp, images=images, stems=np.array(stems))
    groups = list(stems)
    table = root / "sequences.csv"
    if table.is_file():
        with table.open(newline="") as f:
            seq = {Path(r["frame"].strip()).stem: r["sequence"].strip() for r in csv.DictReader(f)}
        groups = [seq.get(s, s) for s in stems]
    return ArrayDataset(images, np.zeros(images.shape[:3], bool), stems, groups)


def named_polyp_free(items: list[str], size: int) -> dict[str, ArrayDataset]:
    """`--polyp-free` arguments (NAME=PATH, or PATH named by its folder) -> name -> frames."""
    sets = {}
    for item in items:
        name, sep, path = item.partition("=")
        path, name = (path, name) if sep else (item, Path(item).name)
        sets[name] = load_polyp_free(path, size)
    return sets


def _fill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`region` painted over from the pixels around it (OpenCV's Telea inpainting)."""
    radius = max(3, round(0.02 * max(region.shape)))
    return cv2.inpaint(image, region.astype(np.uint8), radius, cv2.INPAINT_TELEA)


def decoy_region(mask: np.ndarray, image: np.ndarray, rng: np.random.Generator, pad: int,
                 tries: int = 24) -> np.ndarray | None:
    """The grown polyp's shape moved to where it keeps `pad` from every polyp pixel and lies on scope
    image (not the black border); None when no place is found in `tries` draws."""
    region = _grown(mask, pad)
    ys, xs = np.nonzero(region)
    if not len(ys):
        return None
    h, w = mask.shape
    keep_off = _grown(region, pad).astype(bool)
    scope = (image.max(axis=2) if image.ndim == 3 else image) >= DARK
    for _ in range(tries):
        dy = int(rng.integers(-ys.min(), h - ys.max()))
        dx = int(rng.integers(-xs.min(), w - xs.max()))
        ny, nx = ys + dy, xs + dx
        if keep_off[ny, nx].any() or scope[ny, nx].mean() < MIN_SCOPE_COVER:
            continue
        moved = np.zeros_like(region, dtype=bool)
        moved[ny, nx] = True
        return moved
    return None


def erase_polyps(frames: ArrayDataset, seed: int = 0, margin: float = 0.03) -> tuple[ArrayDataset, ArrayDataset]:
    """(erased, decoys) of model-resolution frames: each frame with its polyp and a `margin` around
    it filled in (empty mask, stem `<frame>~erased`), and the same frame with that fill painted
    where there is no polyp (its own mask, `<frame>~decoy`); both in the frame's group. A frame
    whose polyp covers more than MAX_ERASED_AREA, or leaves no room for the decoy, gives neither,
    so the two sets stay the same size and a fill stays uninformative."""
    erased, decoys, stems, groups, masks = [], [], [], [], []
    for i, (image, mask) in enumerate(zip(frames.images, frames.masks)):
        if not mask.any() or mask.mean() > MAX_ERASED_AREA:
            continue
        pad = int(round(margin * max(mask.shape)))
        rng = np.random.default_rng(sample_seed(seed, i))
        decoy = decoy_region(mask, image, rng, pad)
        if decoy is None:
            continue
        erased.append(_fill(image, _grown(mask, pad)))
        decoys.append(_fill(image, decoy))
        stems.append(frames.stems[i])
        groups.append(frames.groups[i])
        masks.append(mask)
    size = frames.images.shape[1:3]
    if not stems:
        nothing = ArrayDataset(np.zeros((0, *size, 3), np.uint8), np.zeros((0, *size), bool), [])
        return nothing, nothing
    empty = np.zeros((len(stems), *size), bool)
    return (ArrayDataset(np.stack(erased), empty, [s + ERASED_MARK for s in stems], list(groups)),
            ArrayDataset(np.stack(decoys), np.stack(masks), [s + DECOY_MARK for s in stems], list(groups)))
