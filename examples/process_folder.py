"""Process a folder of recorded procedures: every video losslessly, an overlay video, a mask
folder and a JSONL file per recording; rerun it and finished recordings are skipped (the library
behind `syndiff-stream batch`, which adds progress bars and signal handling).

    python examples/process_folder.py recordings/ results/ [--model CHECKPOINT]
"""

import argparse
import os
from pathlib import Path

from syndiff_stream.backends import make_backend
from syndiff_stream.batch import is_done, plan, process_recording
from syndiff_stream.model import Segmenter

parser = argparse.ArgumentParser()
parser.add_argument("folder", type=Path)
parser.add_argument("out", type=Path)
parser.add_argument("--model", default=os.environ.get("SYNDIFF_MODEL"), help="default: the shipped checkpoint")
parser.add_argument("--backend", default="eager", help="eager | compile | onnx | tensorrt")
args = parser.parse_args()

backend = make_backend(args.backend, Segmenter.from_pretrained(args.model))
videos = sorted(args.folder.glob("*.mp4")) + sorted(args.folder.glob("*.avi"))
for video, final in plan(videos, args.out):
    if is_done(final):
        print(f"{video.name}: done earlier, skipped")
        continue
    stats = process_recording(video, final, backend)
    print(f"{video.name}: {stats.frames_out} frames at {stats.as_dict()['e2e_fps']} fps -> {final}")
