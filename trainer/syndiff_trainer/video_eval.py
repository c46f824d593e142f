"""Clinical video evaluation: what an endoscopist asks of a polyp detector, measured on annotated video.

Inputs (each becomes one or more clips, each clip played through the real runtime, `Pipeline`,
with the same stages, smoothing and alarm gating as `syndiff-stream run`, on the chosen backend):
  video + masks   a video file and a folder of per-frame masks in frame order (natural name order)
  sequences       a dataset folder (images/, masks/) with sequences.csv (frame, sequence): one clip
                  per sequence, frames in number order, played at `fps` (CVC-ClinicDB); without
                  masks/, every frame is polyp-free (polyp-free-val): what is left to measure is
                  alarms, frames with one and false alarms per minute
  pseudo:FOLDER   a virtual camera over each still image: one clip of `frames_per_image` per image

Metrics, on what the overlay shows (the gated mask), with the rules stated:
  per frame     Dice and IoU (`syndiff_stream.metrics`; both empty = 1) over all frames and over
                frames with a polyp, mean with a 95 % bootstrap interval that resamples whole clips
                (frames of one clip are not independent; frames when there is only one clip);
  per polyp     a truth polyp is a track of true-mask components linked frame to frame by pixel
                overlap (or, with `polyps="clip"`, every true pixel of a clip that shows one
                polyp, as each CVC-ClinicDB sequence does: its frames are too far apart for the
                masks of consecutive frames to overlap reliably); it is hit in a frame when the
                predicted components touching it have IoU >= `hit_iou` (0.1) with it, and
                detected when hit in >= `min_hits` consecutive frames; time to first detection =
                first frame of that run - its first annotated frame, in frames and in ms at the
                clip's frame rate; sensitivity = detected / polyps;
  false alarms  predicted components touching no truth pixel, linked frame to frame by overlap;
                a track lasting >= `fa_frames` frames is one event; events per minute of video;
                and the share of polyp-free frames with any prediction;
  flicker       mean 1 - IoU of consecutive predicted masks, next to the true masks' own value;
  latency       capture -> postprocessed percentiles from the runtime's own statistics.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from syndiff_stream.frames import Frame
from syndiff_stream.gating import AlarmGate, GateConfig
from syndiff_stream.metrics import dice, iou
from syndiff_stream.model import default_checkpoint_path
from syndiff_stream.sources import Source

GALLERY_SIZE = 8  # the report shows the worst frame of each of the worst clips
BOOTSTRAP_SAMPLES = 1000


class EvalInputError(ValueError):
    """Input that cannot be evaluated: one line naming the file and the mismatch."""


# ---- inputs -------------------------------------------------------------------------------------

@dataclass
class Clip:
    name: str
    frames: int
    fps: float
    open: Callable[[], Source] = field(repr=False)  # a fresh source whose frames carry true masks
    stems: tuple[str, ...] = ()  # file stems of its frames (sequences, pseudo), to tell training frames apart


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


class PairSource(Source):
    """Frames from a list of (image, mask) files, in the order given: one sequence as a video."""

    kind = "folder"

    def __init__(self, name: str, pairs: list[tuple[Path, Path | None]], fps: float):
        self.source_id, self.pairs, self.fps = name, pairs, fps

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Frame]:
        from syndiff_stream.datasets import read_image, read_mask

        for i, (image, mask) in enumerate(self.pairs):
            pixels = read_image(image)
            truth = read_mask(mask) if mask is not None else np.zeros(pixels.shape[:2], bool)  # polyp-free
            yield Frame(pixels, self.source_id, i, i / self.fps, truth=truth)


class MaskedVideoSource(Source):
    """A video file's frames with the i-th mask file attached to the i-th frame."""

    def __init__(self, video: Path, masks: list[Path]):
        from syndiff_stream.sources import AVSource

        self.video = AVSource(str(video), kind="file")
        self.source_id, self.fps, self.masks = self.video.source_id, self.video.fps, masks

    @property
    def skipped(self) -> int:
        return self.video.skipped

    def __len__(self) -> int:
        return len(self.masks)

    def __iter__(self) -> Iterator[Frame]:
        from syndiff_stream.datasets import read_mask

        for frame in self.video:
            if frame.index >= len(self.masks):
                return
            yield dataclasses.replace(frame, truth=read_mask(self.masks[frame.index]))

    def close(self) -> None:
        self.video.close()


def _image_size(path: Path) -> tuple[int, int]:
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise EvalInputError(f"{path}: cannot be read as an image")
    return data.shape[:2]


def sequence_clips(folder: str | Path, fps: float = 25.0, limit: int | None = None) -> list[Clip]:
    """One clip per sequence of sequences.csv (columns frame, sequence); every named frame must
    have an image and a mask of the same size. A folder without masks/ holds polyp-free sequences:
    every frame's true mask is empty."""
    folder = Path(folder)
    table = folder / "sequences.csv"
    if not table.is_file():
        raise EvalInputError(f"{table}: no such file (a sequences folder needs sequences.csv: frame,sequence)")
    image_dir, mask_dir = folder / "images", folder / "masks"
    if not image_dir.is_dir():
        raise EvalInputError(f"{image_dir}: no such folder (a sequences folder holds images/, and masks/ "
                             "unless every frame is polyp-free)")
    images = {p.stem: p for p in image_dir.iterdir() if p.is_file()}
    polyp_free = not mask_dir.exists()
    masks = {} if polyp_free else {p.stem: p for p in mask_dir.iterdir() if p.is_file()}
    groups: dict[str, list[str]] = {}
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"frame", "sequence"} <= set(reader.fieldnames):
            raise EvalInputError(f"{table}: needs the columns frame,sequence (has {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            frame = Path(row["frame"].strip()).stem
            if frame not in images:
                raise EvalInputError(f"{table} line {line}: frame {row['frame']!r} has no image in {image_dir}")
            if frame not in masks and not polyp_free:
                raise EvalInputError(f"{table} line {line}: frame {row['frame']!r} has no mask in {mask_dir}")
            groups.setdefault(row["sequence"].strip(), []).append(frame)
    if not groups:
        raise EvalInputError(f"{table}: names no frames")
    order = sorted(groups, key=lambda s: (0, int(s)) if s.isdigit() else (1, s))[:limit]
    clips = []
    for seq in order:
        frames = sorted(groups[seq], key=lambda s: _natural_key(Path(s)))
        pairs = [(images[s], masks.get(s)) for s in frames]
        for image, mask in pairs:
            if mask is not None and _image_size(image) != _image_size(mask):
                raise EvalInputError(f"{mask}: mask size {_image_size(mask)} does not match its frame {image} "
                                     f"{_image_size(image)}")
        name = f"sequence {seq}"
        clips.append(Clip(name, len(pairs), fps, lambda n=name, p=pairs: PairSource(n, p, fps), tuple(frames)))
    return clips


def video_clip(video: str | Path, masks: str | Path) -> Clip:
    """A video and a folder of one mask per frame: counts and sizes must match (checked by
    demuxing the packets and decoding the first frame, before any inference)."""
    import av

    video, masks = Path(video), Path(masks)
    if not video.is_file():
        raise EvalInputError(f"{video}: no such video file")
    if not masks.is_dir():
        raise EvalInputError(f"{masks}: no such mask folder")
    from syndiff_stream.datasets import IMAGE_SUFFIXES

    mask_files = sorted((p for p in masks.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not mask_files:
        raise EvalInputError(f"{masks}: no mask images")
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise EvalInputError(f"{video}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            packets = sum(1 for p in container.demux(stream) if p.size)
        with av.open(str(video)) as container:
            first = next((f for p in container.demux(container.streams.video[0]) for f in p.decode()), None)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise EvalInputError(f"{video}: not a readable video ({str(exc).splitlines()[0]})") from None
    if first is None:
        raise EvalInputError(f"{video}: no readable frames")
    if packets != len(mask_files):
        raise EvalInputError(f"{masks}: {len(mask_files)} masks for the {packets} frames of {video}")
    size = (first.height, first.width)
    for mask in mask_files:
        if _image_size(mask) != size:
            raise EvalInputError(f"{mask}: mask size {_image_size(mask)} does not match the frames of {video} {size}")
    fps = float(rate) if rate else 25.0
    return Clip(video.stem, len(mask_files), fps, lambda: MaskedVideoSource(video, mask_files))


def pseudo_clips(folder: str | Path, frames_per_image: int = 30, fps: float = 25.0,
                 limit: int | None = None, size: tuple[int, int] = (288, 384)) -> list[Clip]:
    """A pseudo-video over stills (`sources.PseudoVideoSource`): one clip per image."""
    from syndiff_stream.sources import PseudoVideoSource, SourceError

    try:
        base = PseudoVideoSource(folder, size=size, frames_per_image=frames_per_image, fps=fps)
    except SourceError as exc:
        raise EvalInputError(str(exc)) from None

    def one(k: int) -> Source:
        src = PseudoVideoSource(folder, size=size, frames_per_image=frames_per_image, fps=fps, seed=k)
        src.pairs = [base.pairs[k]]
        src.source_id = f"{src.source_id}/{base.pairs[k].stem}"
        return src

    return [Clip(pair.stem, frames_per_image, fps, lambda k=k: one(k), (pair.stem,))
            for k, pair in enumerate(base.pairs[:limit])]


def held_out(clips: list[Clip], folder: str | Path, model_dir: Path) -> tuple[list[Clip], str]:
    """The clips none of whose frames the checkpoint trained on, and a line saying what was left
    out. The checkpoint's manifest names the folders it trained from and its split.json which
    frames; a checkpoint without them cannot tell, which the line says."""
    import json

    from .evaluate import recorded_sources

    split = model_dir / "split.json"
    if not (model_dir / "manifest.json").is_file() or not split.is_file():
        return clips, (f"{model_dir.name} records no training manifest: if it trained on these frames, "
                       "the scores are inflated")
    source = recorded_sources(model_dir).get(str(Path(folder).resolve()))
    if source is None:
        return clips, ""
    recorded = json.loads(split.read_text())
    trained = set(recorded.get("train", [])) | set(recorded.get("select", []))
    keep = [c for c in clips if not any(f"{source['name']}/{stem}" in trained for stem in c.stems)]
    return keep, (f"scoring the {len(keep)} of {len(clips)} clips that {model_dir.name} never trained on "
                  f"(its split.json); --split all scores every clip, training frames included")


# ---- scoring ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rules:
    hit_iou: float = 0.1  # a truth polyp is hit when touching predictions reach this IoU with it
    min_hits: int = 1  # ... and detected when hit in this many consecutive frames
    fa_frames: int = 1  # a false-alarm track this many frames long is one event
    polyps: str = "overlap"  # truth polyps: "overlap" (tracks linked by overlap) or "clip" (one per clip)

    def __post_init__(self):
        if self.polyps not in ("overlap", "clip"):
            raise ValueError(f"polyps must be overlap or clip, got {self.polyps!r}")


class _Linker:
    """Links components of consecutive frames into tracks (union-find over pixel overlap)."""

    def __init__(self):
        self.parent: dict[int, int] = {}
        self.prev: np.ndarray | None = None  # label image of the previous frame
        self.prev_ids: list[int] = []
        self.next_id = 0

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def step(self, mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Mask -> (label image, track id of each label 1..n); ids may merge later (use `find`)."""
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        ids = []
        for k in range(1, n):
            linked = []
            if self.prev is not None and self.prev.shape == labels.shape:
                linked = [self.prev_ids[j - 1] for j in np.unique(self.prev[labels == k]) if j > 0]
            if linked:
                root = self.find(linked[0])
                for other in linked[1:]:
                    self.parent[self.find(other)] = root
            else:
                root = self.next_id
                self.parent[root] = root
                self.next_id += 1
            ids.append(root)
        self.prev, self.prev_ids = labels, ids
        return labels, ids


def _runs(frames: list[int]) -> list[tuple[int, int]]:
    """Sorted frame indices -> (first, length) of each run of consecutive frames."""
    runs: list[tuple[int, int]] = []
    for f in frames:
        if runs and f == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((f, 1))
    return runs


class ClipScorer:
    """Feed (true mask, shown mask) frame by frame with `add`; `result()` scores the clip."""

    def __init__(self, name: str, fps: float, rules: Rules = Rules()):
        self.name, self.fps, self.rules = name, fps, rules
        self.truth_links, self.fp_links = _Linker(), _Linker()
        self.dice: list[float] = []
        self.iou: list[float] = []
        self.positive: list[bool] = []
        self.predicted: list[bool] = []
        self.truth_frames: dict[int, list[int]] = {}  # track -> frames present
        self.hit_frames: dict[int, list[int]] = {}  # track -> frames hit
        self.fp_frames: dict[int, list[int]] = {}  # false-alarm track -> frames
        self.flicker_pred: list[float] = []
        self.flicker_truth: list[float] = []
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, truth: np.ndarray, shown: np.ndarray) -> None:
        i = len(self.dice)
        truth, shown = truth.astype(bool, copy=False), shown.astype(bool, copy=False)
        self.dice.append(dice(shown, truth))
        self.iou.append(iou(shown, truth))
        self.positive.append(bool(truth.any()))
        self.predicted.append(bool(shown.any()))
        if self._last is not None and self._last[0].shape == truth.shape:
            self.flicker_truth.append(1 - iou(self._last[0], truth))
            self.flicker_pred.append(1 - iou(self._last[1], shown))
        self._last = (truth, shown)
        if self.rules.polyps == "clip":  # the whole clip shows one polyp: every true pixel is it
            t_labels, t_ids = truth.astype(np.int32), ([0] if truth.any() else [])
            self.truth_links.parent[0] = 0
        else:
            t_labels, t_ids = self.truth_links.step(truth)
        _, p_labels = cv2.connectedComponents(shown.astype(np.uint8), connectivity=8)
        for k, track in enumerate(t_ids, start=1):
            comp = t_labels == k
            self.truth_frames.setdefault(track, []).append(i)
            touching = np.unique(p_labels[comp])
            touching = touching[touching > 0]
            if len(touching) and iou(np.isin(p_labels, touching), comp) >= self.rules.hit_iou:
                self.hit_frames.setdefault(track, []).append(i)
        # False alarms: predicted components with no truth pixel, linked over frames.
        fp = shown & ~np.isin(p_labels, np.unique(p_labels[truth])) if truth.any() else shown
        _, fp_ids = self.fp_links.step(fp)
        for track in fp_ids:
            self.fp_frames.setdefault(track, []).append(i)

    def _merged(self, links: _Linker, frames: dict[int, list[int]]) -> dict[int, list[int]]:
        out: dict[int, set[int]] = {}
        for track, fs in frames.items():
            out.setdefault(links.find(track), set()).update(fs)
        return {k: sorted(v) for k, v in out.items()}

    def result(self) -> dict:
        truth = self._merged(self.truth_links, self.truth_frames)
        hits = self._merged(self.truth_links, self.hit_frames)
        polyps = []
        for track, frames in sorted(truth.items(), key=lambda kv: kv[1][0]):
            runs = [r for r in _runs(hits.get(track, [])) if r[1] >= self.rules.min_hits]
            first = frames[0]
            ttd = runs[0][0] - first if runs else None
            polyps.append({"first_frame": first, "frames": len(frames), "hit_frames": len(hits.get(track, [])),
                           "detected": bool(runs), "detected_at": runs[0][0] if runs else None,
                           "ttd_frames": ttd, "ttd_ms": None if ttd is None else round(ttd * 1000 / self.fps, 1)})
        fp_tracks = self._merged(self.fp_links, self.fp_frames)
        events = sorted(fs[0] for fs in fp_tracks.values() if len(fs) >= self.rules.fa_frames)
        free = [not p for p in self.positive]
        return {
            "name": self.name, "frames": len(self.dice), "fps": self.fps,
            "dice": self.dice, "iou": self.iou, "positive": self.positive, "predicted": self.predicted,
            "polyps": polyps, "false_alarm_starts": events,
            "false_alarm_frames": sorted({f for fs in fp_tracks.values() if len(fs) >= self.rules.fa_frames for f in fs}),
            "polyp_free_frames": int(sum(free)),
            "polyp_free_frames_with_prediction": int(sum(f and p for f, p in zip(free, self.predicted))),
            "flicker_pred_sum": float(sum(self.flicker_pred)), "flicker_truth_sum": float(sum(self.flicker_truth)),
            "flicker_pairs": len(self.flicker_pred),
        }


def bootstrap_ci(groups: list[list[float]], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple:
    """Mean of all values and its 95 % percentile interval, resampling whole groups (clips) with
    replacement; with a single group, resampling its values. No values: (None, None, None)."""
    groups = [np.asarray(g, float) for g in groups if len(g)]
    if not groups:
        return None, None, None
    mean = float(np.concatenate(groups).mean())
    rng = np.random.default_rng(seed)
    if len(groups) == 1:
        values = groups[0]
        means = values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    else:
        sums, counts = np.array([g.sum() for g in groups]), np.array([len(g) for g in groups])
        pick = rng.integers(0, len(groups), (samples, len(groups)))
        means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return round(mean, 4), round(float(lo), 4), round(float(hi), 4)


def summarise(clips: list[dict], latency_ms: dict | None = None) -> dict:
    """Per-clip results -> the summary: per-frame, per-polyp, false alarms, flicker, latency."""
    polyps = [p | {"clip": c["name"], "fps": c["fps"]} for c in clips for p in c["polyps"]]
    detected = [p for p in polyps if p["detected"]]
    ttd_f = np.array([p["ttd_frames"] for p in detected], float)
    ttd_ms = np.array([p["ttd_ms"] for p in detected], float)
    minutes = sum(c["frames"] / c["fps"] for c in clips) / 60
    events = sum(len(c["false_alarm_starts"]) for c in clips)
    free = sum(c["polyp_free_frames"] for c in clips)
    pairs = sum(c["flicker_pairs"] for c in clips)

    def ci(key: str, positive_only: bool) -> dict:
        groups = [[v for v, pos in zip(c[key], c["positive"]) if pos or not positive_only] for c in clips]
        mean, lo, hi = bootstrap_ci(groups)
        return {"mean": mean, "ci95": [lo, hi], "frames": sum(len(g) for g in groups)}

    def stat(values: np.ndarray, fn) -> float | None:
        return round(float(fn(values)), 1) if len(values) else None

    return {
        "clips": len(clips), "frames": sum(c["frames"] for c in clips), "minutes": round(minutes, 3),
        "dice_all": ci("dice", False), "dice_positive": ci("dice", True),
        "iou_all": ci("iou", False), "iou_positive": ci("iou", True),
        "polyps": len(polyps), "detected": len(detected),
        "sensitivity": round(len(detected) / len(polyps), 4) if polyps else None,
        "ttd_frames": {"median": stat(ttd_f, np.median), "worst": stat(ttd_f, np.max), "mean": stat(ttd_f, np.mean)},
        "ttd_ms": {"median": stat(ttd_ms, np.median), "worst": stat(ttd_ms, np.max), "mean": stat(ttd_ms, np.mean)},
        "false_alarm_events": events,
        "false_alarms_per_minute": round(events / minutes, 3) if minutes else None,
        "polyp_free_frames": free,
        "polyp_free_frames_with_alarm": sum(c["polyp_free_frames_with_prediction"] for c in clips),
        "fp_rate_polyp_free_frames": round(sum(c["polyp_free_frames_with_prediction"] for c in clips) / free, 4)
        if free else None,
        "flicker_pred": round(sum(c["flicker_pred_sum"] for c in clips) / pairs, 4) if pairs else None,
        "flicker_truth": round(sum(c["flicker_truth_sum"] for c in clips) / pairs, 4) if pairs else None,
        "latency_ms": latency_ms,
        "missed": [f"{p['clip']} (first frame {p['first_frame']})" for p in polyps if not p["detected"]],
    }


# ---- running the runtime ------------------------------------------------------------------------

def _png(mask: np.ndarray) -> bytes:
    return cv2.imencode(".png", mask.astype(np.uint8))[1].tobytes()


def _unpng(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) > 0


class _GateTap:
    """Stands in for the pipeline's gate: records what reaches it (the smoothed mask and its
    polyps, PNG-compressed) and passes it to the real gate, so the gating sweep can replay the
    very same input through other settings without running the model again."""

    def __init__(self, gate: AlarmGate):
        self.gate, self.config = gate, gate.config
        self.seen: list = []  # per frame: (PNG mask, polyps, reset before it), or None (invalid frame)
        self._reset = False

    def reset(self) -> None:
        self._reset = True  # a scene cut or an invalid frame: the replay resets here too
        self.gate.reset()

    def update(self, mask, polyps, cc=None):
        self.seen.append((_png(mask), polyps, self._reset))  # a replay labels the mask itself: the same gate
        self._reset = False
        return self.gate.update(mask, polyps, cc)


class _Recorder:
    """A sink: true and shown masks per frame (PNG-compressed), and the worst frames' images."""

    def __init__(self, name: str, tap: _GateTap, keep: int = 1):
        self.name, self.tap, self.keep = name, tap, keep
        self.truth: list[bytes] = []
        self.shown: list[bytes] = []
        self.worst: list[tuple] = []  # (dice, index, image, truth, shown)

    def write(self, result) -> None:
        truth = result.frame.truth
        if truth is None:
            raise EvalInputError(f"{self.name}: frame {result.frame.index} has no true mask")
        if not result.valid:  # the model gave NaN/inf: the gate saw no update for this frame
            self.tap.seen.append(None)
        self.truth.append(_png(truth))
        self.shown.append(_png(result.mask))
        if truth.any() or result.mask.any():
            d = dice(result.mask, truth)
            self.worst.append((d, result.frame.index, result.frame.image, truth, result.mask.copy()))
            # Lowest Dice first; among equals, a wrong outline shown tells more than a miss.
            self.worst = sorted(self.worst, key=lambda w: (w[0], not w[4].any()))[: self.keep]

    def close(self) -> None:
        pass


@dataclass
class ClipRun:
    clip: Clip
    truth: list[bytes]
    shown: list[bytes]
    gate_input: list  # (PNG mask, polyps) per frame, None where the pipeline reset the gate
    worst: list
    stats: dict
    latencies: list[float]

    def score(self, rules: Rules, gating: GateConfig | None = None) -> dict:
        """Score what was shown; with `gating`, replay the recorded gate input through that gate."""
        scorer = ClipScorer(self.clip.name, self.clip.fps, rules)
        if gating is None:
            for t, s in zip(self.truth, self.shown):
                scorer.add(_unpng(t), _unpng(s))
            return scorer.result()
        gate = AlarmGate(gating)
        for truth, entry in zip(self.truth, self.gate_input, strict=True):
            truth = _unpng(truth)
            if entry is None:
                gate.reset()
                scorer.add(truth, np.zeros_like(truth))
                continue
            mask, polyps, reset = entry
            if reset:
                gate.reset()
            scorer.add(truth, gate.update(_unpng(mask), polyps)[0])
        return scorer.result()


def run_clip(clip: Clip, backend, stages=None, batch_size: int | None = None) -> ClipRun:
    """Play one clip through the runtime's `Pipeline` (recorded mode: every frame, in order);
    `stages`: its stage chain (`syndiff_stream.stages.Stages.for_profile`, as `run` builds it)."""
    from syndiff_stream.pipeline import Pipeline

    pipeline = Pipeline(clip.open(), backend, mode="recorded", batch_size=batch_size, stages=stages)
    tap = pipeline.stages.gate = _GateTap(pipeline.stages.gate)
    recorder = _Recorder(clip.name, tap)
    pipeline.sinks.append(recorder)
    stats = pipeline.run()
    if stats.frames_out != clip.frames:
        raise EvalInputError(f"{clip.name}: {stats.frames_out} frames came out of the runtime, expected {clip.frames}"
                             + (f" ({stats.skipped} undecodable packets skipped)" if stats.skipped else ""))
    return ClipRun(clip, recorder.truth, recorder.shown, tap.seen, recorder.worst, stats.as_dict(),
                   list(stats.latencies))


@dataclass(frozen=True)
class EvalSettings:
    gating: GateConfig = GateConfig()
    smooth: bool = True
    rules: Rules = Rules()
    sweep: tuple[int, ...] = tuple(range(1, 9))  # persistence values for the gating trade-off
    sweep_hold: tuple[int, ...] = ()  # hold values for it (default: the gate's own)

    def as_dict(self) -> dict:
        return {"gate_persist": self.gating.persist, "gate_hold": self.gating.hold, "smooth": self.smooth,
                **asdict(self.rules), "sweep_persist": list(self.sweep),
                "sweep_hold": list(self.sweep_hold or (self.gating.hold,))}


def gating_sweep(runs: list[ClipRun], rules: Rules, holds, persists) -> list[dict]:
    """False alarms per minute vs time to first detection for each hold M and persistence N,
    replaying the recorded gate input (no model runs)."""
    rows = []
    for hold, n in ((h, n) for h in holds for n in persists):
        s = summarise([r.score(rules, GateConfig(persist=n, hold=hold)) for r in runs])
        rows.append({"persist": n, "hold": hold, "false_alarms_per_minute": s["false_alarms_per_minute"],
                     "false_alarm_events": s["false_alarm_events"], "sensitivity": s["sensitivity"],
                     "fp_rate_polyp_free_frames": s["fp_rate_polyp_free_frames"],
                     "ttd_frames_median": s["ttd_frames"]["median"], "ttd_frames_worst": s["ttd_frames"]["worst"],
                     "ttd_ms_median": s["ttd_ms"]["median"], "ttd_ms_worst": s["ttd_ms"]["worst"],
                     "dice_all": s["dice_all"]["mean"], "flicker_pred": s["flicker_pred"]})
    return rows


def evaluate_clips(clips: list[Clip], backend, settings: EvalSettings = EvalSettings(),
                   on_clip: Callable[[int, Clip], None] | None = None,
                   profile=None) -> tuple[dict, list[ClipRun], list[dict]]:
    """Run every clip through the runtime, with the stages `run` builds (smoothing, gating and a
    calibration profile's preprocessing), and score it -> (JSON-ready result, runs, clip scores)."""
    from syndiff_stream.stages import Stages

    runs, scores = [], []
    for i, clip in enumerate(clips):
        if on_clip:
            on_clip(i, clip)
        run = run_clip(clip, backend, Stages.for_profile(backend, profile, settings.smooth, settings.gating))
        runs.append(run)
        scores.append(run.score(settings.rules))
    lat = np.asarray([x for r in runs for x in r.latencies]) * 1000
    latency = {q: round(float(np.percentile(lat, int(q[1:]))), 2) for q in ("p50", "p95", "p99")} if len(lat) else None
    summary = summarise(scores, latency)
    summary["e2e_fps"] = round(sum(r.stats["frames_out"] for r in runs)
                               / max(sum(r.stats["frames_out"] / max(r.stats["e2e_fps"], 1e-9) for r in runs), 1e-9), 2)
    holds = settings.sweep_hold or (settings.gating.hold,)
    sweep = gating_sweep(runs, settings.rules, holds, settings.sweep) if settings.sweep else []
    per_clip = [{"name": s["name"], "frames": s["frames"], "dice": round(float(np.mean(s["dice"])), 4),
                 "polyps": len(s["polyps"]), "detected": sum(p["detected"] for p in s["polyps"]),
                 "ttd_frames": [p["ttd_frames"] for p in s["polyps"]],
                 "false_alarm_events": len(s["false_alarm_starts"])} for s in scores]
    result = {"summary": summary, "gating_sweep": sweep, "clips": per_clip, "settings": settings.as_dict()}
    return result, runs, scores


def open_clips(spec: str, masks: str | Path | None = None, fps: float | None = None, limit: int | None = None,
               frames_per_image: int = 30) -> tuple[list[Clip], str]:
    """Clips from the command line's input -> (clips, kind): `pseudo:FOLDER`, a folder with
    sequences.csv, or a video file with `masks`. Every check runs here, before any inference."""
    if spec.startswith("pseudo:"):
        return pseudo_clips(spec[len("pseudo:"):], frames_per_image, fps or 25.0, limit), "pseudo"
    path = Path(spec)
    if path.is_dir():
        if masks is not None:
            raise EvalInputError(f"{path}: a folder is evaluated by its sequences.csv; --masks goes with a video file")
        return sequence_clips(path, fps or 25.0, limit), "sequences"
    if masks is None:
        raise EvalInputError(f"{path}: a video needs --masks (a folder with one mask per frame)"
                             if path.exists() else f"{path}: no such file or folder")
    clip = video_clip(path, masks)
    if fps:
        clip.fps = fps
    return [clip], "video"


def _parse_sweep(text: str) -> tuple[int, ...]:
    values: list[int] = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        lo, _, hi = part.partition("-")
        values += range(int(lo), int(hi or lo) + 1)
    if any(v < 1 for v in values):
        raise ValueError("persistence values must be >= 1")
    return tuple(values)


def run_eval_video(source: str, masks=None, fps=None, model=None, backend="auto", device="auto", threads=None,
                   profile=None, smooth=True, gate_persist=None, gate_hold=None, polyps="auto", hit_iou=0.1, min_hits=1,
                   fa_frames=1, sweep="1-8", sweep_hold="", limit=None, frames_per_image=30, report=None,
                   as_json=False, split="val") -> dict:
    """`syndiff-train eval-video`: check the input, run it through the runtime, print, report."""
    import json
    import sys

    import typer

    from syndiff_stream.cli import build_backend, fail, gating_config, load_model, pick_device, read_profile

    profile_ = read_profile(profile)
    gating = gating_config(profile_, gate_persist, gate_hold)
    try:
        persists = _parse_sweep(sweep)
        holds = tuple(GateConfig(hold=int(h)).hold for h in sweep_hold.split(",") if h.strip())
        clips, kind = open_clips(source, masks, fps, limit, frames_per_image)
        rules = Rules(hit_iou=hit_iou, min_hits=min_hits, fa_frames=fa_frames,
                      polyps=("clip" if kind == "sequences" else "overlap") if polyps == "auto" else polyps)
        if split not in ("val", "all"):
            raise ValueError(f"--split {split!r}: choose val or all")
        if split == "val" and kind != "video":
            clips, note = held_out(clips, source.removeprefix("pseudo:"), Path(model) if model else default_checkpoint_path())
            if note:
                print(note, file=sys.stderr)
            if not clips:
                raise EvalInputError(f"{source}: the checkpoint trained on every clip here; --split all scores them anyway")
    except (EvalInputError, ValueError) as exc:
        fail(str(exc))
    seg = load_model(model)
    backend_ = build_backend(seg, backend, pick_device(device), threads)
    settings = EvalSettings(gating=gating, smooth=smooth, rules=rules, sweep=persists, sweep_hold=holds)
    quiet = as_json

    def progress(i: int, clip: Clip) -> None:
        if not quiet:
            print(f"[{i + 1}/{len(clips)}] {clip.name}: {clip.frames} frames at {clip.fps:g} fps", file=sys.stderr)

    try:
        result, runs, scores = evaluate_clips(clips, backend_, settings, progress, profile_)
    except EvalInputError as exc:
        fail(str(exc))
    meta = {"input": source, "input_kind": kind, "clips": len(clips), "checkpoint": str(model or default_checkpoint_path().name),
            "profile": str(profile) if profile else None,
            "backend": backend_.name, "device": str(backend_.device), "threshold": profile_.threshold if profile_ else seg.config.threshold}
    result["settings"] = {**meta, **result["settings"]}
    if report is not None:
        from .video_report import write_report

        page = write_report(report, result, runs, scores, meta)
        print(f"report: {page}", file=sys.stderr)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        s = result["summary"]
        if not s["polyps"]:  # polyp-free clips: alarms are all there is to measure
            typer.echo(f"{s['clips']} clips, {s['frames']} frames ({s['minutes']:.2f} min), all polyp-free: an alarm "
                       f"on {s['polyp_free_frames_with_alarm']} frames ({100 * (s['fp_rate_polyp_free_frames'] or 0):.1f} %), "
                       f"{s['false_alarm_events']} false alarms ({s['false_alarms_per_minute']} per minute), latency p50 "
                       f"{(s['latency_ms'] or {}).get('p50')} ms")
            return result
        typer.echo(f"{s['clips']} clips, {s['frames']} frames ({s['minutes']:.2f} min): sensitivity {s['detected']}/"
                   f"{s['polyps']}, time to first detection median {s['ttd_ms']['median']} ms (worst "
                   f"{s['ttd_ms']['worst']} ms), {s['false_alarms_per_minute']} false alarms/min, Dice "
                   f"{s['dice_all']['mean']:.3f} [{s['dice_all']['ci95'][0]:.3f}, {s['dice_all']['ci95'][1]:.3f}], "
                   f"flicker {s['flicker_pred']} (truth {s['flicker_truth']}), latency p50 "
                   f"{(s['latency_ms'] or {}).get('p50')} ms")
    return result
