"""Turn each sequence of a sequences.csv dataset (CVC-ClinicDB) into a video clip and a mask folder,
the layout a hospital's annotated recording arrives in; then evaluate one clip like any video:

    python examples/clinicdb_clips.py ../shared/data/cvc-clinicdb-train clips/ --fps 25
    syndiff-train eval-video clips/seq-01.mp4 --masks clips/seq-01-masks --report report/

`syndiff-train eval-video ../shared/data/cvc-clinicdb-train` plays the same sequences without the
detour through H.264 (which changes pixels slightly). Nothing here is committed: clips are remade.
"""

import argparse
from pathlib import Path

import cv2

from syndiff_stream.datasets import read_image, read_mask
from syndiff_stream.sinks import VideoWriter
from syndiff_trainer.video_eval import sequence_clips

parser = argparse.ArgumentParser()
parser.add_argument("data", help="folder with images/, masks/ and sequences.csv")
parser.add_argument("out")
parser.add_argument("--fps", type=float, default=25.0)
parser.add_argument("--crf", type=int, default=12, help="H.264 quality: lower is closer to the frames")
parser.add_argument("--limit", type=int, default=None, help="only the first N sequences")
args = parser.parse_args()

for clip in sequence_clips(args.data, args.fps, args.limit):  # checks every frame and mask first
    stem = Path(args.out) / f"seq-{clip.name.split()[-1].zfill(2)}"  # "sequence 1" -> seq-01
    (masks := stem.with_name(stem.name + "-masks")).mkdir(parents=True, exist_ok=True)
    writer = VideoWriter(stem.with_suffix(".mp4"), fps=args.fps, crf=args.crf)
    for i, (image, mask) in enumerate(clip.open().pairs):
        writer.write_image(read_image(image))
        cv2.imwrite(str(masks / f"{i:05d}.png"), read_mask(mask).astype("uint8") * 255)
    writer.close()
    print(f"{clip.name}: {writer.frames} frames -> {stem.with_suffix('.mp4')}, {masks}/")
