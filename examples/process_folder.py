"""Process a folder of recorded procedures: every video losslessly, an overlay video and a mask
folder per recording. (The CLI's `syndiff-stream batch` adds resuming and progress bars.)

    python examples/process_folder.py recordings/ results/ [--model CHECKPOINT]
"""

import argparse
import os
from pathlib import Path

from syndiff_stream.backends import make_backend
from syndiff_stream.frames import Mode
from syndiff_stream.model import Segmenter
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.sinks import MaskFolderSink, OverlayVideoSink
from syndiff_stream.sources import open_source

parser = argparse.ArgumentParser()
parser.add_argument("folder", type=Path)
parser.add_argument("out", type=Path)
parser.add_argument("--model", default=os.environ.get("SYNDIFF_MODEL"), help="default: the shipped checkpoint")
parser.add_argument("--backend", default="eager", help="eager | compile | onnx | tensorrt")
args = parser.parse_args()

backend = make_backend(args.backend, Segmenter.from_pretrained(args.model))
for video in sorted(args.folder.glob("*.mp4")) + sorted(args.folder.glob("*.avi")):
    source = open_source(str(video))
    sinks = [OverlayVideoSink(args.out / video.stem / "overlay.mp4", fps=source.fps or 30),
             MaskFolderSink(args.out / video.stem / "masks")]
    stats = Pipeline(source, backend, sinks, mode=Mode.RECORDED).run()
    print(f"{video.name}: {stats.frames_out} frames at {stats.as_dict()['e2e_fps']} fps -> {args.out / video.stem}")
