"""Prompts from the data: what each training frame is known to show, in a few words.

The inpainter (`syndiff-train inpainter`) learns text conditioning from these prompts, so every
word is measured or recorded, none invented:

- size: the largest polyp's equivalent diameter (the diameter of a disc of its area) as a share of
  the frame side, in the prompt bank's size classes (`prompts.DEFAULT_SIZE_CLASSES`: diminutive
  0.05-0.11, small 0.10-0.20, large 0.18-0.38 of the side). The classes overlap; a polyp in an
  overlap takes the class whose range it is nearer the middle of, i.e. the cut is the middle of
  the overlap (0.105 and 0.19). `synth` draws its masks from the same ranges, so a "diminutive"
  prompt gets a mask of the size the model saw under that word.
- shape: measured on the largest polyp's mask. Solidity (area over the area of its convex hull)
  under `IRREGULAR_SOLIDITY` is "irregular" (lobes, notches, a stalk); otherwise an elongation
  (major over minor axis of the ellipse with the same second moments) of `ELONGATED_RATIO` or more
  is "elongated", else "round". A polyp under `MIN_SHAPE_PX` pixels at the mask's resolution is
  too coarse to tell: the word is left out. This is the outline in the image plane only: whether a
  polyp is flat, sessile or pedunculated (Paris) cannot be told from a mask, and no word says it.
  The cut-offs were chosen on the three training centres at 128 px, where they give 1 698 round,
  532 elongated and 91 irregular frames of 2 321 with a polyp of at least MIN_SHAPE_PX, and checked
  by eye on ten frames drawn at random for each word and for each side of both cut-offs: elongated
  ones are long ovals and bands, irregular ones lobed, crescent or clipped by the field of view.
- count: "several polyps" when the mask holds more than one polyp of at least `MIN_POLYP_SHARE`
  of the frame.
- neoplastic or not: from a source's `classes.csv` (frame, class: `neoplastic` or
  `non-neoplastic`; NeoPolyp has one). Where a source has none, or does not list the frame, the
  word is left out.
- centre: the recipe's name for the source (e.g. `kvasir`, `clinicdb`, `neopolyp`).

Not included: the light mode. NeoPolyp mixes white light with image-enhanced modes (FICE, BLI,
LCI), but no file records which frame is which; the mode is only on screen (e.g. a "FICE+6" box in
the processor's overlay). A colour-statistics guess could not be validated here, so no word is
derived for it.

`prompt_bank` writes the prompts a trained model knows as a prompt bank (the schema of the shipped
`prompts.json`), every combination of sizes, shapes, classes and centres once, so `synth` asks for
diminutive and small polyps as often as large ones, whatever their share of the data.
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import cv2
import numpy as np

from syndiff_stream.datasets import DatasetError

from .prompts import DEFAULT_SIZE_CLASSES

CLASSES_FILE = "classes.csv"
CLASS_WORDS = ("neoplastic", "non-neoplastic")
SHAPES = ("round", "elongated", "irregular")
IRREGULAR_SOLIDITY = 0.85
ELONGATED_RATIO = 1.8
MIN_SHAPE_PX = 40
MIN_POLYP_SHARE = 0.001  # components under 0.1 % of the frame are specks of the annotation, not polyps
LEAD = "colonoscopy"
EMPTY = "normal mucosa"


def size_cuts(size_classes: dict | None = None) -> list[tuple[str, float]]:
    """(name, upper bound of its diameter share) per class, smallest first; the last is unbounded.
    Where two ranges overlap the cut is the middle of the overlap."""
    classes = sorted((size_classes or DEFAULT_SIZE_CLASSES).items(), key=lambda kv: kv[1][0])
    cuts = [(name, (rng[1] + classes[i + 1][1][0]) / 2) for i, (name, rng) in enumerate(classes[:-1])]
    return cuts + [(classes[-1][0], math.inf)]


def size_class(diameter_share: float, size_classes: dict | None = None) -> str:
    """The size class of a polyp whose equivalent diameter is `diameter_share` of the frame side."""
    return next(name for name, upper in size_cuts(size_classes) if diameter_share < upper)


def polyps(mask: np.ndarray) -> list[np.ndarray]:
    """The mask's polyps (8-connected components of at least MIN_POLYP_SHARE of the frame), largest first."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= MIN_POLYP_SHARE * mask.size]
    keep.sort(key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    return [labels == i for i in keep]


def shape_measures(component: np.ndarray) -> tuple[float, float]:
    """(solidity, elongation) of one polyp's mask: area over convex-hull area, and the major over the
    minor axis of the ellipse with the same second moments."""
    ys, xs = np.nonzero(component)
    points = np.stack([xs, ys], 1).astype(np.int32)
    hull = cv2.convexHull(points)
    # pixel areas: the hull of the pixel centres misses half a pixel all round, so compare like with
    # like by filling the hull on the same grid
    filled = np.zeros(component.shape, np.uint8)
    cv2.fillConvexPoly(filled, hull, 1)
    solidity = float(component.sum() / max(1, filled.sum()))
    cov = np.cov(np.stack([xs, ys]).astype(np.float64)) + np.eye(2) / 12  # a pixel's own spread
    low, high = np.linalg.eigvalsh(cov)
    return solidity, float(math.sqrt(high / max(low, 1e-9)))


def shape_word(component: np.ndarray) -> str | None:
    """round, elongated or irregular (see the module's docstring); None when too small to tell."""
    if component.sum() < MIN_SHAPE_PX:
        return None
    solidity, elongation = shape_measures(component)
    if solidity < IRREGULAR_SOLIDITY:
        return "irregular"
    return "elongated" if elongation >= ELONGATED_RATIO else "round"


def compose(centre: str | None, size: str | None = None, shape: str | None = None, cls: str | None = None,
            several: bool = False) -> str:
    """The prompt: `colonoscopy, [several] <size> [shape] [class] polyp(s), <centre>`; `size` None
    is a frame without a polyp (`colonoscopy, normal mucosa, <centre>`)."""
    if size is None:
        middle = EMPTY
    else:
        words = (["several"] if several else []) + [size] + ([shape] if shape else []) + ([cls] if cls else [])
        middle = " ".join(words + ["polyps" if several else "polyp"])
    return ", ".join([LEAD, middle] + ([centre.lower()] if centre else []))


def describe(mask: np.ndarray, centre: str | None, cls: str | None = None, size_classes: dict | None = None) -> dict:
    """What the mask and the records say about one frame, and its prompt."""
    found = polyps(mask)
    if not found:
        return {"prompt": compose(centre), "size": None, "shape": None, "class": cls, "polyps": 0}
    largest = found[0]
    share = math.sqrt(4 * largest.sum() / math.pi) / math.sqrt(mask.size)
    size, shape = size_class(share, size_classes), shape_word(largest)
    return {"prompt": compose(centre, size, shape, cls, len(found) > 1), "size": size, "shape": shape,
            "class": cls, "polyps": len(found), "diameter_share": round(share, 4)}


def read_classes(root: str | Path) -> dict[str, str]:
    """stem -> neoplastic / non-neoplastic from `<root>/classes.csv` (frame,class,...); {} without one."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"frame", "class"} <= set(rows[0]):
        raise DatasetError(f"{path}: expected the columns frame,class")
    out = {}
    for row in rows:
        cls = row["class"].strip().lower()
        if cls not in CLASS_WORDS:
            raise DatasetError(f"{path}: frame {row['frame']}: class {row['class']!r}, expected one of "
                               f"{', '.join(CLASS_WORDS)}")
        out[row["frame"].strip()] = cls
    return out


def frame_prompts(ds, sources, size_classes: dict | None = None) -> list[dict]:
    """`describe` for every frame of an ArrayDataset whose stems are prefixed with the source names
    (`data.load_sources`); `sources`: the recipe's data entries (name, path)."""
    classes = {s.name: read_classes(s.path) for s in sources}
    out = []
    for stem, mask in zip(ds.stems, ds.masks):
        source, _, frame = stem.partition("/")
        out.append(describe(mask, source, classes.get(source, {}).get(frame), size_classes))
    return out


def all_prompts(centres: list[str], size_classes: dict | None = None) -> list[str]:
    """Every prompt `describe` can give for these centres: what the tokenizer's vocabulary must hold."""
    sizes = [name for name, _ in size_cuts(size_classes)]
    out = [compose(c) for c in centres]
    for c, size, shape, cls, several in itertools.product(centres, sizes, (None, *SHAPES), (None, *CLASS_WORDS),
                                                          (False, True)):
        out.append(compose(c, size, shape, cls, several))
    out.append("")  # the unconditional prompt (classifier-free guidance)
    return out


def prompt_bank(centres: list[str], with_classes: bool = True, size_classes: dict | None = None) -> dict:
    """A prompt bank in the shipped `prompts.json` schema with the prompts a trained inpainter knows:
    one polyp of every size, shape and class (or none; the class words only `with_classes`, when some
    source recorded them) at every centre, each with its size class so `synth` sizes its mask to
    match; the negative prompt is the empty one the model learnt as "no condition"
    (classifier-free guidance dropout)."""
    size_classes = dict(size_classes or DEFAULT_SIZE_CLASSES)
    sizes = [name for name, _ in size_cuts(size_classes)]
    classes = (None, *CLASS_WORDS) if with_classes else (None,)
    prompts = [{"text": compose(c, size, shape, cls), "size": size, "shape": shape, "class": cls, "centre": c}
               for c, size, shape, cls in itertools.product(centres, sizes, SHAPES, classes)]
    return {"about": "Prompt bank of a trained `syndiff-train inpainter` model: every prompt it was taught "
                     "(trainer/syndiff_trainer/frame_prompts.py), each size, shape, class and centre equally often. "
                     "`synth --weights` of this folder uses it when --prompts is not given.",
            "size_classes": {k: list(v) for k, v in size_classes.items()},
            "negative_prompts": [""], "prompts": prompts}
