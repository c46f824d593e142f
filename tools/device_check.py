"""The prepared device check: one command that measures the GPU path when a GPU is lent.

    python tools/device_check.py --device cuda --out device-check.json       # on the GPU
    python tools/device_check.py --device cpu --sizes 72x90 --frames 4        # here, so it cannot rot

For every frame size and variant (backend x precision) it measures, on the demo scene:
  parity      per-frame Dice of the variant's masks against CPU eager fp32 (the reference), through
              the stage chain (on CUDA: CudaRunner with the device preprocess); ok when >= 0.99
  recorded    end-to-end and model fps of the real pipeline in recorded mode (CudaRunner on CUDA:
              pinned buffers, three streams) and of a plain loop (prepare on the CPU, upload,
              infer, download, one frame at a time), after warm-up, the device synchronised
  live        capture-to-mask latency p50/p95/p99 and drops in live mode, batch 1, the source paced
              at --live-fps, and its parts (wait before the call, the call, finishing)
  presets     (--presets) model time alone per preset, batch 1, fp32 and fp16: the Pareto table's
              GPU column
Variants: eager | compile (inductor) | cudagraphs (inductor, mode reduce-overhead: CUDA graphs),
each at fp32 | fp16 | bf16 (autocast). TensorRT is not measured: its libraries are too large to
carry to a lent device. Prints one JSON object; exit status 1 when any parity is below 0.99.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from syndiff_stream.backends import Backend, CompileBackend, EagerBackend, pick_device
from syndiff_stream.benchmark import device_name, sync
from syndiff_stream.frames import Mode
from syndiff_stream.metrics import dice
from syndiff_stream.model import Segmenter
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.preprocess import prepare
from syndiff_stream.sources import DemoSource
from syndiff_stream.stages import Stages

PARITY_MIN = 0.99
DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS = {"fps_1920x1080": 60, "live_p99_ms": 20}  # on an H100 (issue 11); reported, never asserted


class Autocast(Backend):
    """Another backend's `infer` under torch.autocast at fp16/bf16; probabilities back in fp32."""

    def __init__(self, inner: Backend, dtype: torch.dtype):
        self.inner, self.dtype = inner, dtype
        self.seg, self.device, self.input_size = inner.seg, inner.device, inner.input_size
        self.name = f"{inner.name}-{str(dtype).removeprefix('torch.')}"

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.inner.infer(batch).float()


def make_variant(spec: str, seg: Segmenter, device: str) -> Backend:
    kind, _, precision = spec.partition(":")
    if precision not in DTYPES:
        raise SystemExit(f"variant {spec!r}: precision must be one of {', '.join(DTYPES)}")
    if kind == "eager":
        backend = EagerBackend(seg, device)
    elif kind in ("compile", "cudagraphs"):
        backend = CompileBackend(seg, device, mode="reduce-overhead" if kind == "cudagraphs" else None)
    else:
        raise SystemExit(f"variant {spec!r}: backend must be eager, compile or cudagraphs")
    return Autocast(backend, DTYPES[precision]) if DTYPES[precision] else backend


REPLAYED = 32  # distinct demo frames a run renders once, then replays


def demo(size, frames: int, realtime: bool = False, fps: float = 30.0) -> DemoSource:
    """32 frames rendered once, then replayed: at 1920x1080 the renderer alone (about 34 fps on one
    core) bounded the first GPU run's end-to-end figure."""
    return DemoSource(size=size, realtime=realtime, fps=fps, frames=frames, seed=7, loop=REPLAYED)


def masks_through_chain(backend: Backend, size, frames: int) -> list[np.ndarray]:
    stages = Stages(backend)  # smoothing off: frame-by-frame masks, the guard, the runner of this device
    try:
        return [stages(frame).mask for frame in demo(size, frames)]
    finally:
        stages.close()


def plain_loop_fps(backend: Backend, size, frames: int) -> float:
    images = [f.image for f in demo(size, frames)]
    sync(backend.device)
    start = time.perf_counter()
    for image in images:
        backend.infer_numpy(torch.from_numpy(prepare(image, backend.input_size)[0][None]))
    sync(backend.device)
    return round(len(images) / (time.perf_counter() - start), 2)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(spec: str, seg: Segmenter, device: str, size, reference: list[np.ndarray], args) -> dict:
    backend = make_variant(spec, seg, device)
    graphs = [compiled_graphs()]
    backend.warmup((1, 4))  # compilation and allocation before any clock starts
    graphs.append(compiled_graphs())
    scores = [dice(m, r) for m, r in zip(masks_through_chain(backend, size, len(reference)), reference)]
    graphs.append(compiled_graphs())
    recorded = Pipeline(demo(size, args.frames), backend, mode=Mode.RECORDED).run().as_dict()
    graphs.append(compiled_graphs())
    live = Pipeline(demo(size, args.frames, realtime=True, fps=args.live_fps), backend, mode=Mode.LIVE).run().as_dict()
    graphs.append(compiled_graphs())
    return {
        # a compiled variant that builds graphs after warm-up (a new batch size, a failed guard)
        # pays for it inside the figures: the counts say where (warm-up, parity, recorded, live)
        "graphs_compiled": dict(zip(("warmup", "parity", "recorded", "live"), np.diff(graphs).tolist())),
        "variant": spec, "size": f"{size[1]}x{size[0]}",
        "parity_dice_min": round(min(scores), 4), "parity_dice_mean": round(float(np.mean(scores)), 4),
        "parity_ok": min(scores) >= PARITY_MIN,
        "recorded_e2e_fps": recorded["e2e_fps"], "recorded_model_fps": recorded["model_fps"],
        "runner": "CudaRunner" if backend.device.type == "cuda" else "HostRunner",
        "plain_loop_fps": plain_loop_fps(backend, size, args.frames),
        "live_fps": args.live_fps, "live_latency_ms": live["latency_ms"],
        # where a live percentile goes: capture -> call (decode, preprocess, buffer), the call, finishing
        "live_parts_ms": {k: live[k] for k in ("wait_ms", "model_call_ms", "finish_ms")},
        "live_dropped": live["dropped"],
        "live_frames": live["frames"],
    }


def preset_model_ms(preset: str, device: str, iters: int) -> dict:
    """Model time of one frame (batch 1, input already on the device) of a freshly initialised
    preset: speed does not depend on the weights, so presets without a trained checkpoint are timed
    too (the Pareto table's GPU column)."""
    from syndiff_stream.model import preset_config

    seg = Segmenter(preset_config(preset))
    row = {"preset": preset, "params": seg.num_parameters(), "input_size": seg.config.image_size}
    for spec in ("eager:fp32", "eager:fp16"):
        backend = make_variant(spec, seg, device)
        x = torch.zeros(1, 3, seg.config.image_size, seg.config.image_size, device=backend.device)
        times = []
        with torch.inference_mode():
            for i in range(iters + 10):  # ten warm-up passes
                sync(backend.device)
                start = time.perf_counter()
                backend.infer(x)
                sync(backend.device)
                if i >= 10:
                    times.append(time.perf_counter() - start)
        row[f"{spec.split(':')[1]}_ms_median"] = round(float(np.median(times)) * 1000, 3)
    return row


def parse_size(text: str, flag: str = "--sizes") -> tuple[int, int]:
    """(H, W) from WxH."""
    w, _, h = text.partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise SystemExit(f"error: {flag} {text!r}: expected WIDTHxHEIGHT, e.g. 1920x1080")
    return int(h), int(w)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cuda | cpu | auto")
    parser.add_argument("--model", default=os.environ.get("SYNDIFF_MODEL"), help="default: the shipped checkpoint")
    parser.add_argument("--sizes", default="720x576,1920x1080", help="frame sizes WxH, comma-separated")
    parser.add_argument("--variants", default=None, help="e.g. eager:fp32,compile:fp16 (default: all that fit the device)")
    parser.add_argument("--frames", type=int, default=300, help="frames per throughput and latency run")
    parser.add_argument("--parity-frames", type=int, default=16, help="frames compared with CPU eager")
    parser.add_argument("--live-fps", type=float, default=60.0, help="pace of the live source")
    parser.add_argument("--presets", default="", help="also time these presets' model alone, e.g. tiny,compact,large")
    parser.add_argument("--preset-iters", type=int, default=200, help="timed passes per preset and precision")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    default = ("eager:fp32,eager:fp16,eager:bf16,compile:fp32,compile:fp16,cudagraphs:fp16" if device != "cpu"
               else "eager:fp32,eager:bf16,compile:fp32")
    seg = Segmenter.from_pretrained(args.model)
    presets = []
    for preset in filter(None, args.presets.split(",")):
        presets.append(preset_model_ms(preset, device, args.preset_iters))
        print(json.dumps(presets[-1]), file=sys.stderr, flush=True)
    rows = []
    for size in map(parse_size, args.sizes.split(",")):
        reference = masks_through_chain(EagerBackend(Segmenter.from_pretrained(args.model), "cpu"), size,
                                        args.parity_frames)
        for spec in (args.variants or default).split(","):
            rows.append(measure(spec, seg, device, size, reference, args))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {"device": device_name(torch.device(device)), "torch": torch.__version__,
              "cuda": torch.version.cuda, "model_params": seg.num_parameters(), "input_size": seg.config.image_size,
              "targets_h100": TARGETS, "tensorrt": "not measured: TensorRT's libraries are too large to carry",
              "parity_ok": all(r["parity_ok"] for r in rows), "presets": presets, "rows": rows}
    text = json.dumps(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    print(text)
    return 0 if report["parity_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
