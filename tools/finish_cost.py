"""What the finishing stage costs per frame at a clip's own resolution (guard, smoother, polyps).

    python tools/finish_cost.py runs/clip1080.mp4 --frames 60           # smoothing off and on

At 1920x1080 this stage, not the model, set the live tail (bench's `finish_ms` against
`model_call_ms`), and on a GPU it runs on the host while the device waits. The model runs once
per frame first (untimed); then each smoothing setting finishes every frame twice, the second
pass timed, one frame at a time on this thread. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from syndiff_stream.backends import make_backend
from syndiff_stream.machine import cpu_facts
from syndiff_stream.model import Segmenter
from syndiff_stream.sources import SourceError, open_source
from syndiff_stream.stages import Stages, default_smoothing


def finish_ms(stages: Stages, items: list, probs: list) -> dict:
    for item, prob in zip(items, probs):  # warm: first calls allocate, the smoother fills its memory
        stages.finish(item, prob)
    times = []
    for item, prob in zip(items, probs):
        start = time.perf_counter()
        stages.finish(item, prob)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50": round(float(np.median(times)), 2), "p95": round(float(np.percentile(times, 95)), 2),
            "max": round(float(np.max(times)), 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a video file or any source spec `run` takes")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args(argv)
    seg = Segmenter.from_pretrained(args.model)
    backend = make_backend("eager", seg)
    try:
        frames = [frame for _, frame in zip(range(args.frames), open_source(args.source))]
    except SourceError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not frames:
        raise SystemExit(f"error: {args.source} gave no frames")
    reference = Stages(backend)
    items = [reference.preprocess(frame) for frame in frames]
    probs = [reference.infer([item])[0] for item in items]
    reference.close()
    report = {"source": args.source, "size": list(frames[0].shape), "frames": len(frames), "cpu": cpu_facts()["model"],
              "mask_share_max": round(max(float((p >= seg.config.threshold).mean()) for p in probs), 3)}
    for name, smooth in (("smoothing_off", False), ("smoothing_default", True)):
        report[f"finish_ms_{name}"] = finish_ms(Stages(backend, smoothing=default_smoothing(smooth, seg.config)),
                                                items, probs)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
