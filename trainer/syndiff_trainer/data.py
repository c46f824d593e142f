"""Training data: cached model-resolution arrays, sources and their groups, leak-free splits,
seeded augmentation and batches.

Decoding and resizing full-resolution JPEGs costs more than a training step of the compact
model on 2 cores, so every dataset is decoded once into uint8 arrays and cached on disk.
Stems are prefixed with their source (`kvasir/cju0qkwl35piu0993l0dewei2`, `clinicdb/12`) so
sources can be mixed; every image belongs to one group (a ClinicDB sequence, a cluster of
Kvasir-SEG near-copies) and no split ever puts one group on both sides.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import track

from syndiff_stream.atomic import atomic_path
from syndiff_stream.datasets import DatasetError, Pair, find_pairs, read_image, read_mask
from syndiff_stream.preprocess import crop_resize, find_field_of_view, prepare_mask, to_model_range

DEFAULT_CACHE = Path.home() / ".cache" / "syndiff-stream"


@dataclass
class ArrayDataset:
    """Images (N, S, S, 3) uint8 and masks (N, S, S) bool at model resolution, with their stems."""

    images: np.ndarray
    masks: np.ndarray
    stems: list[str]
    groups: list[str] = field(default_factory=list)  # one per image; default: each image its own group

    def __post_init__(self):
        if not self.groups:
            self.groups = list(self.stems)

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def sources(self) -> list[str]:
        """Source name per image: the stem's prefix (`kvasir/...`), or '' for unprefixed stems."""
        return [s.split("/", 1)[0] if "/" in s else "" for s in self.stems]

    def subset(self, indices) -> "ArrayDataset":
        indices = np.asarray(indices, dtype=int)
        return ArrayDataset(self.images[indices], self.masks[indices], [self.stems[i] for i in indices],
                            [self.groups[i] for i in indices])

    def concat(self, other: "ArrayDataset") -> "ArrayDataset":
        return ArrayDataset(np.concatenate([self.images, other.images]), np.concatenate([self.masks, other.masks]),
                            self.stems + other.stems, self.groups + other.groups)

    def prefixed(self, source: str) -> "ArrayDataset":
        return ArrayDataset(self.images, self.masks, [f"{source}/{s}" for s in self.stems],
                            [f"{source}/{g}" for g in self.groups])


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
    with atomic_path(path) as tmp:
        np.savez(tmp, images=ds.images, masks=ds.masks, stems=np.array(ds.stems))
    return ds


# ---- sources and groups ------------------------------------------------------------------------

SEQUENCES_FILE = "sequences.csv"


def read_sequences(root: Path, stems: list[str]) -> dict[str, str]:
    """stem -> sequence id from `<root>/sequences.csv` (frame,sequence); every frame must be listed."""
    path = Path(root) / SEQUENCES_FILE
    if not path.is_file():
        raise DatasetError(f"{root}: groups = 'sequences' needs {SEQUENCES_FILE} (frame,sequence)")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"frame", "sequence"} <= set(rows[0]):
        raise DatasetError(f"{path}: expected the columns frame,sequence")
    seq = {r["frame"].strip(): r["sequence"].strip() for r in rows}
    unknown = sorted(set(seq) - set(stems))
    if unknown:
        raise DatasetError(f"{path} names {len(unknown)} frame(s) with no image, e.g. {unknown[0]}")
    unlisted = sorted(set(stems) - set(seq))
    if unlisted:
        raise DatasetError(f"{path} does not list {len(unlisted)} frame(s), e.g. {unlisted[0]}")
    return {s: f"seq{seq[s]}" for s in stems}


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """64-bit pHash (imagehash) of each image's central half: the field-of-view border, the
    black corner box and on-screen text are shared by unrelated frames of one scope, so hashing
    the whole frame groups different polyps; the centre holds the scene."""
    import imagehash
    from PIL import Image

    n = images.shape[1]
    c = slice(n // 4, n - n // 4)
    bits = [imagehash.phash(Image.fromarray(im[c, c]), hash_size=8).hash.flatten() for im in images]
    return np.packbits(np.array(bits, dtype=bool), axis=1).view(">u8")[:, 0].astype(np.uint64)


def hash_clusters(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Connected components of `hamming(a, b) <= threshold` (union-find): cluster id per image."""
    n = len(hashes)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    as_bytes = hashes.astype(">u8").view(np.uint8).reshape(n, 8)
    for i in range(n - 1):
        dist = np.unpackbits(as_bytes[i] ^ as_bytes[i + 1:], axis=1).sum(1)
        for j in np.nonzero(dist <= threshold)[0] + i + 1:
            a, b = root(i), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)])


def group_ids(ds: ArrayDataset, how: str, root: Path, phash_threshold: int) -> list[str]:
    if how == "none":
        return list(ds.stems)
    if how == "sequences":
        seq = read_sequences(root, ds.stems)
        return [seq[s] for s in ds.stems]
    cluster = hash_clusters(perceptual_hashes(ds.images), phash_threshold)
    return [f"near{ds.stems[c]}" if (cluster == c).sum() > 1 else s for s, c in zip(ds.stems, cluster)]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Sources:
    """Every recipe source loaded, prefixed and grouped, with its manifest (files + content hashes)."""

    ds: ArrayDataset
    weights: dict[str, float]
    manifest: dict


def load_sources(specs, size: int, phash_threshold: int = 5, cache_dir: Path | None = DEFAULT_CACHE,
                 progress: bool = True) -> Sources:
    """Load recipe `data` entries (objects with name, path, weight, groups); checks every path first."""
    for spec in specs:  # every input checked before any work
        if not Path(spec.path).is_dir():
            raise DatasetError(f"data source {spec.name!r}: folder {spec.path} does not exist")
    parts, manifest = [], {"sources": []}
    for spec in specs:
        root = Path(spec.path)
        skip = getattr(spec, "skip_unpaired", False)
        pairs = find_pairs(root, skip_unpaired=skip)
        ds = load_dataset(root, size, cache_dir=cache_dir, progress=progress, skip_unreadable=skip)
        ds.groups = group_ids(ds, spec.groups, root, phash_threshold)
        parts.append(ds.prefixed(spec.name))
        by_stem = {p.stem: p for p in pairs}
        files = [{"stem": s, "image": by_stem[s].image.name, "image_sha256": file_sha256(by_stem[s].image),
                  "mask": by_stem[s].mask.name, "mask_sha256": file_sha256(by_stem[s].mask)} for s in ds.stems]
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        manifest["sources"].append({"name": spec.name, "path": str(spec.path), "images": len(files),
                                    "groups": len(set(ds.groups)), "grouping": spec.groups, "sha256": digest,
                                    "files": files})
    ds = parts[0]
    for part in parts[1:]:
        ds = ds.concat(part)
    return Sources(ds, {s.name: s.weight for s in specs}, manifest)


def manifest_mismatch(recorded: dict, current: dict) -> str | None:
    """Why the data found now is not the data a run recorded (None: same files, same bytes)."""
    rec = {s["name"]: s for s in recorded["sources"]}
    cur = {s["name"]: s for s in current["sources"]}
    if rec.keys() != cur.keys():
        return f"sources differ: recorded {sorted(rec)}, found {sorted(cur)}"
    for name, r in rec.items():
        if r["sha256"] == cur[name]["sha256"]:
            continue
        rf = {f["stem"]: f for f in r["files"]}
        cf = {f["stem"]: f for f in cur[name]["files"]}
        missing, extra = sorted(rf.keys() - cf.keys()), sorted(cf.keys() - rf.keys())
        if missing:
            return f"source {name!r}: {len(missing)} recorded file(s) missing, e.g. {rf[missing[0]]['image']}"
        if extra:
            return f"source {name!r}: {len(extra)} file(s) not in the recorded manifest, e.g. {cf[extra[0]]['image']}"
        changed = next(s for s in sorted(rf) if rf[s] != cf[s])
        return f"source {name!r}: {rf[changed]['image']} (or its mask) differs from the recorded bytes"
    return None


# ---- splits: by group, seeded, written to JSON so a run can be reproduced and audited ----------

def _take_groups(groups: list[str], fraction: float, rng: np.random.Generator) -> set[str]:
    """Whole groups, in seeded order, until `fraction` of the images are taken (at least one group)."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes)
    rng.shuffle(order)
    target, taken, count = fraction * len(groups), set(), 0
    for g in order:
        if count >= target and taken:
            break
        taken.add(g)
        count += sizes[g]
    return taken


def grouped_split(ds: ArrayDataset, val_fraction: float, select_fraction: float = 0.0, seed: int = 0,
                  holdout: str | None = None) -> dict[str, list[str]]:
    """{train, select, val} stems; groups never straddle, each source contributes its share.

    `holdout` puts one whole source in val (what a new hospital sees); the others are split for
    `select` only."""
    rng = np.random.default_rng(seed)
    side: dict[str, str] = {}
    sources = ds.sources
    for source in sorted(set(sources)):
        groups = [g for g, s in zip(ds.groups, sources) if s == source]
        if source == holdout:
            side.update({g: "val" for g in groups})
            continue
        val = set() if holdout or val_fraction == 0 else _take_groups(groups, val_fraction, rng)
        rest = [g for g in groups if g not in val]
        select = _take_groups(rest, select_fraction * len(groups) / max(1, len(rest)), rng) if select_fraction else set()
        side.update({g: "val" if g in val else "select" if g in select else "train" for g in groups})
    split = {"train": [], "select": [], "val": []}
    for stem, g in zip(ds.stems, ds.groups):
        split[side[g]].append(stem)
    return {k: sorted(v) for k, v in split.items()}


def group_kfold(ds: ArrayDataset, k: int, seed: int) -> list[dict[str, list[str]]]:
    """k folds of whole groups, balanced by image count within every source (GroupKFold, seeded)."""
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    sources = ds.sources
    for source in sorted(set(sources)):
        sizes: dict[str, int] = {}
        for g, s in zip(ds.groups, sources):
            if s == source:
                sizes[g] = sizes.get(g, 0) + 1
        order = sorted(sizes)
        rng.shuffle(order)
        load = [0] * k
        for g in sorted(order, key=lambda g: -sizes[g]):  # largest groups first, to the lightest fold
            i = int(np.argmin(load))
            fold_of[g] = i
            load[i] += sizes[g]
    folds = []
    for i in range(k):
        val = sorted(s for s, g in zip(ds.stems, ds.groups) if fold_of[g] == i)
        train = sorted(s for s, g in zip(ds.stems, ds.groups) if fold_of[g] != i)
        folds.append({"train": train, "select": [], "val": val})
    return folds


def holdout_split(stems: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Ungrouped random split: only for data without groups (kept for old split files' sake)."""
    order = sorted(stems)
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return {"train": sorted(order[n_val:]), "val": sorted(order[:n_val])}


def check_split(ds: ArrayDataset, split: dict[str, list[str]]) -> None:
    """Refuse a split that leaks: a stem or a group on two sides."""
    sides = [k for k in ("train", "select", "val") if split.get(k)]
    for i, a in enumerate(sides):
        for b in sides[i + 1:]:
            leak = set(split[a]) & set(split[b])
            if leak:
                raise DatasetError(f"split leaks {len(leak)} image(s) between {a} and {b}, e.g. {sorted(leak)[0]}")
    group = dict(zip(ds.stems, ds.groups))
    seen: dict[str, str] = {}
    for side in sides:
        for stem in split[side]:
            g = group.get(stem)
            if g is not None and seen.setdefault(g, side) != side:
                raise DatasetError(f"split puts group {g} on both {seen[g]} and {side} (e.g. {stem}): "
                                   "near-copies on both sides inflate validation")


def apply_split(ds: ArrayDataset, split: dict[str, list[str]], side: str | None = None):
    """(train, val) subsets, or one side's subset; refuses leaking splits and unknown stems."""
    check_split(ds, split)
    index = {s: i for i, s in enumerate(ds.stems)}
    named = [s for k in ("train", "select", "val") for s in split.get(k, [])]
    missing = [s for s in named if s not in index]
    if missing:
        raise DatasetError(f"split names {len(missing)} image(s) not in the dataset, e.g. {missing[0]}")
    if side is not None:
        return ds.subset([index[s] for s in split.get(side, [])])
    return ds.subset([index[s] for s in split["train"]]), ds.subset([index[s] for s in split["val"]])


# ---- augmentation --------------------------------------------------------------------------

def build_augmenter(strength: str = "standard", seed: int | None = None, colour: str = "mild"):
    """Geometric + photometric augmentation (albumentations), or None for `none`.

    Noise is kept at scope-sensor level (2-6 % std): albumentations' default GaussNoise (20-44 %)
    drowns the mucosal texture the encoder has to learn from. `scope` adds what differs between
    scopes and centres (see `scope_transforms`); `colour="strong"` adds `colour_transforms`.
    """
    if strength not in ("none", "standard", "scope"):
        raise ValueError(f"unknown augmentation {strength!r}: none, standard or scope")
    if colour not in ("mild", "strong"):
        raise ValueError(f"unknown colour augmentation {colour!r}: mild or strong")
    if strength == "none" and colour == "mild":
        return None
    import albumentations as A
    import cv2

    transforms = [] if strength == "none" else [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(scale=(0.75, 1.3), translate_percent=(-0.1, 0.1), rotate=(-30, 30), shear=(-5, 5),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.8),
        A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2, hue=0.03, p=0.8),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=5), A.GaussNoise(std_range=(0.02, 0.06))], p=0.25),
    ]
    if strength == "scope":
        from .scope_augment import scope_transforms

        transforms += scope_transforms()
    if colour == "strong":
        from .scope_augment import colour_transforms

        transforms += colour_transforms()
    return A.Compose(transforms, seed=seed)


def small_polyp_weights(ds: ArrayDataset, spec) -> np.ndarray | None:
    """Relative draw weight per image: 1 + boost for images whose polyps are all small, else 1."""
    if not spec or spec.small_polyp_boost == 0:
        return None
    import cv2

    weights = np.ones(len(ds))
    for i, mask in enumerate(ds.masks):
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA] / mask.size
        if n > 1 and (areas < spec.small_fraction).all():
            weights[i] += spec.small_polyp_boost
    return weights


def sample_seed(*key: int) -> int:
    """A 32-bit seed from a tuple (seed, step, slot): the same draw whatever the worker layout."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


class BatchSampler:
    """Seeded batches of (images (B,3,S,S) float in [-1,1], masks (B,1,S,S) float).

    Batch `step` is a pure function of (seed, step): indices drawn with replacement in proportion
    to the source weights, and every sample augmented from its own seed (seed, step, slot). A
    resumed run, or one with another loader layout, sees exactly the same batches."""

    def __init__(self, ds: ArrayDataset, batch_size: int, seed: int, augment=None,
                 source_weights: dict[str, float] | None = None, image_weights: np.ndarray | None = None,
                 negatives: ArrayDataset | None = None, negative_rate: float = 0.0, negatives_from: int = 0,
                 negatives_ramp: int = 0):
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self._local = threading.local()  # one copy of the augmenter per loader thread: it holds its seed
        self.p = self._source_weighted(ds, source_weights, image_weights)
        self.p_free = None
        self.rate, self.negatives_from, self.negatives_ramp = negative_rate, negatives_from, negatives_ramp
        self.parts = [ds]  # the frames, then the crops: index i >= len(frames) is crop i - len(frames)
        if negatives is not None and len(negatives) and negative_rate > 0:
            # polyp-free crops take `rate_at(step)` of the draws, shared among sources as the frames
            # are; before any, frames only: the very draws of a sampler without crops
            self.p = np.concatenate([self.p, np.zeros(len(negatives))])
            self.p_free = np.concatenate([np.zeros(len(ds)), self._source_weighted(negatives, source_weights)])
            self.parts.append(negatives)  # not concatenated: a copy of every training image would cost GBs

    def rate_at(self, step: int) -> float:
        """Share of polyp-free crops in batch `step`: none before `negatives_from`, then rising
        linearly to the full rate over `negatives_ramp` steps."""
        if self.p_free is None or step < self.negatives_from:
            return 0.0
        if self.negatives_ramp <= 0:
            return self.rate
        return self.rate * min(1.0, (step - self.negatives_from + 1) / self.negatives_ramp)

    @staticmethod
    def _source_weighted(ds: ArrayDataset, source_weights: dict[str, float] | None,
                         image_weights: np.ndarray | None = None) -> np.ndarray:
        """Draw probability per image: each source its weight's share, then relative image weights within it."""
        sources = ds.sources
        counts = {s: sources.count(s) for s in set(sources)}
        w = np.array([(source_weights or {}).get(s, 1.0) / counts[s] for s in sources], dtype=np.float64)
        if image_weights is not None:  # within a source: relative weights; a source's share stays its own
            for s in set(sources):
                idx = np.array([i for i, x in enumerate(sources) if x == s])
                rel = image_weights[idx] / image_weights[idx].mean()
                w[idx] = w[idx] * rel
        return w / w.sum()

    def indices(self, step: int) -> np.ndarray:
        rng = np.random.default_rng(sample_seed(self.seed, step))
        rate = self.rate_at(step)
        p = self.p if rate == 0 else (1 - rate) * self.p + rate * self.p_free
        return rng.choice(len(self.p), size=self.batch_size, p=p)

    def _take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images and masks of draw indices over frames and crops together."""
        frames = self.parts[0]
        if len(self.parts) == 1 or (idx < len(frames)).all():
            return frames.images[idx], frames.masks[idx]
        crops = self.parts[1]
        pick = [(frames, i) if i < len(frames) else (crops, i - len(frames)) for i in idx]
        return np.stack([d.images[i] for d, i in pick]), np.stack([d.masks[i] for d, i in pick])

    def batch(self, step: int, slots: slice = slice(None)):
        """Batch `step`, or only its `slots` (one process's share of a global batch): sample i of
        the batch is the same whichever process draws it."""
        import torch

        first = slots.indices(self.batch_size)[0]
        idx = self.indices(step)[slots]
        images, masks = self._take(idx)
        masks = masks.astype(np.uint8)
        if self.augment is not None:
            augment = getattr(self._local, "augment", None)
            if augment is None:
                augment = self._local.augment = copy.deepcopy(self.augment)
            out_i, out_m = [], []
            for slot, (image, mask) in enumerate(zip(images, masks), start=first):
                augment.set_random_seed(sample_seed(self.seed, step, slot))
                res = augment(image=image, mask=mask)
                out_i.append(res["image"])
                out_m.append(res["mask"])
            images, masks = np.stack(out_i), np.stack(out_m)
        x = to_model_range(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float())
        y = torch.from_numpy(np.ascontiguousarray(masks)).unsqueeze(1).float()
        return x, y
