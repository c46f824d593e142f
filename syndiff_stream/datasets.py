"""Find and read (image, mask) pairs in the folder layouts polyp datasets ship in.

Layouts recognised by `find_pairs`:
  kvasir     images/ + masks/ (Kvasir-SEG, and any split written by `syndiff-train synth`)
  cvc        Original/ + Ground Truth/ (CVC-ClinicDB, tif or png)
  pranet     TrainDataset/{image,mask} and TestDataset/<name>/{images,masks}
  paired     any folder holding an image folder and a mask folder whose files share stems
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
IMAGE_DIR_NAMES = ("images", "image", "Original", "imgs", "img")
MASK_DIR_NAMES = ("masks", "mask", "Ground Truth", "GroundTruth", "gt", "labels")
MASK_THRESHOLD = 127  # JPEG-compressed masks carry noise around 0 and 255


class DatasetError(ValueError):
    """A dataset folder that cannot be read: names the file or folder at fault."""


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path | None

    @property
    def stem(self) -> str:
        return self.image.stem


def _imread(path: str | Path, what: str) -> np.ndarray:
    """The file decoded as it is stored; read here and decoded in memory, so a missing file is one
    DatasetError, without OpenCV's own warning line on stderr first."""
    try:
        buf = np.fromfile(str(path), np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    data = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if data is None:
        raise DatasetError(f"cannot read {what} {path}: empty or not an image")
    return data


def read_image(path: str | Path) -> np.ndarray:
    """Any image file -> RGB uint8 (H, W, 3); grayscale, RGBA and 16-bit files are converted."""
    data = _imread(path, "image")
    if data.dtype != np.uint8:
        data = (data.astype(np.float32) * (255.0 / max(float(np.iinfo(data.dtype).max), 1.0))).astype(np.uint8) \
            if np.issubdtype(data.dtype, np.integer) else np.clip(data * 255, 0, 255).astype(np.uint8)
    if data.ndim == 2:
        return cv2.cvtColor(data, cv2.COLOR_GRAY2RGB)
    if data.shape[2] == 4:
        return cv2.cvtColor(data, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Any mask file -> bool (H, W); white (> 127 in any channel) is polyp."""
    data = _imread(path, "mask")
    if data.dtype != np.uint8:
        data = (data > 0).astype(np.uint8) * 255 if data.max() <= 1 else (data >> 8).astype(np.uint8) \
            if data.dtype == np.uint16 else (data > 0.5).astype(np.uint8) * 255
    if data.ndim == 3:
        data = data[..., :3].max(axis=2)
    if data.max() == 1:  # 0/1 label maps, single- or three-channel
        data = data * 255
    return data > MASK_THRESHOLD


def _images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def _child(folder: Path, names) -> Path | None:
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    return None


def pair_folders(image_dir: Path, mask_dir: Path | None, skip_unpaired: bool = False) -> list[Pair]:
    images = _images_in(image_dir)
    if not images:
        raise DatasetError(f"no images in {image_dir}")
    if mask_dir is None:
        return [Pair(p, None) for p in images.values()]
    masks = _images_in(mask_dir)
    # Some datasets name masks <stem>_mask or <stem>_segmentation.
    for stem in list(masks):
        for suffix in ("_mask", "_segmentation", "_gt"):
            if stem.endswith(suffix) and stem[: -len(suffix)] in images:
                masks[stem[: -len(suffix)]] = masks.pop(stem)
    unpaired = sorted(set(images) ^ set(masks))
    if unpaired and not skip_unpaired:
        example = images.get(unpaired[0]) or masks[unpaired[0]]
        raise DatasetError(f"{len(unpaired)} unpaired file(s), e.g. {example}; "
                           "leave them out with skip_unpaired = true on the recipe's data source "
                           "(or --skip-unpaired for eval and predict)")
    return [Pair(images[s], masks[s]) for s in sorted(set(images) & set(masks))]


def find_pairs(root: str | Path, subset: str | None = None, skip_unpaired: bool = False) -> list[Pair]:
    """All (image, mask) pairs under `root`, whatever the layout; `subset` picks a PraNet test set."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    if (root / "TrainDataset").is_dir() or (root / "TestDataset").is_dir():
        if subset and subset != "train":
            base = root / "TestDataset" / subset
            if not base.is_dir():
                names = sorted(p.name for p in (root / "TestDataset").iterdir()) if (root / "TestDataset").is_dir() else []
                raise DatasetError(f"no PraNet test set {subset!r} in {root} (have: {', '.join(names) or 'none'})")
            return find_pairs(base, skip_unpaired=skip_unpaired)
        return find_pairs(root / "TrainDataset", skip_unpaired=skip_unpaired)
    image_dir, mask_dir = _child(root, IMAGE_DIR_NAMES), _child(root, MASK_DIR_NAMES)
    if image_dir is None:
        for sub in ("PNG", "TIF", "png", "tif"):  # CVC-ClinicDB's png / tif variants
            if (root / sub).is_dir():
                return find_pairs(root / sub, skip_unpaired=skip_unpaired)
        raise DatasetError(f"{root}: no image folder (looked for {', '.join(IMAGE_DIR_NAMES)})")
    if mask_dir is None:
        raise DatasetError(f"{root}: no mask folder (looked for {', '.join(MASK_DIR_NAMES)})")
    return pair_folders(image_dir, mask_dir, skip_unpaired=skip_unpaired)
