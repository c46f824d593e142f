"""Write the benchmark clip: any source (pseudo-video over real images, or the demo) as H.264.

    python examples/write_bench_clip.py pseudo:../shared/data/kvasir-seg-train clip.mp4 --frames 600
    syndiff-stream bench clip.mp4 --backend onnx --frames 500 --json

720x576 at 25 fps is a PAL-era endoscopy tower's output; nothing is committed, the clip is remade.
"""

import argparse
from itertools import islice

from syndiff_stream.sinks import VideoWriter
from syndiff_stream.sources import open_source

parser = argparse.ArgumentParser()
parser.add_argument("source", help="pseudo:FOLDER, demo, or any source spec")
parser.add_argument("out")
parser.add_argument("--frames", type=int, default=600)
parser.add_argument("--size", default="720x576", help="WIDTHxHEIGHT")
parser.add_argument("--fps", type=float, default=25.0)
args = parser.parse_args()

width, height = map(int, args.size.lower().split("x"))
source = open_source(args.source, size=(height, width), fps=args.fps, realtime=False)
writer = VideoWriter(args.out, fps=args.fps)
for frame in islice(source, args.frames):
    writer.write_image(frame.image)
source.close()
writer.close()
print(f"{writer.frames} frames, {width}x{height}, {writer.codec} -> {args.out}")
