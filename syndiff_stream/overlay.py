"""Overlay rendering: a filled tint plus an outline of every polyp, drawn with OpenCV."""

from __future__ import annotations

import cv2
import numpy as np

POLYP_COLOR = (0, 255, 120)  # RGB: green reads well on the red-pink mucosa


def render_overlay(frame: np.ndarray, mask: np.ndarray, color=POLYP_COLOR, alpha: float = 0.35,
                   thickness: int | None = None) -> np.ndarray:
    """RGB uint8 frame + bool mask (same H, W) -> new RGB frame with the tinted, outlined mask."""
    out = frame.copy()
    if not mask.any():
        return out
    tint = np.empty_like(frame)
    tint[:] = color
    region = mask.astype(bool)
    out[region] = cv2.addWeighted(frame, 1 - alpha, tint, alpha, 0)[region]
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if thickness is None:
        thickness = max(1, round(max(frame.shape[:2]) / 300))
    cv2.drawContours(out, contours, -1, color, thickness, lineType=cv2.LINE_AA)
    return out
