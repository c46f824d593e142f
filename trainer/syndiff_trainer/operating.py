"""A checkpoint's operating point: the threshold and minimum area that trade polyps found against
alarms on polyp-free frames, chosen from the measured curve rather than by hand.

The model runs once per image; every (threshold, minimum area) of the grid is then applied to the
same probabilities (`evaluate.to_masks`, what the runtime reports frame by frame). A point's
sensitivity is the share of true polyps found (at least half covered, `evaluate.polyp_recall`) on
images with polyps; its alarm rate, per polyp-free set, the share of frames on which anything
survives. The rule: the most sensitive point whose alarm rate is at most `max_alarm` on every
polyp-free folder (ties: the higher Dice, then the lower threshold). Choosing on a set and reporting
on it flatters the set, so the chosen rule is also scored leave-one-group-out: for each sequence of
the polyp-free folders, the point is chosen without it and its alarms counted on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from syndiff_stream.atomic import write_text
from syndiff_stream.metrics import dice
from syndiff_stream.model import CONFIG_NAME, Segmenter

from .data import ArrayDataset
from .evaluate import FOUND_COVERAGE, SMALL_POLYP_FRACTION, predict_proba, to_masks

# Up to 0.99: with a presence head the map is p(frame) x p(pixel | polyp) and its mask factor is
# near 1 on most frames, so the threshold cuts mostly on p(frame), whose useful cut-offs lie high.
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.3, 0.96, 0.05)) + (0.97, 0.98, 0.99)
MIN_AREAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02)


def _truth_polyps(masks: np.ndarray) -> list[list[np.ndarray]]:
    """Per image, the pixel index arrays of its 8-connected true polyps."""
    out = []
    for mask in masks:
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        flat = labels.ravel()
        out.append([np.flatnonzero(flat == k) for k in range(1, n)])
    return out


def curve(model: Segmenter, positives: ArrayDataset, polyp_free: dict[str, ArrayDataset],
          thresholds=THRESHOLDS, min_areas=MIN_AREAS) -> dict:
    """Every grid point scored: sensitivity (all and small polyps) and Dice on `positives`, the
    alarm rate on each polyp-free set, and per polyp-free group the alarm counts (for the
    leave-one-group-out estimate)."""
    prob_pos = predict_proba(model, positives.images)
    prob_free = {name: predict_proba(model, ds.images) for name, ds in polyp_free.items()}
    polyps = _truth_polyps(positives.masks)
    rows = []
    for t in thresholds:
        for area in min_areas:
            pred = to_masks(prob_pos, t, area)
            found = small = small_found = total = 0
            for p, comps in zip(pred, polyps):
                flat = p.ravel()
                for comp in comps:
                    hit = flat[comp].sum() >= FOUND_COVERAGE * len(comp)
                    total += 1
                    found += hit
                    if len(comp) < SMALL_POLYP_FRACTION * flat.size:
                        small += 1
                        small_found += hit
            row = {"threshold": t, "min_area": area, "polyps": total, "sensitivity": found / max(1, total),
                   "small_sensitivity": small_found / small if small else None,
                   "dice": float(np.mean([dice(p, m) for p, m in zip(pred, positives.masks)])), "alarm_rate": {},
                   "alarms_by_group": {}}
            for name, ds in polyp_free.items():
                alarm = to_masks(prob_free[name], t, area).reshape(len(ds), -1).any(axis=1)
                row["alarm_rate"][name] = float(alarm.mean())
                by_group: dict[str, list[int]] = {}
                for g, a in zip(ds.groups, alarm):
                    by_group.setdefault(f"{name}/{g}", [0, 0])
                    by_group[f"{name}/{g}"][0] += int(a)
                    by_group[f"{name}/{g}"][1] += 1
                row["alarms_by_group"].update(by_group)
            rows.append(row)
    return {"rows": rows, "positives": len(positives), "polyp_free": {n: len(d) for n, d in polyp_free.items()}}


def choose(rows: list[dict], max_alarm: float, binding: list[str], exclude_group: str | None = None) -> dict:
    """The rule: the most sensitive point whose alarm rate is <= max_alarm on every `binding` set
    (ties: higher Dice, then lower threshold); none meets it: the point with the fewest alarms.
    `exclude_group` leaves one polyp-free group out of the alarm rates."""
    def alarm(row: dict, name: str) -> float:
        if exclude_group is None:
            return row["alarm_rate"][name]
        counts = [v for g, v in row["alarms_by_group"].items() if g.startswith(f"{name}/") and g != exclude_group]
        return sum(a for a, _ in counts) / max(1, sum(n for _, n in counts))

    ok = [r for r in rows if all(alarm(r, n) <= max_alarm for n in binding)]
    if ok:
        return max(ok, key=lambda r: (r["sensitivity"], r["dice"], -r["threshold"]))
    return min(rows, key=lambda r: (max(alarm(r, n) for n in binding), -r["sensitivity"]))


def leave_one_group_out(rows: list[dict], max_alarm: float, binding: list[str]) -> dict:
    """The rule's alarm rate on each polyp-free group when the point is chosen without that group:
    what a new sequence should expect, not the rate on the sequences that chose it."""
    groups = sorted({g for g in rows[0]["alarms_by_group"] if any(g.startswith(f"{n}/") for n in binding)})
    alarms = frames = 0
    chosen = {}
    for g in groups:
        point = choose(rows, max_alarm, binding, exclude_group=g)
        a, n = point["alarms_by_group"][g]
        alarms, frames = alarms + a, frames + n
        chosen[g] = {"threshold": point["threshold"], "min_area": point["min_area"], "alarm_frames": a, "frames": n}
    return {"alarm_rate": alarms / max(1, frames), "frames": frames, "by_group": chosen}


def write_operating_point(model_dir: Path, point: dict, report: dict) -> None:
    """Set threshold and min_area in the checkpoint's config.json (the rest untouched) and keep the
    curve beside it (operating_point.json)."""
    path = Path(model_dir) / CONFIG_NAME
    checkpoint = json.loads(path.read_text())
    checkpoint["config"]["threshold"], checkpoint["config"]["min_area"] = point["threshold"], point["min_area"]
    write_text(path, json.dumps(checkpoint, indent=2) + "\n")
    # per-group alarm counts only for the sets that bind (their sequences): the crops' groups are
    # one per scored image, megabytes a checkpoint does not need
    binding = tuple(f"{name}/" for name in report.get("binding", []))
    rows = [{**r, "alarms_by_group": {g: v for g, v in r.get("alarms_by_group", {}).items() if g.startswith(binding)}}
            for r in report.get("rows", [])]
    write_text(Path(model_dir) / "operating_point.json", json.dumps({**report, "rows": rows}, indent=1))


def curve_table(rows: list[dict], free_names: list[str], chosen: dict | None = None, top: int | None = None) -> str:
    """Markdown: one row per grid point (sensitivity, small polyps, Dice, alarm rates), best first."""
    order = sorted(rows, key=lambda r: (max(r["alarm_rate"].values()) if r["alarm_rate"] else 0, -r["sensitivity"]))
    lines = ["| threshold | min area | polyps found | small polyps found | Dice | "
             + " | ".join(f"alarm frames: {n}" for n in free_names) + " |",
             "|---|---|---|---|---|" + "---|" * len(free_names)]
    for r in order[:top]:
        mark = " **(chosen)**" if chosen is not None and (r["threshold"], r["min_area"]) == (chosen["threshold"], chosen["min_area"]) else ""
        small = "-" if r["small_sensitivity"] is None else f"{100 * r['small_sensitivity']:.1f} %"
        lines.append(f"| {r['threshold']:.2f}{mark} | {r['min_area']:.3f} | {100 * r['sensitivity']:.1f} % | {small} | "
                     f"{r['dice']:.3f} | " + " | ".join(f"{100 * r['alarm_rate'][n]:.1f} %" for n in free_names) + " |")
    return "\n".join(lines) + "\n"
