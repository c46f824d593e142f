"""Masks -> polyps: one record per connected component, at source resolution.

What a downstream consumer (a UI, a recorder, a report) needs per polyp: a box to draw, an area
to threshold or log, a score to rank, and the outline to trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np


@dataclass(frozen=True)
class Polyp:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels, half-open
    area: int  # pixels
    score: float  # mean probability inside the component
    contour: np.ndarray = field(repr=False, compare=False)  # (K, 2) int32 x, y points of the outline

    def as_dict(self, with_contour: bool = False) -> dict:
        out = {"box": list(self.box), "area": self.area, "score": round(self.score, 4)}
        if with_contour:
            out["contour"] = self.contour.tolist()
        return out


def find_polyps(mask: np.ndarray, prob: np.ndarray | None = None) -> list[Polyp]:
    """Bool mask (H, W) and its probability map -> polyps, largest first."""
    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if prob is not None:
        sums = np.bincount(labels.ravel(), weights=prob.ravel().astype(np.float64), minlength=n)
    polyps = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        component = (labels[y:y + h, x:x + w] == i).astype(np.uint8)
        contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x, y))
        contour = max(contours, key=cv2.contourArea).reshape(-1, 2)
        score = float(sums[i] / area) if prob is not None else 1.0
        polyps.append(Polyp((x, y, x + w, y + h), area, score, contour))
    return sorted(polyps, key=lambda p: -p.area)
