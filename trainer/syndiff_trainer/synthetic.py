"""Synthetic training data: plan -> generate -> gate -> write, and loading it back for training.

`syndiff-train synth` wires four stages, each a small object:
  Planner     index -> Sample (frame, existing polyps, new mask, prompt), all drawn from a seed
              derived from (seed, index), so the same seed gives the same sample, resumed or not
  generator   Inpainter (diffusers, text-guided) or CopyPaster (real polyps, blended): the baseline
  QualityGate IoU(intended, single-step prediction) >= threshold (DiffAug)
  Writer      images/ + masks/ (the Kvasir layout, accepted samples only), rejected/ for audit,
              manifest.jsonl with one record per sample, appended only after its files exist
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from syndiff_stream.backends import pick_device
from syndiff_stream.datasets import (
    IMAGE_DIR_NAMES,
    DatasetError,
    Pair,
    find_pairs,
    pair_folders,
    read_image,
    read_mask,
)
from syndiff_stream.preprocess import crop_resize, find_field_of_view, prepare_mask

from .data import ArrayDataset, load_pairs
from .placement import (
    affine_patch,
    allowed_region,
    blend,
    copy_paste,
    equivalent_diameter,
    feather_alpha,
    parametric_shape,
    paste_mask,
    place,
)
from .prompts import Prompt, PromptBank
from .train import _progress

MANIFEST = "manifest.jsonl"
SETTINGS = "synth.json"
METHODS = ("inpaint", "copy-paste")
MASK_SOURCES = ("mixed", "real", "parametric")
# Settings that define what sample i is: a resumed run must use the same ones.
SAMPLE_DEFINING = ("method", "data", "normal_frames", "prompt_bank_sha256", "mask_source", "resolution", "steps",
                   "guidance_scale", "strength", "seed", "blend", "fp16", "weights", "gate", "gate_model",
                   "gate_threshold", "paint_margin")


@dataclass
class SynthConfig:
    data: str  # annotated frames: base frames (without --normal-frames) and real mask shapes
    out: str
    count: int  # accepted samples wanted
    method: str = "inpaint"
    weights: str | None = None  # local diffusers inpainting folder (method inpaint)
    prompts: str | None = None  # prompt bank file; None: the weights folder's prompts.json, else the shipped bank
    normal_frames: str | None = None  # folder of polyp-free frames
    mask_source: str = "mixed"
    resolution: int | None = None  # None: the pipeline's native size (copy-paste: 512)
    steps: int = 30
    guidance_scale: float = 7.5
    strength: float = 0.99
    blend: str = "seamless"  # copy-paste blending: seamless (Poisson) or feather
    # inpaint: the region painted is the polyp's mask grown by this fraction of the side (the label
    # stays the mask); None: what the weights were trained with (an `inpainter` model's recipe
    # mask.dilate), else 0
    paint_margin: float | None = None
    gate: bool = True
    gate_model: str | None = None  # Segmenter checkpoint; None: the shipped default
    gate_threshold: float = 0.7
    max_attempts: int | None = None  # None: 4 x count
    seed: int = 0
    batch_size: int = 1
    device: str = "auto"
    fp16: bool = False
    cpu_offload: bool = False
    attention_slicing: bool = False
    keep_rejected: bool = True
    progress: bool = True


@dataclass
class Sample:
    """One planned sample: inputs to the generator and everything the manifest records."""

    index: int
    stem: str
    frame: np.ndarray  # (R, R, 3) uint8, field-of-view crop of the source frame
    existing: np.ndarray  # (R, R) bool: polyps the frame already has (kept in the label)
    new_mask: np.ndarray  # (R, R) bool: where the synthetic polyp goes
    prompt: Prompt | None
    negative_prompt: str | None
    seed: int
    patch: np.ndarray | None = None  # copy-paste: the donor polyp pixels, transformed like new_mask
    at: tuple[int, int] = (0, 0)
    shape: np.ndarray | None = None
    record: dict = field(default_factory=dict)

    @property
    def label(self) -> np.ndarray:
        return self.existing | self.new_mask


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def load_frame(image_path: Path, mask_path: Path | None, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame cropped to its field of view and resized, as the segmenter will see it; mask likewise."""
    image = read_image(image_path)
    fov = find_field_of_view(image)
    frame = crop_resize(image, fov, resolution)
    if mask_path is None:
        return frame, np.zeros(frame.shape[:2], bool)
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise DatasetError(f"mask {mask_path} does not match its image {image_path} in size")
    return frame, prepare_mask(mask, fov, resolution)


def _normal_frames(folder: str | Path) -> list[Pair]:
    folder = Path(folder)
    for name in IMAGE_DIR_NAMES:
        if (folder / name).is_dir():
            folder = folder / name
            break
    return pair_folders(folder, None)


class Planner:
    """index -> Sample. Every random choice comes from the sample's own seed."""

    def __init__(self, cfg: SynthConfig, bank: PromptBank, resolution: int):
        self.cfg, self.bank, self.res = cfg, bank, resolution
        self.annotated = find_pairs(cfg.data)
        self.normal = _normal_frames(cfg.normal_frames) if cfg.normal_frames else []
        self.margin = max(1, round(0.02 * resolution))
        sizes = list(bank.size_classes.values())
        self.any_size = (min(s[0] for s in sizes), max(s[1] for s in sizes))

    def plan(self, index: int) -> Sample:
        cfg = self.cfg
        seed = sample_seed(cfg.seed, index)
        rng = np.random.default_rng(seed)
        prompt, negative = self.bank.sample(rng) if cfg.method == "inpaint" else (None, None)
        lo, hi = self.bank.diameter_range(prompt) if prompt else self.any_size
        for _ in range(8):  # a frame full of polyp leaves no room: draw another frame
            base = self.normal[rng.integers(len(self.normal))] if self.normal else \
                self.annotated[rng.integers(len(self.annotated))]
            frame, existing = load_frame(base.image, base.mask, self.res)
            diameter = math.exp(rng.uniform(math.log(lo), math.log(hi))) * self.res
            use_real = cfg.method == "copy-paste" or cfg.mask_source == "real" or \
                (cfg.mask_source == "mixed" and rng.random() < 0.5)
            patch, donor = None, None
            if use_real:
                donor = self.annotated[rng.integers(len(self.annotated))]
                donor_img, donor_mask = load_frame(donor.image, donor.mask, self.res)
                shape, patch, params = affine_patch(donor_mask, rng, diameter,
                                                    donor_img if cfg.method == "copy-paste" else None)
                params["donor_stem"] = donor.stem
            else:
                shape, params = parametric_shape(rng, diameter)
            allowed = allowed_region(frame, existing, self.margin)
            at = place(shape, allowed, rng)
            while at is None and shape.shape[0] > 2 and shape.shape[1] > 2:  # too big for the free room
                size = (max(1, round(shape.shape[1] * 0.7)), max(1, round(shape.shape[0] * 0.7)))
                shape = cv2.resize(shape.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
                patch = cv2.resize(patch, size, interpolation=cv2.INTER_AREA) if patch is not None else None
                at = place(shape, allowed, rng)
            if at is None or not shape.any():
                continue
            new_mask = paste_mask(shape, at, existing.shape)
            params.update(bbox=[at[0], at[1], at[0] + shape.shape[0], at[1] + shape.shape[1]],
                          area_px=int(shape.sum()), diameter_px=round(equivalent_diameter(shape), 2))
            stem = f"syn-{cfg.method}-s{cfg.seed}-{index:06d}"
            record = {
                "index": index, "stem": stem, "method": cfg.method, "seed": cfg.seed, "sample_seed": seed,
                "source_frame": str(base.image), "source_stem": base.stem,
                "source_kind": "normal" if self.normal else "annotated",
                "sources": sorted({base.stem} | ({donor.stem} if donor else set())),
                "prompt": prompt.text if prompt else None, "negative_prompt": negative,
                "paris": prompt.paris if prompt else None, "size_class": prompt.size if prompt else None,
                "guidance_scale": cfg.guidance_scale if cfg.method == "inpaint" else None,
                "steps": cfg.steps if cfg.method == "inpaint" else None,
                "strength": cfg.strength if cfg.method == "inpaint" else None,
                "paint_margin": cfg.paint_margin if cfg.method == "inpaint" else None,
                "blend": cfg.blend if cfg.method == "copy-paste" else None,
                "resolution": self.res, "mask": params, "existing_polyp_px": int(existing.sum()),
            }
            return Sample(index, stem, frame, existing, new_mask, prompt, negative, seed, patch, at, shape, record)
        raise DatasetError(f"sample {index}: no polyp-free room inside the field of view in 8 frames drawn")


class CopyPaster:
    """Baseline generator: a real polyp from another frame, affinely re-shaped and blended in."""

    def __init__(self, method: str = "seamless"):
        self.method = method

    def __call__(self, samples: list[Sample]) -> list[np.ndarray]:
        return [copy_paste(s.frame, s.patch, s.shape, s.at, self.method) for s in samples]


class DiffusionGenerator:
    """Text-guided inpainting; pixels outside the painted region stay the real frame's (feathered seam).

    The painted region is the polyp's mask grown by `margin` (a fraction of the side) and kept off
    the frame's own polyps: a model trained on masks grown around each polyp (`syndiff-train
    inpainter`, mask.dilate) learnt that a mask holds a polyp and a rim of mucosa; asked to paint an
    ungrown mask it paints a polyp smaller than the label, or none."""

    def __init__(self, inpainter, margin: float = 0.0):
        self.inpainter, self.margin = inpainter, margin

    def region(self, sample: Sample) -> np.ndarray:
        r = round(self.margin * sample.new_mask.shape[0])
        if r <= 0:
            return sample.new_mask
        grown = cv2.dilate(sample.new_mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)).astype(bool)
        return sample.new_mask | (grown & ~sample.existing)  # square, as the trainer's max-pool grows it

    def __call__(self, samples: list[Sample]) -> list[np.ndarray]:
        regions = [self.region(s) for s in samples]
        out = self.inpainter([s.frame for s in samples], regions,
                             [s.prompt.text for s in samples], [s.negative_prompt for s in samples],
                             [s.seed for s in samples])
        feather = max(1.0, samples[0].frame.shape[0] / 256)
        return [blend(s.frame, img, feather_alpha(r, feather)) for s, r, img in zip(samples, regions, out)]


def trained_paint_margin(weights: str | Path | None) -> float:
    """The mask growth an `inpainter` model was trained with (its recipe's mask.dilate); 0 for other
    weights (SDXL inpainting is trained on arbitrary masks)."""
    from .inpainter import is_inpainter_run, load_inpainter_recipe
    from .recipe import RECIPE_NAME

    if not weights or not is_inpainter_run(weights):
        return 0.0
    return load_inpainter_recipe(Path(weights) / RECIPE_NAME).mask.dilate


class Manifest:
    """Append-only JSON lines; a line is written with one system call after the sample's files exist."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # torn last line from a crash: drop it, the sample is redone
            raw = raw[:raw.rfind(b"\n") + 1]
            self.path.write_bytes(raw)
        return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]

    def append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_png(path: Path, rgb_or_mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb_or_mask.dtype == bool:
        data = rgb_or_mask.astype(np.uint8) * 255
    else:
        data = cv2.cvtColor(rgb_or_mask, cv2.COLOR_RGB2BGR)
    tmp = path.with_name(path.stem + ".tmp.png")
    if not cv2.imwrite(str(tmp), data):
        raise OSError(f"cannot write {tmp}")
    tmp.replace(path)


def _settings(cfg: SynthConfig, bank_file: Path, resolution: int) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k in SAMPLE_DEFINING}
    settings.update(resolution=resolution, prompt_bank_sha256=hashlib.sha256(bank_file.read_bytes()).hexdigest(),
                    data=str(Path(cfg.data).resolve()),
                    normal_frames=str(Path(cfg.normal_frames).resolve()) if cfg.normal_frames else None,
                    weights=str(Path(cfg.weights).resolve()) if cfg.weights else None,
                    gate_model=str(Path(cfg.gate_model).resolve()) if cfg.gate_model else None)
    return settings


def _check_resume(out: Path, settings: dict) -> None:
    path = out / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in SAMPLE_DEFINING if old.get(k) != settings.get(k))
        if changed:
            raise SystemExit(f"{out} was written with different settings ({', '.join(changed)}); "
                             "use a new --out folder or the same settings to resume")
    else:
        path.write_text(json.dumps(settings, indent=1) + "\n")


def prompt_bank_file(cfg: SynthConfig) -> Path:
    """--prompts; else the weights folder's own prompts.json where it has one (a model trained by
    `syndiff-train inpainter` ships the prompts it was taught: the shipped bank's words are unknown
    to it); else the shipped bank."""
    if cfg.prompts:
        return Path(cfg.prompts)
    own = Path(cfg.weights) / "prompts.json" if cfg.method == "inpaint" and cfg.weights else None
    return own if own is not None and own.is_file() else Path(__file__).with_name("prompts.json")


def run_synth(cfg: SynthConfig, generator: Callable[[list[Sample]], list[np.ndarray]] | None = None,
              gate=None) -> dict:
    """Generate until `count` samples are accepted (or `max_attempts` tried); resumes from the manifest.

    `generator` and `gate` default to what cfg names; tests and callers may pass their own."""
    if cfg.method not in METHODS:
        raise SystemExit(f"unknown method {cfg.method!r}: choose {' or '.join(METHODS)}")
    if cfg.mask_source not in MASK_SOURCES:
        raise SystemExit(f"unknown mask source {cfg.mask_source!r}: choose {', '.join(MASK_SOURCES)}")
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    if cfg.fp16 and not device.startswith("cuda"):
        raise SystemExit("--fp16 needs a CUDA device (half precision inpainting is not supported on CPU)")
    bank_file = prompt_bank_file(cfg)
    bank = PromptBank.load(bank_file)
    resolution = cfg.resolution
    if generator is None and cfg.method == "inpaint":
        from .inpaint import Inpainter, load_inpaint_pipeline, native_resolution

        if not cfg.weights:
            raise SystemExit("synth --method inpaint needs --weights DIR (a local diffusers inpainting folder)")
        pipe = load_inpaint_pipeline(cfg.weights, device, cfg.fp16, cfg.cpu_offload, cfg.attention_slicing)
        resolution = resolution or native_resolution(pipe)
        multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if resolution % multiple:
            raise SystemExit(f"--resolution must be a multiple of {multiple}, got {resolution}")
        if cfg.paint_margin is None:
            cfg = replace(cfg, paint_margin=trained_paint_margin(cfg.weights))
        generator = DiffusionGenerator(Inpainter(pipe, cfg.steps, cfg.guidance_scale, cfg.strength), cfg.paint_margin)
    elif generator is None:
        generator = CopyPaster(cfg.blend)
    resolution = resolution or 512
    if gate is None and cfg.gate:
        from .gate import QualityGate, load_gate_model

        gate = QualityGate(load_gate_model(cfg.gate_model), cfg.gate_threshold, device)

    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, _settings(cfg, bank_file, resolution))
    manifest = Manifest(out / MANIFEST)
    records = manifest.read()
    done = {r["index"] for r in records}
    accepted = sum(r["accepted"] for r in records)
    tried = len(records)
    max_attempts = cfg.max_attempts or 4 * cfg.count
    planner = Planner(cfg, bank, resolution)
    indices = (i for i in itertools.count() if i not in done)
    with _progress(cfg.progress) as bar:
        task = bar.add_task(f"synth ({cfg.method})", total=cfg.count, completed=min(accepted, cfg.count), info="")
        while accepted < cfg.count and tried < max_attempts:
            n = min(cfg.batch_size, max_attempts - tried)
            samples = [planner.plan(next(indices)) for _ in range(n)]
            images = generator(samples)
            scores = gate.score(images, [s.new_mask for s in samples], [s.existing for s in samples]) if gate else None
            for i, (sample, image) in enumerate(zip(samples, images)):
                if accepted >= cfg.count:
                    break  # the rest of the batch is regenerated identically if a later run asks for more
                ok = scores[i].accepted if scores else True
                rel = Path("." if ok else "rejected")
                written = ok or cfg.keep_rejected
                if written:
                    _write_png(out / rel / "images" / f"{sample.stem}.png", image)
                    _write_png(out / rel / "masks" / f"{sample.stem}.png", sample.label)
                record = {**sample.record, "accepted": ok,
                          "gate_iou": round(scores[i].iou, 4) if scores else None,
                          "gate_iou_label": round(scores[i].iou_label, 4) if scores else None,
                          "gate_threshold": cfg.gate_threshold if scores else None,
                          "image": str(rel / "images" / f"{sample.stem}.png") if written else None,
                          "mask_file": str(rel / "masks" / f"{sample.stem}.png") if written else None,
                          "time": round(time.time(), 1)}
                manifest.append(record)
                accepted += ok
                tried += 1
            rate = accepted / max(1, tried)
            bar.update(task, completed=min(accepted, cfg.count), info=f"{tried} tried, acceptance {rate:.0%}")
    summary = {"accepted": accepted, "tried": tried, "acceptance_rate": round(accepted / max(1, tried), 4),
               "out": str(out), "complete": accepted >= cfg.count}
    if not summary["complete"]:
        print(f"stopped after {tried} attempts (--max-attempts) with {accepted}/{cfg.count} accepted")
    return summary


# ---- training side ---------------------------------------------------------------------------

def _accepted(folder: Path) -> list[dict]:
    records = Manifest(folder / MANIFEST).read()
    return sorted((r for r in records if r["accepted"]), key=lambda r: r["index"])


def synthetic_count(count: int | None, ratio: float | None, n_real: int) -> int | None:
    """Mix by count or by ratio to the real training images (the papers: ~0.2 SynDiff, 3 DiffAug)."""
    if count is not None and ratio is not None:
        raise ValueError("give --synthetic-count or --synthetic-ratio, not both")
    if ratio is not None:
        if ratio < 0:
            raise ValueError(f"--synthetic-ratio must be >= 0, got {ratio}")
        return round(ratio * n_real)
    return count


def load_synthetic(folder: str | Path, count: int | None, size: int, seed: int,
                   exclude: Iterable[str] = ()) -> ArrayDataset:
    """Accepted synthetic samples at model resolution, `count` of them chosen by `seed` (None: all).

    `exclude`: real stems (e.g. the validation split) whose frames or polyps must not reach
    training through a synthetic sample. Folders without a manifest (any image/mask dataset,
    e.g. augmentations made elsewhere) are used whole."""
    folder = Path(folder)
    exclude = set(exclude)
    if (folder / MANIFEST).is_file():
        records = [r for r in _accepted(folder) if not exclude & set(r.get("sources", []))]
        pairs = [Pair(folder / r["image"], folder / r["mask_file"]) for r in records]
    else:
        pairs = find_pairs(folder)
    if count is not None and count > len(pairs):
        raise DatasetError(f"{folder}: {count} synthetic samples asked for, {len(pairs)} accepted "
                           f"{'and not excluded ' if exclude else ''}available; run `syndiff-train synth` for more")
    if count is not None:
        pick = np.random.default_rng(seed).permutation(len(pairs))[:count]
        pairs = [pairs[i] for i in sorted(pick)]
    if not pairs:
        return ArrayDataset(np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), bool), [])
    return load_pairs(pairs, size, progress=False)


def synthetic_view(folder: str | Path, dest: str | Path, exclude: Iterable[str]) -> Path:
    """A manifest-only folder listing the accepted samples of `folder` not built from `exclude` stems:
    lets k-fold runs use one synthetic set without leaking a validation fold into training."""
    folder, dest = Path(folder).resolve(), Path(dest)
    exclude = set(exclude)
    dest.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**r, "image": str(folder / r["image"]), "mask_file": str(folder / r["mask_file"])})
             for r in _accepted(folder) if not exclude & set(r.get("sources", []))]
    tmp = dest / (MANIFEST + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(dest / MANIFEST)
    return dest
