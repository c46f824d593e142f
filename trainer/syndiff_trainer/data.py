"""Training data: cached model-resolution arrays, deterministic splits, augmentation, batches.

Decoding and resizing full-resolution JPEGs costs more than a training step of the compact
model on 2 cores, so every dataset is decoded once into uint8 arrays and cached on disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from syndiff_stream.datasets import DatasetError, Pair, find_pairs, read_image, read_mask
from syndiff_stream.preprocess import crop_resize, find_field_of_view, prepare_mask

DEFAULT_CACHE = Path.home() / ".cache" / "syndiff-stream"


@dataclass
class ArrayDataset:
    """Images (N, S, S, 3) uint8 and masks (N, S, S) bool at model resolution, with their stems."""

    images: np.ndarray
    masks: np.ndarray
    stems: list[str]

    def __len__(self) -> int:
        return len(self.stems)

    def subset(self, indices) -> "ArrayDataset":
        indices = np.asarray(indices, dtype=int)
        return ArrayDataset(self.images[indices], self.masks[indices], [self.stems[i] for i in indices])

    def concat(self, other: "ArrayDataset") -> "ArrayDataset":
        return ArrayDataset(np.concatenate([self.images, other.images]), np.concatenate([self.masks, other.masks]),
                            self.stems + other.stems)


def load_pairs(pairs: list[Pair], size: int, skip_unreadable: bool = False, progress: bool = True) -> ArrayDataset:
    images, masks, stems, skipped = [], [], [], []
    for pair in track(pairs, description=f"decoding {len(pairs)} images", disable=not progress):
        try:
            image = read_image(pair.image)
            mask = read_mask(pair.mask)
            if mask.shape != image.shape[:2]:
                raise DatasetError(f"mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]}, "
                                   f"its image is {image.shape[1]}x{image.shape[0]}")
        except DatasetError:
            if not skip_unreadable:
                raise
            skipped.append(pair.stem)
            continue
        fov = find_field_of_view(image)
        images.append(crop_resize(image, fov, size))
        masks.append(prepare_mask(mask, fov, size))
        stems.append(pair.stem)
    if skipped:
        print(f"skipped {len(skipped)} unreadable pair(s), e.g. {skipped[0]}")
    if not stems:
        raise DatasetError("no readable (image, mask) pairs")
    return ArrayDataset(np.stack(images), np.stack(masks), stems)


def load_dataset(root: str | Path, size: int = 256, subset: str | None = None, cache_dir: Path | None = DEFAULT_CACHE,
                 skip_unreadable: bool = False, progress: bool = True) -> ArrayDataset:
    """A dataset folder at model resolution; cached by file list, sizes and mtimes."""
    pairs = find_pairs(root, subset=subset, skip_unpaired=skip_unreadable)
    if cache_dir is None:
        return load_pairs(pairs, size, skip_unreadable, progress)
    key = hashlib.sha256(json.dumps([size, [(str(p.image.resolve()), p.image.stat().st_mtime_ns,
                                             str(p.mask.resolve()), p.mask.stat().st_mtime_ns) for p in pairs]]
                                    ).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{Path(root).name}-{size}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return ArrayDataset(data["images"], data["masks"], [str(s) for s in data["stems"]])
    ds = load_pairs(pairs, size, skip_unreadable, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=ds.images, masks=ds.masks, stems=np.array(ds.stems))
    tmp.replace(path)
    return ds


# ---- splits: by stem, seeded, written to JSON so a run can be reproduced and audited ----------

def holdout_split(stems: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    order = sorted(stems)
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val])}


def kfold_splits(stems: list[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    order = sorted(stems)
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    folds = [sorted(order[i::k]) for i in range(k)]
    return [{"train": sorted(s for j, f in enumerate(folds) if j != i for s in f), "val": folds[i]} for i in range(k)]


def apply_split(ds: ArrayDataset, split: dict[str, list[str]]) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, val) subsets; refuses a split whose val stems leak into train."""
    leak = set(split["train"]) & set(split["val"])
    if leak:
        raise DatasetError(f"split leaks {len(leak)} validation image(s) into training, e.g. {sorted(leak)[0]}")
    index = {s: i for i, s in enumerate(ds.stems)}
    missing = [s for s in split["train"] + split["val"] if s not in index]
    if missing:
        raise DatasetError(f"split names {len(missing)} image(s) not in the dataset, e.g. {missing[0]}")
    return ds.subset([index[s] for s in split["train"]]), ds.subset([index[s] for s in split["val"]])


# ---- augmentation --------------------------------------------------------------------------

def build_augmenter(strength: str = "standard", seed: int | None = None):
    """Geometric + photometric augmentation (albumentations), or None for `none`.

    Noise is kept at scope-sensor level (2-6 % std): albumentations' default GaussNoise (20-44 %)
    drowns the mucosal texture the encoder has to learn from.
    """
    if strength == "none":
        return None
    import albumentations as A
    import cv2

    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(scale=(0.75, 1.3), translate_percent=(-0.1, 0.1), rotate=(-30, 30), shear=(-5, 5),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.8),
        A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2, hue=0.03, p=0.8),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=5), A.GaussNoise(std_range=(0.02, 0.06))], p=0.25),
    ], seed=seed)


class BatchSampler:
    """Endless seeded batches of (images (B,3,S,S) float in [-1,1], masks (B,1,S,S) float)."""

    def __init__(self, ds: ArrayDataset, batch_size: int, seed: int, augment=None, start_step: int = 0):
        self.ds, self.batch_size, self.augment = ds, batch_size, augment
        self.rng = np.random.default_rng(seed)
        self.order, self.pos = np.empty(0, dtype=int), 0
        for _ in range(start_step):  # same batches after resume as without interruption
            self._indices()

    def _indices(self) -> np.ndarray:
        out = []
        while len(out) < self.batch_size:
            if self.pos >= len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.ds)), 0
            take = self.order[self.pos:self.pos + self.batch_size - len(out)]
            self.pos += len(take)
            out.extend(take.tolist())
        return np.array(out)

    def next(self):
        import torch

        idx = self._indices()
        images, masks = self.ds.images[idx], self.ds.masks[idx].astype(np.uint8)
        if self.augment is not None:
            pairs = [self.augment(image=i, mask=m) for i, m in zip(images, masks)]
            images = np.stack([p["image"] for p in pairs])
            masks = np.stack([p["mask"] for p in pairs])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().mul_(1 / 127.5).sub_(1)
        y = torch.from_numpy(masks).unsqueeze(1).float()
        return x, y
