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
    """Bool mask (H, W) and its probability map -> polyps, largest first.

    One labelling pass and one contour pass over the whole mask (each outer contour belongs to the
    component under its first point), so cost does not grow with the number of components."""
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        return []
    mask_u8 = mask.view(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask_u8, connectivity=8)
    # Sum probabilities over mask pixels only: polyps cover a few percent of the frame, so this is
    # ~15x cheaper than a bincount over every pixel (3.3 -> 0.2 ms at 720x576).
    scores = (np.bincount(labels[mask], weights=prob[mask], minlength=n)
              / np.maximum(stats[:, cv2.CC_STAT_AREA], 1)) if prob is not None else np.ones(n)
    # CCOMP puts the outer boundary of every component at the top level, including components that
    # sit inside another one's hole (which RETR_EXTERNAL would skip).
    contours, hierarchy = cv2.findContours(mask_u8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outline = {}
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
        if parent < 0:
            x, y = contour[0, 0]
            outline[int(labels[y, x])] = contour.reshape(-1, 2)
    polyps = [Polyp((int(x), int(y), int(x + w), int(y + h)), int(area), float(scores[i]), outline[i])
              for i, (x, y, w, h, area) in enumerate(stats[1:, :5], start=1)]
    return sorted(polyps, key=lambda p: -p.area)
