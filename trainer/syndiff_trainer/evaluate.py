"""Evaluation with the papers' metrics: Dice, IoU, HD95 and NSD (surface Dice).

Masks are scored at model resolution (256 x 256 over the field of view), as in training.
HD95 and NSD come from MONAI. Empty-mask policy (colonoscopy is mostly frames with no polyp):
  both empty      Dice = IoU = NSD = 1, HD95 = 0 (a correct "no polyp")
  exactly one     Dice = IoU = NSD = 0, HD95 = the image diagonal (the worst distance possible)
NSD uses a tolerance of `NSD_TOLERANCE_PX` pixels at model resolution.

Confidence intervals: 95 % percentile bootstrap over groups (a ClinicDB sequence, a cluster of
Kvasir-SEG near-copies), not over images: frames of one polyp are not independent samples, and
resampling them one by one would make the interval too narrow.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
import warnings

import numpy as np
import torch

from syndiff_stream.datasets import DatasetError
from syndiff_stream.metrics import dice, iou
from syndiff_stream.model import Segmenter
from syndiff_stream.preprocess import to_model_range
from syndiff_stream.smoothing import remove_small

from .data import ArrayDataset, apply_split, group_ids, load_dataset
from .recipe import load_recipe

NSD_TOLERANCE_PX = 2.0
SMALL_POLYP_FRACTION = 0.02  # a polyp under 2 % of the frame is "small"
FOUND_COVERAGE = 0.5  # a polyp is found when the prediction covers at least half of it


def polyp_recall(pred: np.ndarray, target: np.ndarray) -> list[tuple[float, bool]]:
    """Per truth polyp (8-connected component): (area as a fraction of the frame, found?)."""
    import cv2

    n, labels = cv2.connectedComponents(target.astype(np.uint8), connectivity=8)
    out = []
    for k in range(1, n):
        comp = labels == k
        area = int(comp.sum())
        out.append((area / target.size, bool(np.logical_and(comp, pred).sum() >= FOUND_COVERAGE * area)))
    return out


def surface_metrics(pred: np.ndarray, target: np.ndarray, tolerance: float = NSD_TOLERANCE_PX) -> tuple[float, float]:
    """(HD95 in pixels, NSD) for one pair of bool masks, with the empty-mask policy above."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p, t = bool(pred.any()), bool(target.any())
    if not p and not t:
        return 0.0, 1.0
    if p != t:
        return float(math.hypot(*pred.shape)), 0.0
    a = torch.from_numpy(pred[None, None].astype(np.float32))
    b = torch.from_numpy(target[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(a, b, include_background=True, percentile=95)
        nsd = compute_surface_dice(a, b, class_thresholds=[tolerance], include_background=True)
    return float(hd), float(nsd)


@torch.no_grad()
def predict_proba(model: Segmenter, images: np.ndarray, steps: int = 1, timestep: int | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """uint8 images (N,S,S,3) -> float32 polyp probabilities (N,S,S)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float()).to(device)
        prob = model.predict_proba(x, timestep) if steps == 1 else model.predict_proba_multistep(x, steps)
        out.append(prob[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:3], np.float32)


def to_masks(prob: np.ndarray, threshold: float, min_area: float = 0.0) -> np.ndarray:
    """Probabilities (N,S,S) -> the masks the runtime reports frame by frame: prob >= threshold,
    less 8-connected components under `min_area` of the frame (the operating point)."""
    masks = prob >= threshold
    if min_area > 0:
        pixels = min_area * masks.shape[1] * masks.shape[2]
        masks = np.stack([remove_small(m, pixels) for m in masks]) if len(masks) else masks
    return masks


def predict_masks(model: Segmenter, images: np.ndarray, steps: int = 1, timestep: int | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """uint8 images (N,S,S,3) -> bool masks (N,S,S) at the checkpoint's operating point."""
    prob = predict_proba(model, images, steps, timestep, batch_size)
    return to_masks(prob, model.config.threshold, model.config.min_area)


BOOTSTRAP_SAMPLES = 2000


def bootstrap_ci(values, groups=None, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling whole groups with replacement."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    groups = np.asarray(groups if groups is not None else np.arange(len(values)))
    names, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names)).astype(float)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(names), size=(samples, len(names)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return (float(lo), float(hi))


def recall_summary(polyps: list[tuple[str, float, bool]]) -> dict:
    """Polyps found (>= half covered), all and small (< 2 % of the frame)."""
    small = [found for _, area, found in polyps if area < SMALL_POLYP_FRACTION]
    return {"polyps": len(polyps), "polyps_found": sum(f for *_, f in polyps),
            "small_polyps": len(small), "small_polyps_found": sum(small),
            "small_polyp_recall": (sum(small) / len(small)) if small else None}


def summarise(rows: list[dict], groups: list[str]) -> dict:
    """Mean, std and group-bootstrap CI of Dice and IoU, plus mean HD95 and NSD."""
    col = {k: np.array([r[k] for r in rows]) for k in ("dice", "iou", "hd95", "nsd")}
    out = {"n": len(rows), "groups": len(set(groups)), **{k: float(v.mean()) for k, v in col.items()}}
    for k in ("dice", "iou", "hd95", "nsd"):
        out[f"{k}_std"] = float(col[k].std())
    out["dice_ci"] = list(bootstrap_ci(col["dice"], groups))
    out["iou_ci"] = list(bootstrap_ci(col["iou"], groups))
    return out


def specificity(masks: np.ndarray, groups: list[str]) -> dict:
    """Frame-level specificity of masks predicted on polyp-free frames: the share on which nothing
    is reported, with a 95 % bootstrap interval over groups (a sequence, a frame's crops), and the
    alarms' mean area (a fraction of the frame)."""
    alarm = masks.reshape(len(masks), -1).any(axis=1)
    area = masks.reshape(len(masks), -1).mean(axis=1)
    lo, hi = bootstrap_ci(1.0 - alarm, groups)
    return {"frames": int(len(masks)), "groups": len(set(groups)), "alarm_frames": int(alarm.sum()),
            "alarm_rate": float(alarm.mean()), "specificity": float(1 - alarm.mean()), "specificity_ci": [lo, hi],
            "alarm_area": float(area[alarm].mean()) if alarm.any() else 0.0}


def evaluate(model: Segmenter, ds: ArrayDataset, steps: int = 1, timestep: int | None = None,
             per_image: bool = False, batch_size: int = 16, polyp_free: dict[str, ArrayDataset] | None = None) -> dict:
    """Dice, IoU, HD95, NSD and polyps found on `ds`, at the checkpoint's operating point; with
    `polyp_free` sets (name -> frames with no polyp), frame-level specificity on each."""
    started = time.perf_counter()
    preds = predict_masks(model, ds.images, steps, timestep, batch_size)
    seconds = time.perf_counter() - started
    rows, polyps = [], []
    for stem, p, t in zip(ds.stems, preds, ds.masks):
        hd95, nsd = surface_metrics(p, t)
        rows.append({"stem": stem, "dice": dice(p, t), "iou": iou(p, t), "hd95": hd95, "nsd": nsd})
        polyps += [(stem, *found) for found in polyp_recall(p, t)]
    result = {**summarise(rows, ds.groups), "steps": steps,
              "timestep": model.config.inference_timestep if timestep is None else timestep,
              "ms_per_image": 1000 * seconds / max(1, len(rows)), **recall_summary(polyps)}
    sources = ds.sources
    if len(set(sources)) > 1:
        result["by_source"] = {}
        for source in sorted(set(sources)):
            keep = [i for i, s in enumerate(sources) if s == source]
            stems = {ds.stems[i] for i in keep}
            result["by_source"][source] = {**summarise([rows[i] for i in keep], [ds.groups[i] for i in keep]),
                                           **recall_summary([p for p in polyps if p[0] in stems])}
    if polyp_free:
        result["polyp_free"] = {name: specificity(predict_masks(model, free.images, steps, timestep, batch_size),
                                                  free.groups) for name, free in polyp_free.items() if len(free)}
    result["operating_point"] = {"threshold": model.config.threshold, "min_area": model.config.min_area}
    if per_image:
        result["images"] = rows
    return result


def paired_difference(result: dict, baseline: dict, ds: ArrayDataset) -> dict:
    """Dice of `result` minus `baseline` on the same images (both need per-image rows), with a
    95 % bootstrap CI over groups: a paired interval is far narrower than two unpaired ones, so
    it can tell two checkpoints apart where their own intervals overlap."""
    base = {r["stem"]: r["dice"] for r in baseline["images"]}
    diff = np.array([r["dice"] - base[r["stem"]] for r in result["images"]])
    groups, sources = np.asarray(ds.groups), np.asarray(ds.sources)

    def summary(keep):
        return {"n": int(keep.sum()), "dice": float(diff[keep].mean()),
                "dice_ci": list(bootstrap_ci(diff[keep], groups[keep]))}

    out = {**summary(np.ones(len(diff), bool)), "baseline_dice": baseline["dice"]}
    if len(set(sources)) > 1:
        out["by_source"] = {s: {**summary(sources == s), "baseline_dice": baseline["by_source"][s]["dice"]}
                            for s in sorted(set(sources))}
    return out


def source_table(result: dict) -> str:
    """Markdown: one row per source (and all), mean Dice / IoU with their 95 % CI, polyps found;
    then specificity on each polyp-free set."""
    rows = [("all", result)] + sorted(result.get("by_source", {}).items())
    lines = ["| source | images | groups | Dice (95 % CI) | IoU (95 % CI) | HD95 (px) | polyps found | small polyps found |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n']} | {r['groups']} | {r['dice']:.3f} ({r['dice_ci'][0]:.3f}-{r['dice_ci'][1]:.3f}) | "
                     f"{r['iou']:.3f} ({r['iou_ci'][0]:.3f}-{r['iou_ci'][1]:.3f}) | {r['hd95']:.1f} | "
                     f"{r.get('polyps_found', 0)} of {r.get('polyps', 0)} | "
                     f"{r.get('small_polyps_found', 0)} of {r.get('small_polyps', 0)} |")
    if result.get("polyp_free"):
        lines += ["", "| polyp-free set | frames | groups | frames with an alarm | specificity (95 % CI) | mean alarm area |",
                  "|---|---|---|---|---|---|"]
        for name, r in result["polyp_free"].items():
            lines.append(f"| {name} | {r['frames']} | {r['groups']} | {r['alarm_frames']} ({100 * r['alarm_rate']:.1f} %) | "
                         f"{r['specificity']:.3f} ({r['specificity_ci'][0]:.3f}-{r['specificity_ci'][1]:.3f}) | "
                         f"{100 * r['alarm_area']:.1f} % |")
    return "\n".join(lines) + "\n"


def paired_table(paired: dict) -> str:
    """Markdown: this checkpoint's Dice minus the --against one's, per source, with the paired CI."""
    rows = [("all", paired)] + sorted(paired.get("by_source", {}).items())
    lines = [f"Against {paired['model']} (same images):", "",
             "| source | images | its Dice | Dice difference (95 % CI, paired over groups) |", "|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['n']} | {r['baseline_dice']:.3f} | {r['dice']:+.3f} "
                     f"({r['dice_ci'][0]:+.3f} to {r['dice_ci'][1]:+.3f}) |")
    if paired.get("polyp_free"):
        lines += ["", "| polyp-free set | its frames with an alarm | its specificity |", "|---|---|---|"]
        lines += [f"| {name} | {r['alarm_frames']} of {r['frames']} | {r['specificity']:.3f} |"
                  for name, r in paired["polyp_free"].items()]
    return "\n".join(lines) + "\n"


def fold_table(results: list[dict], title: str = "") -> str:
    """Markdown table in the papers' form: mean +- std over folds, in percent (HD95 in pixels)."""
    def cell(key, scale=100.0, fmt="{:.1f}"):
        v = np.array([r[key] for r in results]) * scale
        return f"{fmt.format(v.mean())} ± {fmt.format(v.std())}"

    lines = [f"### {title}" if title else "", "",
             "| folds | Dice (%) | IoU (%) | HD95 (px) | NSD (%) |", "|---|---|---|---|---|",
             f"| {len(results)} | {cell('dice')} | {cell('iou')} | {cell('hd95', 1.0)} | {cell('nsd')} |"]
    return "\n".join(lines).strip() + "\n"


def recorded_sources(model_dir: Path) -> dict[str, dict]:
    """The folders a checkpoint trained from, by resolved path, each with its manifest entry
    (name, grouping); {} for a checkpoint without a manifest."""
    manifest = Path(model_dir) / "manifest.json"
    if not manifest.is_file():
        return {}
    return {str(Path(src["path"]).resolve()): src for src in json.loads(manifest.read_text())["sources"]}


def named_sources(data: list[str], model_dir: Path) -> list[tuple[str, str]]:
    """(name, folder) of each `--data` item: NAME=PATH, or PATH named as the checkpoint's manifest
    names that folder, else by the folder's name; every folder must exist."""
    manifest_names = {path: src["name"] for path, src in recorded_sources(Path(model_dir)).items()}
    out = []
    for item in data:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, manifest_names.get(str(Path(item).resolve()), Path(item).name)
        if not Path(path).is_dir():
            raise DatasetError(f"--data {path}: folder does not exist")
        out.append((name, path))
    return out


def polyp_free_sets(free: list[str], crops_of_data: list[str], ds: ArrayDataset, model_dir: Path,
                    size: int) -> dict[str, ArrayDataset]:
    """The polyp-free sets `eval` scores: each `--polyp-free` folder (NAME=PATH or PATH, named by its
    folder), and polyp-free crops of the scored images of the `--data` sources, cut as training cuts
    them (`negatives.load_crops`, the recipe's defaults), each in its frame's group."""
    from .negatives import crops_of, load_crops, named_polyp_free
    from .recipe import NegativesSpec

    sets = named_polyp_free(free, size)
    if crops_of_data:
        spec = NegativesSpec()
        parts = [load_crops(path, size, spec.per_image, spec.seed, spec.min_scale, spec.margin, progress=False,
                            skip_unpaired=True).prefixed(name) for name, path in named_sources(crops_of_data, model_dir)]
        crops = parts[0]
        for part in parts[1:]:
            crops = crops.concat(part)
        sets["crops of the scored images"] = crops_of(crops, ds)
    return sets


def load_eval_data(data: list[str], model_dir: Path, split_file: Path | None, split: str, subset: str | None,
                   size: int, warn, skip_unpaired: bool = False) -> ArrayDataset:
    """Sources named NAME=PATH (or PATH: named as the checkpoint's manifest names that folder, else by
    folder name), cut to one side of the checkpoint's recorded split (or --split-file)."""
    model_dir = Path(model_dir)
    recorded = model_dir / "split.json"
    trained_from = recorded_sources(model_dir)
    manifest_names = {path: src["name"] for path, src in trained_from.items()}
    grouping = {src["name"]: src.get("grouping", "none") for src in trained_from.values()}
    threshold = load_recipe(model_dir / "recipe.toml").split.phash_threshold if (model_dir / "recipe.toml").is_file() else 5
    try:
        parts = []
        for name, path in named_sources(data, model_dir):
            ds = load_dataset(path, size, subset=subset, progress=False, skip_unreadable=skip_unpaired)
            how = grouping.get(name) or ("sequences" if (Path(path) / "sequences.csv").is_file() else "phash")
            ds.groups = group_ids(ds, how, Path(path), threshold)
            parts.append(ds.prefixed(name))
        ds = parts[0]
        for part in parts[1:]:
            ds = ds.concat(part)
        split_path = split_file or (recorded if recorded.is_file() and split != "all" else None)
        if split_path is not None and split != "all":
            chosen = json.loads(Path(split_path).read_text())
            names = sorted(set(ds.sources))
            if len(names) == 1:  # split files from before sources had names hold bare stems
                for side in ("train", "select", "val"):
                    chosen[side] = [s if "/" in s else f"{names[0]}/{s}" for s in chosen.get(side, [])]
            known = set(ds.stems)
            for side in ("train", "select", "val"):
                chosen[side] = [s for s in chosen.get(side, []) if s in known]
            named = {s for side in ("train", "select", "val") for s in chosen[side]}
            unseen = [s for s in ds.stems if s not in named]  # sources the run never saw: all held out
            chosen["val"] += unseen
            ds = apply_split(ds, chosen, split)
        elif manifest_names and split == "all":
            warn("scoring every image, training images included (--split all)")
        elif not manifest_names and split_file is None:
            warn("this checkpoint records no split: if it was trained on these images, the score is inflated")
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise DatasetError(f"evaluation data: {exc}") from None
    return ds
