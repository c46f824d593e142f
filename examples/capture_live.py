"""Open a capture device live: frames older than the latency budget are dropped, so the overlay never lags.
Prints latency and dropped frames once a second.

    python examples/capture_live.py v4l2:/dev/video0          # Linux
    python examples/capture_live.py avfoundation:0            # macOS
    python examples/capture_live.py "dshow:video=USB Capture"  # Windows
"""

import argparse
import os

from syndiff_stream.backends import make_backend
from syndiff_stream.frames import Mode
from syndiff_stream.model import Segmenter
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.publish import Publisher
from syndiff_stream.sources import open_source

parser = argparse.ArgumentParser()
parser.add_argument("device", nargs="?", default="v4l2:/dev/video0", help="device, URL or file")
parser.add_argument("--model", default=os.environ.get("SYNDIFF_MODEL"), help="default: the shipped checkpoint")
parser.add_argument("--publish", default="tcp://127.0.0.1:5556")
parser.add_argument("--backend", default="onnx", help="eager | compile | onnx | tensorrt")
parser.add_argument("--max-frames", type=int, default=None)
args = parser.parse_args()

source = open_source(args.device)
backend = make_backend(args.backend, Segmenter.from_pretrained(args.model))
pipeline = Pipeline(source, backend, [Publisher(args.publish)], mode=Mode.LIVE, max_frames=args.max_frames)


def report(stats):
    lat = stats.as_dict()["latency_ms"]
    print(f"{stats.frames_out} shown, {stats.dropped} dropped ({stats.dropped_late} late), latency p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms")


report(pipeline.run(on_progress=report, progress_every=1.0))  # Ctrl-C stops cleanly
