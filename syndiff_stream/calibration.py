"""Calibration profiles: what one scope at one site needs beyond the model to be segmented well.

A profile (JSON, or YAML when PyYAML is installed; versioned by `version`) holds
  fov        the field of view: `auto` (found on every frame) or `fixed` (a box for one frame size,
             measured once: no per-frame detection, no jitter at dark frames)
  threshold  the decision threshold on the polyp probability
  smoothing  temporal smoothing (EMA, hysteresis below the threshold, minimum area), or off
  color      per-channel gain/offset that maps this scope's colours onto the training data's
  int8       the calibration set manifest (files + SHA-256) an INT8 engine was calibrated on

`calibrate_profile` measures all of it on a site's frames; with true masks it picks threshold,
smoothing and colour correction by Dice, penalising flicker beyond the true masks' own motion.
The format is documented in calibration/README.md; calibration/default.json is the default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .engine import Prepared, Preprocessor
from .frames import Frame
from .metrics import dice
from .preprocess import FOV_THRESHOLD, FieldOfView, crop_resize, find_field_of_view, prepare, to_source
from .gating import GateConfig
from .smoothing import SmoothingConfig, evaluate_smoothing

PROFILE_FORMAT = "syndiff-stream/calibration-profile"
PROFILE_VERSION = 1
# Per-channel RGB mean and std inside the field of view of Kvasir-SEG train (220 of its 880 images,
# 64-pixel crops, pixels brighter than the FOV threshold): the colours the model was trained on.
REFERENCE_MEAN = (167.3, 96.5, 69.8)
REFERENCE_STD = (58.2, 47.2, 42.8)
GAIN_LIMITS = (0.5, 2.0)  # a larger correction means a wrong white balance, not a scope difference
FOV_AGREEMENT = 0.02  # boxes within 2% of the frame size count as one fixed field of view
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.2, 0.81, 0.05))
SMOOTHING_GRID = dict(alpha=(1.0, 0.8, 0.6, 0.4), hysteresis=(0.0, 0.1, 0.2), min_area=(0.0, 0.002, 0.005))


class ProfileError(ValueError):
    """A profile that cannot be read or does not fit the input: one line naming the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FovSpec(_Strict):
    mode: Literal["auto", "fixed"] = "auto"
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in source pixels, half-open
    frame_size: tuple[int, int] | None = None  # (height, width) of the frames the box belongs to

    @model_validator(mode="after")
    def _box_fits(self):
        if self.mode == "fixed":
            if self.box is None or self.frame_size is None:
                raise ValueError("a fixed field of view needs box and frame_size")
            x0, y0, x1, y1 = self.box
            h, w = self.frame_size
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ValueError(f"box {list(self.box)} does not fit a {h}x{w} frame")
        return self

    def check_frame_size(self, height: int, width: int) -> None:
        if self.mode == "fixed" and (height, width) != tuple(self.frame_size):
            h, w = self.frame_size
            raise ProfileError(f"the profile's field of view is for {w}x{h} frames, the input is {width}x{height}: "
                               "calibrate this scope (syndiff-stream calibrate) or use fov mode auto")

    def field_of_view(self, image: np.ndarray) -> FieldOfView:
        if self.mode == "auto":
            return find_field_of_view(image)
        self.check_frame_size(*image.shape[:2])
        return FieldOfView(*self.box)


class SmoothingSpec(_Strict):
    """SmoothingConfig without `high`, which is the profile's threshold."""

    enabled: bool = True
    alpha: float = Field(0.6, gt=0, le=1)
    hysteresis: float = Field(0.0, ge=0, le=1)  # low = threshold - hysteresis
    min_area: float = Field(0.002, ge=0, lt=1)
    cut_threshold: float = Field(0.15, gt=0)
    motion: bool = True  # warp the memory along the optical flow
    mismatch: float = Field(0.1, gt=0, le=1)  # grey difference after warping that forgets a pixel
    support: bool = True  # show a component only where the current frame's prediction touches it

    def config(self, threshold: float) -> SmoothingConfig:
        if not self.enabled:
            return SmoothingConfig.off(threshold, self.min_area)
        return SmoothingConfig(alpha=self.alpha, high=threshold, low=max(threshold - self.hysteresis, 0.0),
                               min_area=self.min_area, cut_threshold=self.cut_threshold, motion=self.motion,
                               mismatch=self.mismatch, support=self.support)


class GatingSpec(_Strict):
    """Alarm gating (`gating.GateConfig`): report a polyp from its `persist`-th consecutive frame,
    keep it `hold` frames after it vanishes."""

    persist: int = Field(GateConfig.persist, ge=1)
    hold: int = Field(GateConfig.hold, ge=0)

    def config(self) -> GateConfig:
        return GateConfig(persist=self.persist, hold=self.hold)


class ColorSpec(_Strict):
    """out = clip(gain * in + offset) per RGB channel, before the model; overlays keep the original."""

    method: Literal["none", "gain_offset"] = "none"
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @model_validator(mode="after")
    def _gains_in_range(self):
        if any(not GAIN_LIMITS[0] <= g <= GAIN_LIMITS[1] for g in self.gain):
            raise ValueError(f"gains {list(self.gain)} outside {list(GAIN_LIMITS)}")
        return self

    def apply(self, image: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return image
        levels = np.arange(256, dtype=np.float32)[:, None]
        lut = np.clip(levels * np.float32(self.gain) + np.float32(self.offset), 0, 255).round().astype(np.uint8)
        return cv2.LUT(image, lut[:, None, :])  # a 3-channel table maps each channel on its own


class CalibrationFrame(_Strict):
    file: str  # relative to the profile's folder when not absolute
    index: int | None = None  # frame number for a video; None for an image file
    sha256: str


class Int8Manifest(_Strict):
    frames: list[CalibrationFrame] = Field(min_length=1)


class Profile(_Strict):
    format: Literal["syndiff-stream/calibration-profile"] = PROFILE_FORMAT
    version: int = PROFILE_VERSION
    name: str = "default"
    scope: str = ""  # endoscope / video processor model
    site: str = ""
    fov: FovSpec = FovSpec()
    threshold: float = Field(0.5, gt=0, lt=1)
    smoothing: SmoothingSpec = SmoothingSpec()
    gating: GatingSpec = GatingSpec()
    color: ColorSpec = ColorSpec()
    int8: Int8Manifest | None = None
    calibrated: dict = Field(default_factory=dict)  # provenance: when, on what, the scores measured

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data):
        if isinstance(data, dict) and data.get("version", PROFILE_VERSION) != PROFILE_VERSION:
            raise ValueError(f"profile version {data.get('version')!r}; this syndiff-stream reads version {PROFILE_VERSION}")
        return data

    def smoothing_config(self, smooth: bool = True) -> SmoothingConfig:
        return self.smoothing.config(self.threshold) if smooth else SmoothingConfig.off(self.threshold, self.smoothing.min_area)

    @classmethod
    def for_model(cls, config) -> "Profile":
        """The default profile at a checkpoint's operating point (threshold, minimum area)."""
        return cls(threshold=config.threshold, smoothing=SmoothingSpec(min_area=config.min_area) if config.min_area else SmoothingSpec())


# ---- files --------------------------------------------------------------------------------------

def _yaml():
    try:
        import yaml
    except ImportError:
        raise ProfileError("YAML profiles need PyYAML: pip install pyyaml (or use a .json profile)") from None
    return yaml


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; any problem is one ProfileError line naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile {path} does not exist")
    text = path.read_text()
    try:
        data = _yaml().safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except ProfileError:
        raise
    except Exception as exc:  # json and yaml raise their own types
        raise ProfileError(f"profile {path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'} "
                           f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"profile {path}: not a calibration profile (needs \"format\": \"{PROFILE_FORMAT}\")")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "profile"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ProfileError(f"profile {path}: {where}: {err['msg']}{more}") from None


def save_profile(profile: Profile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = profile.model_dump(mode="json")
    text = _yaml().safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2) + "\n"
    path.write_text(text)
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- at run time --------------------------------------------------------------------------------

class ProfilePreprocessor(Preprocessor):
    """The pipeline's preprocess stage with a profile: its field of view and colour correction.

    On the CUDA path the device crops from the frame itself, so there the corrected frame is
    passed on (and drawn); on the CPU path only the model input is corrected."""

    def __init__(self, size: int, profile: Profile, on_device: bool = False):
        super().__init__(size, on_device)
        self.profile = profile

    def __call__(self, frame: Frame) -> Prepared:
        fov = self.profile.fov.field_of_view(frame.image)
        image = self.profile.color.apply(frame.image)
        if self.on_device:
            return Prepared(dataclasses.replace(frame, image=image), fov)
        return Prepared(frame, fov, prepare(image, self.size, fov)[0])


def check_source(profile: Profile, source) -> None:
    """Fail before the first frame when the source's declared frame size contradicts the profile."""
    stream = getattr(source, "stream", None)
    h, w = getattr(stream, "height", 0) or 0, getattr(stream, "width", 0) or 0
    if h and w:
        profile.fov.check_frame_size(h, w)


# ---- calibration --------------------------------------------------------------------------------

def _frame_files(folder: Path) -> list[Path]:
    from .datasets import IMAGE_SUFFIXES

    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_frames(spec: str | Path, masks: str | Path | None = None, limit: int | None = None
                ) -> tuple[list[Frame], list[CalibrationFrame]]:
    """Frames of a folder (images, or a dataset layout with masks) or a video, with their manifest
    entries. `masks`: a folder of masks matching image stems, or for a video named by frame number
    (e.g. 000120.png). `limit` keeps that many frames, evenly spaced."""
    from .datasets import DatasetError, find_pairs, pair_folders, read_image, read_mask
    from .sources import AVSource, SourceError

    spec = Path(spec)
    if not spec.exists():
        raise ProfileError(f"--frames {spec}: no such file or folder")
    if spec.is_dir():
        try:
            pairs = pair_folders(spec, Path(masks), skip_unpaired=True) if masks else None
            if pairs is None:
                try:
                    pairs = find_pairs(spec, skip_unpaired=True)
                except DatasetError:
                    pairs = pair_folders(spec, None)
        except DatasetError as exc:
            raise ProfileError(str(exc)) from None
        keep = _spaced(len(pairs), limit)
        frames = [Frame(read_image(pairs[i].image), spec.name, k, None,
                        truth=read_mask(pairs[i].mask) if pairs[i].mask else None) for k, i in enumerate(keep)]
        return frames, [CalibrationFrame(file=str(pairs[i].image.resolve()), sha256=sha256_file(pairs[i].image)) for i in keep]
    truth = {}
    if masks:
        for p in _frame_files(Path(masks)):
            digits = re.findall(r"\d+", p.stem)
            if digits:
                truth[int(digits[-1])] = p
        if not truth:
            raise ProfileError(f"--masks {masks}: no mask images named by frame number (e.g. 000120.png)")
    try:
        source = AVSource(str(spec))
        # Keep only the frames needed (a procedure is tens of thousands of frames).
        wanted = set(truth) if masks else set(_spaced(len(source), limit)) if len(source) else None
        decoded = [f for f in source if wanted is None or f.index in wanted]
        source.close()
    except SourceError as exc:
        raise ProfileError(str(exc)) from None
    if not decoded:
        raise ProfileError(f"--masks {masks}: no mask matches a frame number of {spec}" if masks else f"{spec}: no frames")
    keep = _spaced(len(decoded), limit)
    digest = sha256_file(spec)
    frames = [dataclasses.replace(decoded[i], truth=read_mask(truth[decoded[i].index]) if masks else None) for i in keep]
    return frames, [CalibrationFrame(file=str(spec.resolve()), index=decoded[i].index, sha256=digest) for i in keep]


def _spaced(n: int, limit: int | None) -> list[int]:
    if not limit or limit >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, limit)})


def load_manifest(manifest: Int8Manifest, base: str | Path = ".") -> list[np.ndarray]:
    """The calibration set's frames, each checked against its recorded SHA-256."""
    from .datasets import read_image
    from .sources import AVSource

    images, videos = [], {}
    for entry in manifest.frames:
        path = Path(entry.file) if Path(entry.file).is_absolute() else Path(base) / entry.file
        if not path.is_file():
            raise ProfileError(f"calibration set: {path} is missing")
        if entry.index is None:
            if sha256_file(path) != entry.sha256:
                raise ProfileError(f"calibration set: {path} changed since calibration (SHA-256 differs)")
            images.append(read_image(path))
            continue
        if path not in videos:
            if sha256_file(path) != entry.sha256:
                raise ProfileError(f"calibration set: {path} changed since calibration (SHA-256 differs)")
            source = AVSource(str(path))
            videos[path] = {f.index: f.image for f in source}
            source.close()
        images.append(videos[path][entry.index])
    return images


def fixed_fov(frames: Sequence[Frame]) -> FovSpec:
    """`fixed` when every frame has one size and the detected boxes agree, else `auto`."""
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        return FovSpec(mode="auto")
    (h, w), = sizes
    boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for b in (find_field_of_view(f.image) for f in frames)])
    median = np.median(boxes, axis=0).round().astype(int)
    if np.abs(boxes - median).max() > FOV_AGREEMENT * max(h, w):
        return FovSpec(mode="auto")
    return FovSpec(mode="fixed", box=tuple(int(v) for v in median), frame_size=(h, w))


def color_correction(frames: Sequence[Frame], fov: FovSpec) -> ColorSpec:
    """Gain/offset per channel that move the frames' mean and spread inside the field of view
    onto the training data's (REFERENCE_MEAN / REFERENCE_STD)."""
    pixels = []
    for f in frames:
        crop = crop_resize(f.image, fov.field_of_view(f.image), 64).reshape(-1, 3).astype(np.float32)
        pixels.append(crop[crop.max(axis=1) > FOV_THRESHOLD])
    px = np.concatenate(pixels)
    mean, std = px.mean(axis=0), px.std(axis=0) + 1e-6
    gain = np.clip(np.float32(REFERENCE_STD) / std, *GAIN_LIMITS)
    offset = np.float32(REFERENCE_MEAN) - gain * mean
    return ColorSpec(method="gain_offset", gain=tuple(round(float(g), 4) for g in gain),
                     offset=tuple(round(float(o), 2) for o in offset))


def calibrate_profile(frames: Sequence[Frame], predict: Callable[[np.ndarray], np.ndarray], size: int, *,
                      name: str = "site", scope: str = "", site: str = "", base: Profile | None = None,
                      manifest: Sequence[CalibrationFrame] = (), int8_frames: int = 16,
                      flicker_weight: float = 0.5, default_threshold: float = 0.5) -> Profile:
    """Measure a profile on `frames`. `predict(batch (N,3,S,S)) -> prob (N,S,S)` runs the model
    at input size `size`.

    Without true masks: field of view, colour correction, and `base`'s threshold and smoothing.
    With them (every frame labelled): colour correction on or off, then the threshold, then (for
    a sequence of one frame size) the smoothing, each chosen by mean Dice; smoothing is scored as Dice - flicker_weight * (flicker
    beyond the true masks' own), so it may trade a little Dice for a stable overlay."""
    if not frames:
        raise ProfileError("no frames to calibrate on")
    base = base or Profile()
    fov = fixed_fov(frames)
    color = color_correction(frames, fov)
    labelled = all(f.truth is not None for f in frames)
    if any(f.truth is not None for f in frames) and not labelled:
        raise ProfileError("some frames have true masks and some do not: give a mask for every frame")
    keep = _spaced(len(manifest), int8_frames)
    report: dict = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "frames": len(frames),
                    "labelled": labelled, "fov_mode": fov.mode}
    threshold, smoothing = base.threshold, base.smoothing
    if labelled:
        fovs = [fov.field_of_view(f.image) for f in frames]
        options = {}
        for spec in (ColorSpec(), color):
            probs = _predict_frames(frames, fov, spec, predict, size)
            t, score = _best_threshold(frames, probs, fovs)
            options[spec.method] = (score, t, probs)
        # Identity unless the correction measurably helps: it is the safer default.
        use_color = options["gain_offset"][0] > options["none"][0] + 1e-3
        color = color if use_color else ColorSpec()
        score, threshold, probs = options[color.method]
        if len({f.shape for f in frames}) == 1:
            smoothing, smooth_report = _best_smoothing(frames, probs, fovs, threshold, flicker_weight)
        else:  # stills of several sizes are no sequence: nothing to smooth over
            smooth_report = {"smoothing": "kept from the base profile: frames of several sizes are not a sequence"}
        report.update(dice_raw_default_threshold=round(_mean_dice(frames, probs, fovs, default_threshold), 4),
                      dice_raw=round(score, 4), color_dice={k: round(v[0], 4) for k, v in options.items()},
                      **smooth_report)
    return Profile(name=name, scope=scope, site=site, fov=fov, threshold=threshold, smoothing=smoothing,
                   color=color, int8=Int8Manifest(frames=[manifest[i] for i in keep]) if manifest else None,
                   calibrated=report)


def _predict_frames(frames, fov: FovSpec, color: ColorSpec, predict, size: int, batch: int = 8) -> list[np.ndarray]:
    """Model-resolution probabilities through the run-time preprocess stage (this profile's field
    of view and colour) and the stage chain's guard: NaN/inf output counts as an empty mask, as
    the pipeline publishes it."""
    from .stages import is_valid

    preprocess = ProfilePreprocessor(size, Profile(fov=fov, color=color))
    probs = []
    for start in range(0, len(frames), batch):
        x = np.stack([preprocess(f).x for f in frames[start:start + batch]])
        probs.extend(p if is_valid(p) else np.zeros_like(p, np.float32) for p in predict(x))
    return probs


def _mean_dice(frames, probs, fovs, threshold: float) -> float:
    return float(np.mean([dice(to_source(p, fov, *f.shape) >= threshold, f.truth)
                          for f, p, fov in zip(frames, probs, fovs)]))


def _best_threshold(frames, probs, fovs) -> tuple[float, float]:
    """(threshold, mean Dice) over THRESHOLDS; ties go to the threshold nearest 0.5."""
    sources = [to_source(p, fov, *f.shape) for f, p, fov in zip(frames, probs, fovs)]
    scores = {t: float(np.mean([dice(s >= t, f.truth) for s, f in zip(sources, frames)])) for t in THRESHOLDS}
    best = max(scores, key=lambda t: (round(scores[t], 4), -abs(t - 0.5)))
    return best, scores[best]


def _best_smoothing(frames, probs, fovs, threshold: float, flicker_weight: float) -> tuple[SmoothingSpec, dict]:
    cached = dict(zip((f.index for f in frames), zip(probs, fovs)))
    best = None
    for alpha in SMOOTHING_GRID["alpha"]:
        for hysteresis in SMOOTHING_GRID["hysteresis"]:
            for min_area in SMOOTHING_GRID["min_area"]:
                spec = SmoothingSpec(enabled=(alpha, hysteresis, min_area) != (1.0, 0.0, 0.0), alpha=alpha,
                                     hysteresis=min(hysteresis, threshold), min_area=min_area)
                r = evaluate_smoothing(frames, lambda f: cached[f.index], spec.config(threshold), threshold)
                score = r.dice_smoothed - flicker_weight * max(0.0, r.flicker_smoothed - r.flicker_truth)
                if best is None or score > best[0] + 1e-6:
                    best = (score, spec, r)
    _, spec, r = best
    return spec, {"dice_smoothed": round(r.dice_smoothed, 4), "flicker_raw": round(r.flicker_raw, 4),
                  "flicker_smoothed": round(r.flicker_smoothed, 4), "flicker_truth": round(r.flicker_truth, 4)}
