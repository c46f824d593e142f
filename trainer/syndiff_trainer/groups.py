"""How a dataset is grouped, shown so a person can check it: counts and a contact sheet of the
groups that hold more than one image (near-copy clusters, sequences)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from syndiff_stream.atomic import atomic_path

from .data import ArrayDataset

TILE = 96


def group_summary(ds: ArrayDataset) -> dict:
    members: dict[str, list[str]] = defaultdict(list)
    for stem, group in zip(ds.stems, ds.groups):
        members[group].append(stem)
    multi = sorted(((g, m) for g, m in members.items() if len(m) > 1), key=lambda gm: (-len(gm[1]), gm[0]))
    counts = {}
    for source in sorted(set(ds.sources)):
        groups = {g for g, s in zip(ds.groups, ds.sources) if s == source}
        counts[source] = {"images": ds.sources.count(source), "groups": len(groups),
                          "multi_image_groups": sum(1 for g, _ in multi if g in groups)}
    return {"counts": counts, "multi": multi}


def contact_sheet(ds: ArrayDataset, path: str | Path, limit: int = 40, per_row: int = 8) -> Path:
    """One row per multi-image group (up to `per_row` members), polyp outlined in green."""
    index = {s: i for i, s in enumerate(ds.stems)}
    rows = []
    for _, members in group_summary(ds)["multi"][:limit]:
        tiles = []
        for stem in members[:per_row]:
            i = index[stem]
            tile = cv2.resize(ds.images[i], (TILE, TILE), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(ds.masks[i].astype(np.uint8), (TILE, TILE), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(tile, contours, -1, (0, 255, 0), 1)
            tiles.append(tile)
        tiles += [np.zeros((TILE, TILE, 3), np.uint8)] * (per_row - len(tiles))
        rows.append(np.hstack(tiles))
    if not rows:
        rows = [np.zeros((TILE, TILE * per_row, 3), np.uint8)]
    path = Path(path)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    return path
