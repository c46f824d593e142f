"""The DiffAug quality gate: keep a synthetic sample only if a segmenter finds the polyp we asked for.

The segmenter sees the sample exactly as training will (field-of-view crop, model resolution,
one single-step pass). IoU is scored on the NEW polyp: predictions over a polyp the frame
already had are left out, so a large real polyp cannot carry a generation that failed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from syndiff_stream.metrics import iou
from syndiff_stream.model import Segmenter
from syndiff_stream.preprocess import prepare, prepare_mask


@dataclass(frozen=True)
class GateScore:
    iou: float  # IoU(new polyp, prediction away from existing polyps): decides acceptance
    iou_label: float  # IoU(whole label, prediction), for the record
    accepted: bool


class QualityGate:
    def __init__(self, model: Segmenter, threshold: float = 0.7, device: str | torch.device = "cpu"):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"gate threshold must be in [0, 1], got {threshold}")
        self.model = model.to(device).eval()
        self.threshold, self.device = threshold, torch.device(device)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray]) -> tuple[list[np.ndarray], list]:
        """Binary predictions at model resolution, and the field of view each image was cropped to."""
        size = self.model.config.image_size
        prepared = [prepare(img, size) for img in images]
        x = torch.from_numpy(np.stack([p[0] for p in prepared])).to(self.device)
        prob = self.model.predict_proba(x).float().cpu().numpy()[:, 0]
        return [p >= self.model.config.threshold for p in prob], [p[1] for p in prepared]

    def score(self, images: list[np.ndarray], new_masks: list[np.ndarray],
              existing_masks: list[np.ndarray]) -> list[GateScore]:
        preds, fovs = self.predict(images)
        size = self.model.config.image_size
        scores = []
        for pred, fov, new, old in zip(preds, fovs, new_masks, existing_masks):
            new_s, old_s = prepare_mask(new, fov, size), prepare_mask(old, fov, size)
            near_old = near_existing(new_s, old_s)
            gate_iou = iou(pred & ~near_old, new_s)
            scores.append(GateScore(gate_iou, iou(pred, new_s | old_s), gate_iou >= self.threshold))
        return scores


def near_existing(new: np.ndarray, existing: np.ndarray) -> np.ndarray:
    """Pixels next to a polyp the frame already had (a 7 px disc around it), outside the new one:
    what neither the gate nor `synth-report` counts as finding the painted polyp."""
    margin = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    return cv2.dilate(existing.astype(np.uint8), margin).astype(bool) & ~new


def load_gate_model(path: str | None) -> Segmenter:
    """A Segmenter checkpoint folder; None: the checkpoint shipped with syndiff-stream."""
    from syndiff_stream.model import CheckpointError

    try:
        return Segmenter.from_pretrained(path)
    except CheckpointError as exc:
        where = path or "the shipped default checkpoint"
        raise SystemExit(f"quality gate: cannot load {where} ({exc}); pass --gate-model DIR "
                         "(a Segmenter checkpoint, e.g. runs/<run>/best) or --no-gate") from None
