"""Evaluation with the papers' metrics: Dice, IoU, HD95 and NSD (surface Dice).

Masks are scored at model resolution (256 x 256 over the field of view), as in training.
HD95 and NSD come from MONAI. Empty-mask policy (colonoscopy is mostly frames with no polyp):
  both empty      Dice = IoU = NSD = 1, HD95 = 0 (a correct "no polyp")
  exactly one     Dice = IoU = NSD = 0, HD95 = the image diagonal (the worst distance possible)
NSD uses a tolerance of `NSD_TOLERANCE_PX` pixels at model resolution.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch

from syndiff_stream.metrics import dice, iou
from syndiff_stream.model import Segmenter

from .data import ArrayDataset

NSD_TOLERANCE_PX = 2.0


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
def predict_masks(model: Segmenter, images: np.ndarray, steps: int = 1, timestep: int | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """uint8 images (N,S,S,3) -> bool masks (N,S,S)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
        prob = model.predict_proba(x, timestep) if steps == 1 else model.predict_proba_multistep(x, steps)
        out.append(prob[:, 0].cpu().numpy() >= model.config.threshold)
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:3], bool)


def evaluate(model: Segmenter, ds: ArrayDataset, steps: int = 1, timestep: int | None = None,
             per_image: bool = False, batch_size: int = 16) -> dict:
    started = time.perf_counter()
    preds = predict_masks(model, ds.images, steps, timestep, batch_size)
    seconds = time.perf_counter() - started
    rows = []
    for stem, p, t in zip(ds.stems, preds, ds.masks):
        hd95, nsd = surface_metrics(p, t)
        rows.append({"stem": stem, "dice": dice(p, t), "iou": iou(p, t), "hd95": hd95, "nsd": nsd})
    col = {k: np.array([r[k] for r in rows]) for k in ("dice", "iou", "hd95", "nsd")}
    result = {"n": len(rows), **{k: float(v.mean()) for k, v in col.items()},
              "dice_std": float(col["dice"].std()), "iou_std": float(col["iou"].std()),
              "hd95_std": float(col["hd95"].std()), "nsd_std": float(col["nsd"].std()),
              "steps": steps, "timestep": model.config.inference_timestep if timestep is None else timestep,
              "ms_per_image": 1000 * seconds / max(1, len(rows))}
    if per_image:
        result["images"] = rows
    return result


def fold_table(results: list[dict], title: str = "") -> str:
    """Markdown table in the papers' form: mean +- std over folds, in percent (HD95 in pixels)."""
    def cell(key, scale=100.0, fmt="{:.1f}"):
        v = np.array([r[key] for r in results]) * scale
        return f"{fmt.format(v.mean())} ± {fmt.format(v.std())}"

    lines = [f"### {title}" if title else "", "",
             "| folds | Dice (%) | IoU (%) | HD95 (px) | NSD (%) |", "|---|---|---|---|---|",
             f"| {len(results)} | {cell('dice')} | {cell('iou')} | {cell('hd95', 1.0)} | {cell('nsd')} |"]
    return "\n".join(lines).strip() + "\n"
