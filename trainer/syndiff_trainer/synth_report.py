"""What a `synth` run made, measured (`syndiff-train synth-report`).

- The gate's pass rate, overall and per attribute of the prompt (size, shape, class, centre) and
  of the mask (an annotation re-placed, or a parametric shape).
- Prompt faithfulness: the size class asked for against the size of what the segmenter finds
  where the polyp was painted (its equivalent diameter over the frame side, in the same classes).
- Memorisation: each accepted polyp's distance to the nearest polyp of the reference frames (the
  generator's training data): 1 - the best normalised correlation of the two polyps' crops, over
  the 8 flips and quarter turns. A copy scores near 0. The same distance from the polyps of a
  control set (real polyps the generator never saw) to the reference says what "another real
  polyp" looks like, so a synthetic polyp closer than every control polyp is flagged.
- A picture sheet: per prompt, the real background frames beside the synthetic ones made on them,
  the painted region outlined (green: accepted, red: rejected).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np

from syndiff_stream.atomic import atomic_path
from syndiff_stream.datasets import find_pairs, read_image, read_mask
from syndiff_stream.preprocess import prepare_mask

from .frame_prompts import CLASS_WORDS, SHAPES, polyps, size_class
from .synthetic import MANIFEST, load_frame

CROP = 32  # memorisation crops: 32 x 32 RGB
HIGH_PASS = 1.5
TILE = 128


def prompt_attributes(record: dict) -> dict:
    """The attributes a sample was asked for: size class (the prompt's, else the planned mask's),
    shape, class, centre (inpaint prompts are `colonoscopy, <size> [shape] [class] polyp, <centre>`),
    and the mask's kind."""
    text = record.get("prompt") or ""
    parts = [p.strip() for p in text.split(",")]
    words = parts[1].split() if len(parts) > 1 else []
    mask = record.get("mask") or {}
    planned = size_class(mask["diameter_px"] / record["resolution"]) if "diameter_px" in mask else "any"
    attrs = {"size": record.get("size_class") or planned,
             "shape": next((w for w in words if w in SHAPES), "any"),
             "class": next((w for w in words if w in CLASS_WORDS), "any"),
             "centre": parts[2] if len(parts) > 2 else "any",
             "mask": mask.get("kind", "?")}
    return attrs


def new_polyp(record: dict, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(painted polyp, polyps the frame already had) of a sample, at its resolution: the parts of
    the label that lie wholly inside the planned mask's box (placement keeps a margin from the
    polyps already there, so a part that crosses the box's edge is one of them)."""
    label = read_mask(folder / record["mask_file"])
    inside = np.zeros(label.shape, bool)
    y0, x0, y1, x1 = record["mask"]["bbox"]
    inside[y0:y1, x0:x1] = True
    _, parts = cv2.connectedComponents(label.astype(np.uint8), connectivity=8)
    crossing = np.unique(parts[label & ~inside])
    new = label & inside & ~np.isin(parts, crossing)
    return new, label & ~new


def _read(folder: Path) -> list[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; give a folder written by `syndiff-train synth`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pass_rates(records: list[dict]) -> dict:
    """Accepted / tried, overall and per value of every attribute."""
    out = {"overall": {"tried": len(records), "accepted": sum(r["accepted"] for r in records)}}
    per: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        for key, value in prompt_attributes(r).items():
            per[key][value][0] += 1
            per[key][value][1] += int(r["accepted"])
    for key, values in per.items():
        out[key] = {v: {"tried": t, "accepted": a} for v, (t, a) in sorted(values.items())}
    for row in _rows(out):
        row["rate"] = round(row["accepted"] / max(1, row["tried"]), 4)
    return out


def _rows(rates: dict):
    yield rates["overall"]
    for key, values in rates.items():
        if key != "overall":
            yield from values.values()


def found_size(pred: np.ndarray, new: np.ndarray, existing: np.ndarray) -> float:
    """Equivalent diameter over the side of what was predicted on the painted polyp: the predicted
    components that touch the new mask, without the pixels next to a polyp the frame already had."""
    from .gate import near_existing

    pred = pred & ~near_existing(new, existing)
    n, labels = cv2.connectedComponents(pred.astype(np.uint8), connectivity=8)
    touching = set(np.unique(labels[new & pred])) - {0}
    area = int(np.isin(labels, list(touching)).sum()) if touching else 0
    return math.sqrt(4 * area / math.pi) / pred.shape[0]


def faithfulness(records: list[dict], folder: Path, gate_model, size_classes: dict, batch: int = 16) -> dict:
    """Requested size class against the class of what the gate's segmenter finds ("none" when it
    finds nothing there), over every sample whose image was kept (accepted and rejected)."""
    from .gate import QualityGate

    gate = QualityGate(gate_model, 0.0)
    kept = [r for r in records if r.get("image")]
    table: dict[str, Counter] = defaultdict(Counter)
    ratios = []
    for i in range(0, len(kept), batch):
        chunk = kept[i:i + batch]
        images = [read_image(folder / r["image"]) for r in chunk]
        preds, fovs = gate.predict(images)
        size = gate_model.config.image_size
        for r, pred, fov, image in zip(chunk, preds, fovs, images):
            new, existing = new_polyp(r, folder)
            new_s, old_s = prepare_mask(new, fov, size), prepare_mask(existing, fov, size)
            share = found_size(pred, new_s, old_s)
            asked = r.get("size_class") or size_class(r["mask"]["diameter_px"] / image.shape[0], size_classes)
            table[asked]["none" if share == 0 else size_class(share, size_classes)] += 1
            if share > 0:
                ratios.append(share / (r["mask"]["diameter_px"] / image.shape[0]))
    classes = sorted(size_classes, key=lambda k: size_classes[k][0])
    rows = {asked: {found: table[asked][found] for found in [*classes, "none"]} for asked in classes if asked in table}
    agree = sum(table[c][c] for c in classes)
    return {"requested_vs_found": rows, "samples": len(kept), "same_class": agree,
            "same_class_rate": round(agree / max(1, len(kept)), 4),
            "found_over_planned_diameter_median": round(float(np.median(ratios)), 3) if ratios else None}


def _crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The polyp's bounding square (10 % margin) at CROP px, its fine detail only (minus a blur of
    HIGH_PASS px: the smooth blob every polyp is would make any two look alike), outside the polyp
    zeroed, standardised: mean 0, norm 1."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min(), 4) * 0.55
    h, w = mask.shape
    y0, y1 = int(max(0, cy - half)), int(min(h, cy + half + 1))
    x0, x1 = int(max(0, cx - half)), int(min(w, cx + half + 1))
    crop = cv2.resize(image[y0:y1, x0:x1], (CROP, CROP), interpolation=cv2.INTER_AREA).astype(np.float32)
    inside = cv2.resize(mask[y0:y1, x0:x1].astype(np.uint8), (CROP, CROP), interpolation=cv2.INTER_NEAREST)
    crop = (crop - cv2.GaussianBlur(crop, (0, 0), HIGH_PASS)) * inside[..., None]
    crop -= crop.mean()
    return crop / max(float(np.linalg.norm(crop)), 1e-6)


def _dihedral(crop: np.ndarray) -> list[np.ndarray]:
    turns = [np.rot90(crop, k) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def polyp_crops(folders: list[str | Path], resolution: int, copies_every: int = 0):
    """Every polyp of the folders' annotated frames (each component), as the crops `_crop` makes:
    (crops, names, copies). `copies_every` n > 0: also every n-th polyp copied as a generator
    could copy it (flipped, turned a quarter, at 75 % of its size): what a copy scores."""
    crops, names, copies = [], [], []
    for folder in folders:
        for pair in find_pairs(folder):
            frame, mask = load_frame(pair.image, pair.mask, resolution)
            for k, component in enumerate(polyps(mask)):
                crop = _crop(frame, component)
                if crop is None:
                    continue
                crops.append(crop.ravel())
                names.append(f"{Path(folder).name}/{pair.stem}#{k}")
                if copies_every and len(crops) % copies_every == 0:
                    small = (round(resolution * 0.75),) * 2
                    turned = [cv2.resize(np.rot90(a, 1)[:, ::-1].copy(), small, interpolation=cv2.INTER_AREA)
                              for a in (frame, component.astype(np.uint8))]
                    copies.append((len(crops) - 1, _crop(turned[0], turned[1] > 0)))
    if not crops:
        raise ValueError(f"no annotated polyps in {', '.join(map(str, folders))}")
    return np.stack(crops), names, copies


def nearest(crops: list[np.ndarray], reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index of the nearest reference polyp) per crop: 1 - best correlation over 8 transforms."""
    best = np.full(len(crops), -np.inf)
    index = np.zeros(len(crops), int)
    for t in range(8):
        q = np.stack([_dihedral(c)[t].ravel() for c in crops])
        corr = q @ reference.T
        arg = corr.argmax(1)
        top = corr[np.arange(len(crops)), arg]
        better = top > best
        best[better], index[better] = top[better], arg[better]
    return 1 - best, index


def _quantiles(d: np.ndarray) -> dict:
    if len(d) == 0:
        return {"n": 0}
    return {"n": int(len(d)), "min": round(float(d.min()), 4), "p01": round(float(np.quantile(d, 0.01)), 4),
            "p05": round(float(np.quantile(d, 0.05)), 4), "median": round(float(np.median(d)), 4)}


def memorisation(records: list[dict], folder: Path, reference, control) -> dict:
    """Nearest reference polyp of every accepted sample's painted polyp; with the same distance for
    copies of reference polyps (what a copy scores) and for the control's polyps (what another
    real polyp scores)."""
    accepted = [r for r in records if r["accepted"]]
    crops, stems = [], []
    for r in accepted:
        crop = _crop(read_image(folder / r["image"]), new_polyp(r, folder)[0])
        if crop is not None:
            crops.append(crop)
            stems.append(r["stem"])
    ref, names, copies = reference
    dist, idx = nearest(crops, ref) if crops else (np.zeros(0), np.zeros(0, int))
    out = {"reference_polyps": len(names), "synthetic": _quantiles(dist),
           "closest": [{"stem": s, "distance": round(float(d), 4), "nearest": names[i]}
                       for d, s, i in sorted(zip(dist, stems, idx))[:8]]}
    if copies:
        cdist, cidx = nearest([c for _, c in copies], ref)
        out["copies_of_reference"] = {**_quantiles(cdist), "found_their_original": int(
            sum(i == j for (j, _), i in zip(copies, cidx)))}
    if control is not None:
        kdist, _ = nearest([c.reshape(CROP, CROP, 3) for c in control[0]], ref)
        out["control"] = _quantiles(kdist)
        out["closer_than_every_control_polyp"] = int((dist < kdist.min()).sum())
        out["closer_than_control_p01"] = int((dist < np.quantile(kdist, 0.01)).sum())
    return out


def picture_sheet(records: list[dict], folder: Path, path: Path, per_prompt: int = 3, prompts: int = 12) -> Path:
    """Rows of (real background, synthetic on it) pairs, one row per prompt, accepted first."""
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (not r["accepted"], r["index"])):
        if r.get("image"):
            key = r.get("prompt") or f"{r['method']}, {size_class(r['mask']['diameter_px'] / r['resolution'])} polyp"
            by_prompt[key].append(r)
    chosen = sorted(by_prompt.items(), key=lambda kv: (-sum(r["accepted"] for r in kv[1]), kv[0]))[:prompts]
    chosen.sort(key=lambda kv: kv[0])
    rows = []
    for prompt, recs in chosen:
        tiles = []
        for r in recs[:per_prompt]:
            image = read_image(folder / r["image"])
            background, _ = load_frame(Path(r["source_frame"]), None, image.shape[0])
            new = new_polyp(r, folder)[0].astype(np.uint8)
            shown = image.copy()
            contours, _ = cv2.findContours(new, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(shown, contours, -1, (0, 255, 0) if r["accepted"] else (255, 0, 0), 1)
            tiles += [cv2.resize(t, (TILE, TILE), interpolation=cv2.INTER_AREA) for t in (background, shown)]
        tiles += [np.zeros((TILE, TILE, 3), np.uint8)] * (2 * per_prompt - len(tiles))
        caption = np.zeros((14, TILE * 2 * per_prompt, 3), np.uint8)
        cv2.putText(caption, prompt[:110], (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        rows += [caption, np.hstack(tiles)]
    if not rows:
        raise ValueError(f"{folder}: no sample images to show (run synth with --keep-rejected)")
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    return path


def synth_report(folder: str | Path, reference: list[str], control: list[str], gate_model, size_classes: dict,
                 sheet: Path | None = None) -> dict:
    folder = Path(folder)
    records = _read(folder)
    if not records:
        raise ValueError(f"{folder}: the manifest lists no samples")
    resolution = records[0]["resolution"]
    report = {"folder": str(folder), "method": records[0]["method"], "resolution": resolution,
              "pass_rate": pass_rates(records),
              "faithfulness": faithfulness(records, folder, gate_model, size_classes)}
    if reference:
        ref = polyp_crops(reference, resolution, copies_every=10)
        ctl = polyp_crops(control, resolution) if control else None
        report["memorisation"] = memorisation(records, folder, ref, ctl)
    if sheet is not None:
        report["sheet"] = str(picture_sheet(records, folder, sheet))
    return report
