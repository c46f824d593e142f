"""The pipeline's own share of live latency, measured without a GPU: a stand-in model call that
takes a fixed time and no CPU (what a GPU call is to the host thread that waits on it), real frames
at their real size, the real stage chain and live policy.

    python tools/live_budget.py --size 1920x1080 --fps 60 --model-ms 0,5,10

The GPU target (1920x1080, live p99 <= 20 ms capture to mask) is the model's call plus the host's
work around it: decoding and preparing (`wait_ms`), finishing (`finish_ms`: guard, smoother,
polyps, gate). This tool gives the second part on any machine, so it can be worked on where no GPU
is lent, and says what a model call may take. Each run replays the demo scene's first 32 frames
(rendered before the clock starts) as a live source; the stand-in returns the real model's
probabilities for each, computed beforehand, so finishing does the real work. Two settings:
`device_check` (smoothing and gating off, as tools/device_check.py measures the GPU) and `run`
(the `run` command's defaults: smoothing and alarm gating on).

Upper bound for a GPU host: here the prepared 256x256 input is made on the CPU (HostRunner), where
CudaRunner resizes on the GPU and the CPU only finds the field of view on a thumbnail and copies the
raw frame to pinned memory. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from syndiff_stream.backends import Backend, make_backend
from syndiff_stream.gating import GateConfig
from syndiff_stream.machine import cpu_facts
from syndiff_stream.model import Segmenter
from syndiff_stream.pipeline import Mode, Pipeline
from syndiff_stream.stages import Stages, default_smoothing

from device_check import REPLAYED, demo, parse_size  # the GPU check's replayed demo scene, its sizes

SETTINGS = {"device_check": (False, GateConfig.off), "run": (True, GateConfig)}


def fingerprint(x: np.ndarray) -> bytes:
    """A prepared input's key: a sparse grid of its values (a few kB, cheap beside a frame)."""
    return x[:, ::16, ::16].tobytes()


class StandIn(Backend):
    """A model call of `ms` milliseconds that leaves the CPU to the rest of the pipeline (it sleeps),
    returning the probabilities the real model gave for the same prepared input."""

    name = "stand-in"

    def __init__(self, seg: Segmenter, ms: float, probabilities: dict[bytes, np.ndarray]):
        super().__init__(seg, "cpu")
        blank = np.zeros((3, self.input_size, self.input_size), np.float32)  # the runner's warm-up input
        self.ms, self.probabilities = ms, {fingerprint(blank): blank[0], **probabilities}

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            out = np.stack([self.probabilities[fingerprint(x)] for x in batch.numpy()])[:, None]
        except KeyError:
            raise RuntimeError("stand-in: an input that was not prepared beforehand") from None
        time.sleep(max(0.0, self.ms / 1000 - (time.perf_counter() - start)))
        return torch.from_numpy(out)


def real_probabilities(seg: Segmenter, size: tuple[int, int], fps: float, backend_name: str) -> dict[bytes, np.ndarray]:
    stages = Stages(make_backend(backend_name, seg))
    try:
        out = {}
        for frame in demo(size, REPLAYED, fps=fps):  # the frames a live run replays
            item = stages.preprocess(frame)
            out[fingerprint(item.x)] = stages.infer([item])[0]
        return out
    finally:
        stages.close()


def live_run(seg: Segmenter, backend: Backend, size, frames: int, fps: float, setting: str) -> dict:
    smooth, gate = SETTINGS[setting]
    stages = Stages(backend, smoothing=default_smoothing(smooth, seg.config), gating=gate())
    stats = Pipeline(demo(size, frames, realtime=True, fps=fps), backend, mode=Mode.LIVE, stages=stages).run().as_dict()
    keep = ("latency_ms", "wait_ms", "model_call_ms", "finish_ms", "inter_arrival_ms", "dropped", "e2e_fps")
    return {k: stats[k] for k in keep}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--size", default="1920x1080", help="frame size WxH")
    parser.add_argument("--fps", type=float, default=60.0, help="pace of the live source")
    parser.add_argument("--frames", type=int, default=300, help="frames per live run")
    parser.add_argument("--model-ms", default="0,5,10", help="stand-in call times in ms, comma-separated")
    parser.add_argument("--settings", default="device_check,run", help=f"any of {', '.join(SETTINGS)}")
    parser.add_argument("--backend", default="onnx", help="what computes the probabilities beforehand")
    args = parser.parse_args(argv)
    size = parse_size(args.size, "--size")
    settings = args.settings.split(",")
    if unknown := [s for s in settings if s not in SETTINGS]:
        raise SystemExit(f"error: --settings {','.join(unknown)}: not one of {', '.join(SETTINGS)}")
    try:
        times = [float(t) for t in args.model_ms.split(",")]
    except ValueError:
        raise SystemExit(f"error: --model-ms {args.model_ms!r}: expected milliseconds, e.g. 0,5,10") from None
    seg = Segmenter.from_pretrained(args.model)
    probabilities = real_probabilities(seg, size, args.fps, args.backend)
    rows = []
    for ms in times:
        for setting in settings:
            row = {"model_ms": ms, "setting": setting,
                   **live_run(seg, StandIn(seg, ms, probabilities), size, args.frames, args.fps, setting)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"size": args.size, "fps": args.fps, "frames": args.frames, "cpu": cpu_facts(),
                      "cores": os.cpu_count(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
