"""Measure temporal smoothing where the camera moves, through the real pipeline and the shipped model:
per-frame Dice, frames with a false-positive component, flicker (mean 1 - IoU of consecutive masks,
next to the true masks' own), per kind of motion, for each smoothing setting.

    python examples/measure_smoothing.py --cvc ../shared/data/cvc-clinicdb-train \
        --pseudo ../shared/data/kvasir-seg-train --json smoothing.json
    python examples/measure_smoothing.py --time      # ms per frame of each smoother at 720x576

Motion kinds: CVC-ClinicDB sequences (`sequences.csv`) played every frame (`cvc x1`) and every
other frame (`cvc x2`, twice the motion per frame); pseudo-videos over the model's held-out
Kvasir-SEG images: `smooth` (the eased pan/zoom of `pseudo:`), `pan` (a fast pan across the image),
`jump` (holds, then jumps to another viewpoint) and `zoom` (a fast zoom in and out). Each clip is a
separate run, so no memory crosses clips. Frames are rendered in memory; nothing is written but
the report.
"""

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

from syndiff_stream.backends import make_backend
from syndiff_stream.datasets import read_image, read_mask
from syndiff_stream.frames import Frame
from syndiff_stream.metrics import dice
from syndiff_stream.model import Segmenter, default_checkpoint_path
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.smoothing import SmoothingConfig, Smoother, flicker, has_false_positive
from syndiff_stream.sources import PseudoVideoSource, Source

SETTINGS = {  # name -> config at threshold 0.5 (None: the model's per-frame masks)
    "off": None,
    "old default": SmoothingConfig(low=0.35, motion=False, support=False),  # EMA 0.6, hysteresis 0.15
    "default + hysteresis 0.15": SmoothingConfig(low=0.35),
    "default without motion": SmoothingConfig(motion=False),
    "default without support": SmoothingConfig(support=False),
    "default": SmoothingConfig(),  # EMA 0.6 warped along the flow, support, no hysteresis
}


PSEUDO_KINDS = ("smooth", "pan", "jump", "zoom")


class Clip(Source):
    def __init__(self, frames: list[Frame], source_id: str):
        self.frames, self.source_id = frames, source_id

    def __iter__(self):
        return iter(self.frames)


class MotionPseudo(PseudoVideoSource):
    """`pseudo:` with another camera path per image (t is the eased time 0..1 of `PseudoVideoSource`)."""

    def __init__(self, folder, kind: str, **kwargs):
        super().__init__(folder, **kwargs)
        self.kind = kind

    def camera(self, rng, h, w, t):
        if self.kind == "smooth":
            return super().camera(rng, h, w, t)
        out_h, out_w = self.size
        zooms, centres = rng.uniform(0.45, 0.7, 4), rng.uniform(0, 1, (4, 2))
        if self.kind == "pan":  # one corner to the opposite one, half the image in view
            zoom, c = 0.5, np.array([t, 1 - t]) if rng.random() < 0.5 else np.array([t, t])
        elif self.kind == "jump":  # four viewpoints, held, switched in one frame
            k = min(int(t * 4), 3)
            zoom, c = zooms[k], centres[k]
        else:  # zoom: in to a third of the image and out again, around one point
            zoom, c = 1.0 - 0.65 * (1 - abs(2 * t - 1)), centres[0]
        scale = zoom * min(h / out_h, w / out_w)
        view_h, view_w = out_h * scale, out_w * scale
        y, x = c * [max(h - view_h, 0), max(w - view_w, 0)]
        return np.array([[scale, 0, x], [0, scale, y]], np.float32)


def cvc_clips(root: Path, step: int) -> list[Clip]:
    with open(root / "sequences.csv") as f:
        rows = sorted((int(r["sequence"]), int(r["frame"])) for r in csv.DictReader(f))
    clips = []
    for seq in sorted({s for s, _ in rows}):
        names = [n for s, n in rows if s == seq][::step]
        frames = [Frame(read_image(root / "images" / f"{n}.png"), f"cvc{seq}", i, i / 25,
                        truth=read_mask(root / "masks" / f"{n}.png")) for i, n in enumerate(names)]
        clips.append(Clip(frames, f"cvc{seq}"))
    return clips


def pseudo_clips(root: Path, kind: str, images: int, frames: int, held_out: list[str]) -> list[Clip]:
    clips = []
    for i, name in enumerate(held_out[:images]):
        src = MotionPseudo(root, kind, size=(288, 360), frames_per_image=frames, seed=i)
        src.pairs = [p for p in src.pairs if Path(p.image).stem == name]
        clips.append(Clip(list(src), f"{kind}:{name}"))
    return clips


class Collect:
    def __init__(self):
        self.masks = []

    def write(self, result):
        self.masks.append(result.mask)

    def close(self):
        pass


def score(backend, clips: list[Clip], config) -> dict:
    dices, fps, flick, truth_flick = [], [], [], []
    for clip in clips:
        sink = Collect()
        Pipeline(clip, backend, [sink], mode="recorded", smoothing=config).run()
        truths = [f.truth for f in clip.frames]
        dices += [dice(m, t) for m, t in zip(sink.masks, truths)]
        fps += [has_false_positive(m, t) for m, t in zip(sink.masks, truths)]
        n = len(truths) - 1  # flicker over consecutive frames inside each clip, weighted by pairs
        flick += [flicker(sink.masks)] * n
        truth_flick += [flicker(truths)] * n
    return {"frames": len(dices), "dice": round(float(np.mean(dices)), 4), "fp_frames": round(float(np.mean(fps)), 4),
            "flicker": round(float(np.mean(flick)), 4), "flicker_truth": round(float(np.mean(truth_flick)), 4)}


def time_smoothers(folder: Path, frames: int = 100) -> dict:
    """ms per frame of `Smoother.update` at 720x576 (probability 256x256) on a smooth pseudo-video:
    wall time and CPU time of the process (all threads; less sensitive to a loaded machine)."""
    from syndiff_stream.preprocess import find_field_of_view, prepare_mask
    src = list(PseudoVideoSource(folder, size=(576, 720), frames_per_image=frames // 2, limit_images=2))
    inputs = [(f.image, prepare_mask(f.truth, fov := find_field_of_view(f.image), 256).astype(np.float32), fov)
              for f in src]
    out = {}
    for name, config in SETTINGS.items():
        smoother = Smoother(config or SmoothingConfig.off())
        for image, prob, fov in inputs[:5]:
            smoother.update(image, prob, fov)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        for image, prob, fov in inputs:
            smoother.update(image, prob, fov)
        out[name] = {"wall_ms": round((time.perf_counter() - wall) / len(inputs) * 1000, 2),
                     "cpu_ms": round((time.process_time() - cpu) / len(inputs) * 1000, 2)}
    return out


def held_out_stems(model: str | None) -> list[str]:
    """Kvasir-SEG images the model never trained on: its split.json's validation stems
    ("kvasir/<stem>" in recipe-built checkpoints, bare stems in the older compact-kvasir)."""
    split = (Path(model) if model else default_checkpoint_path()) / "split.json"
    if not split.is_file():
        raise SystemExit(f"pseudo-videos need the model's held-out images: {split} does not exist")
    val = json.loads(split.read_text())["val"]
    return [s.split("/", 1)[1] if "/" in s else s for s in val if "/" not in s or s.startswith("kvasir/")]


def all_clips(args) -> dict[str, list[Clip]]:
    kinds = {}
    for kind in args.kinds:
        step = {"cvc x1": 1, "cvc x2": 2}.get(kind)
        kinds[kind] = (cvc_clips(args.cvc, step) if step else
                       pseudo_clips(args.pseudo, kind, args.images, args.frames, held_out_stems(args.model)))
    return kinds


parser = argparse.ArgumentParser()
parser.add_argument("--cvc", type=Path, default=Path("../shared/data/cvc-clinicdb-train"))
parser.add_argument("--pseudo", type=Path, default=Path("../shared/data/kvasir-seg-train"))
parser.add_argument("--model", default=os.environ.get("SYNDIFF_MODEL"), help="default: the shipped checkpoint")
parser.add_argument("--backend", default="onnx")
parser.add_argument("--images", type=int, default=12, help="held-out images per pseudo-video kind")
parser.add_argument("--frames", type=int, default=20, help="frames per image in a pseudo-video")
parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS), help="which settings to compare")
parser.add_argument("--kinds", nargs="*", default=["cvc x1", "cvc x2", *PSEUDO_KINDS], choices=["cvc x1", "cvc x2", *PSEUDO_KINDS])
parser.add_argument("--time", action="store_true", help="only time the smoothers at 720x576")
parser.add_argument("--json", type=Path, help="also write the report here")

if __name__ == "__main__":
    args = parser.parse_args()
    if args.time:
        print(json.dumps({"ms_per_frame_720x576": time_smoothers(args.pseudo)}, indent=1))
        raise SystemExit
    backend = make_backend(args.backend, Segmenter.from_pretrained(args.model))
    report = {}
    for kind, clips in all_clips(args).items():
        for name in args.settings:
            report.setdefault(kind, {})[name] = r = score(backend, clips, SETTINGS[name])
            print(f"{kind:8} {name:26} {json.dumps(r)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
