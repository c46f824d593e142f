"""`syndiff-stream bench`: an honest measurement of the streaming pipeline.

Warm up first (compilation, allocation, ONNX session set-up happen before the clock starts);
synchronise the GPU before reading clocks; time the real graph (decode, preprocess, backend,
smoothing off, polyps, a ZeroMQ publisher with no subscriber) and report what was measured.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from types import SimpleNamespace

import numpy as np
import torch

from .backends import Backend
from .frames import LivePolicy, Mode
from .machine import ceiling
from .model import Segmenter
from .pipeline import Pipeline
from .preprocess import prepare
from .smoothing import SmoothingConfig, evaluate_smoothing
from .sources import Source, SourceError
from .stages import Stages


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(seg: Segmenter, x: torch.Tensor, steps: int, repeats: int = 1, warmup: bool = True) -> float:
    """Frames per second of `steps`-step inference, one frame at a time (after one warm-up call)."""
    device = x.device

    def once(frame):
        return seg.predict_proba(frame) if steps == 1 else seg.predict_proba_multistep(frame, steps)

    if warmup:
        once(x[:1])
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(len(x)):
            once(x[i:i + 1])
    sync(device)
    return repeats * len(x) / (time.perf_counter() - start)


def throughput(backend: Backend, x: torch.Tensor, seconds: float = 1.0, min_calls: int = 2) -> float:
    """Frames per second of the model alone, run as the pipeline runs it: the backend's runner
    (`backend.workers` batches in flight, one per core with ONNX Runtime on CPU), each call the
    batch `x`, a new call submitted as soon as the oldest is collected (in order, as the pipeline
    collects), after one warm-up call per worker; timed for about `seconds` (at least `min_calls`
    calls per worker). The CPU paths' probe and tools/speed_paths.py both measure with it."""
    from .engine import HostRunner

    runner = HostRunner(backend)  # host arrays in and out, on any device
    depth = runner.depth
    items = [SimpleNamespace(x=row) for row in x.cpu().numpy()]
    try:
        for handle in [runner.submit(items) for _ in range(depth)]:  # warm-up, untimed
            handle.result()
        calls, start = 0, time.perf_counter()
        deadline = start + seconds
        in_flight = deque(runner.submit(items) for _ in range(depth))
        while in_flight:
            in_flight.popleft().result()
            calls += 1
            if calls + len(in_flight) < min_calls * depth or time.perf_counter() < deadline:
                in_flight.append(runner.submit(items))
        sync(backend.device)
        return calls * len(x) / (time.perf_counter() - start)
    finally:
        runner.close()


def model_alone(backend: Backend, source: Source, batch: int, seconds: float = 2.0) -> float | None:
    """The model's frames a second with the cores to itself: the source's first `batch` frames,
    prepared beforehand, run as the pipeline runs them (`throughput`). Inside the pipeline the
    model shares the cores with decoding and finishing, so the pipeline's own `model_fps` cannot
    say whether the model is near the machine's ceiling; this can."""
    images = first_images(source, batch)
    return throughput(backend, prepared_batch(images, backend.input_size), seconds) if images else None


def first_images(source: Source, n: int) -> list[np.ndarray]:
    """The images of the source's first `n` frames; the source is closed after them."""
    images = [f.image for f in islice(source, n)]
    source.close()
    return images


def prepared_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Images as the model's input batch (N, 3, size, size), prepared as the pipeline prepares them."""
    return torch.from_numpy(np.stack([prepare(im, size)[0] for im in images]))


def _check_comparison(images: list, rounds: int) -> None:
    if not images:
        raise ValueError("the source gave no frames to compare on")
    if rounds < 1:
        raise ValueError(f"--compare-rounds must be >= 1, got {rounds}")


def _median_ratio(a, b, digits: int) -> tuple[float, list[float]]:
    """Per-round ratios a / b of interleaved timings: their median, and their range."""
    ratios = np.array(a) / np.array(b)
    return round(float(np.median(ratios)), digits), [round(float(ratios.min()), digits), round(float(ratios.max()), digits)]


def compare_step_counts(seg: Segmenter, source: Source, steps: int, frames: int = 3, rounds: int = 5) -> dict:
    """Single step vs `steps`-step DDIM on the same frames, both eager PyTorch, in this run.

    Both are warmed up, then timed in `rounds` interleaved rounds (load that comes and goes on a
    shared machine hits both alike); the speedup is the median of the rounds' ratios, reported
    with their range, so a reader sees how far one number can be trusted."""
    size = seg.config.image_size
    images = first_images(source, frames)
    _check_comparison(images, rounds)
    device = next(seg.parameters()).device
    x = prepared_batch(images, size).to(device)
    time_steps(seg, x[:1], 1, repeats=2)  # warm-up of both paths, untimed
    time_steps(seg, x[:1], steps, warmup=False)
    single, multi = [], []
    for _ in range(rounds):
        single.append(time_steps(seg, x, 1, repeats=5, warmup=False))
        multi.append(time_steps(seg, x, steps, warmup=False))
    speedup, spread = _median_ratio(single, multi, 2)
    return {"compare_steps": steps, "compare_backend": "eager", "compare_frames": len(images),
            "compare_repeats": rounds, "single_step_fps": round(float(np.median(single)), 2),
            "multistep_fps": round(float(np.median(multi)), 3), "speedup": speedup, "speedup_range": spread}


def compare_models(backends: dict[str, Backend], source: Source, frames: int = 8, rounds: int = 5) -> dict:
    """Model time per frame of several checkpoints on the same frames, side by side in this run.

    Each backend (same kind and thread count as the main one) runs its own preprocessing and
    runner, one frame at a time, after a warm-up; the models take turns in `rounds` interleaved
    rounds so that load on a shared machine hits them alike. Reported per model: parameters,
    median ms per frame and its ratio to the first (the benchmarked) model, ratio range."""
    images = list(islice(source, frames))
    source.close()
    _check_comparison(images, rounds)
    for b in backends.values():  # one call at a time, every thread for it; the pipeline run before
        b.configure(1)           # may have left the benchmarked backend split into per-core sessions
    stages = {name: Stages(b) for name, b in backends.items()}
    prepared = {name: [st.preprocess(f) for f in images] for name, st in stages.items()}
    try:
        for name, st in stages.items():  # warm-up, untimed
            st.infer(prepared[name][:1])
        times: dict[str, list[float]] = {name: [] for name in stages}
        for _ in range(rounds):
            for name, st in stages.items():
                sync(backends[name].device)
                start = time.perf_counter()
                for item in prepared[name]:
                    st.infer([item])
                sync(backends[name].device)
                times[name].append(1000 * (time.perf_counter() - start) / len(images))
    finally:
        for st in stages.values():
            st.close()
    first = next(iter(times))
    out = {}
    for name, ms in times.items():
        ratio, spread = _median_ratio(ms, times[first], 3)
        out[name] = {"params": backends[name].seg.num_parameters(), "ms_per_frame": round(float(np.median(ms)), 2),
                     "ratio": ratio, "ratio_range": spread}
    return {"compare_models": out, "compare_models_frames": len(images), "compare_models_rounds": rounds}


def run_benchmark(seg: Segmenter, backend: Backend, make_source: Callable[[], Source], frames: int = 200,
                  mode: Mode | None = None, batch_size: int | None = None, compare_steps: int = 0,
                  compare_frames: int = 3, compare_rounds: int = 5, smoothing: SmoothingConfig | None = None,
                  live: LivePolicy | None = None, compare_backends: dict[str, Backend] | None = None,
                  alone_seconds: float = 2.0) -> dict:
    """One JSON-ready dict; `make_source` is called once per measurement (each needs fresh frames).
    After the pipeline run the model is timed alone for `alone_seconds` (0: not), for the ceiling
    block's `model_alone_*` figures."""
    from .publish import Publisher  # here: the timing helpers above serve hosts without ZeroMQ (a lent GPU)

    source = make_source()
    pipeline = Pipeline(source, backend, [Publisher("tcp://127.0.0.1:*")], mode=mode,
                        batch_size=batch_size, max_frames=frames, live=live)
    stats = pipeline.run()  # warms the backend up before its first frame
    sync(backend.device)
    report = {
        "device": device_name(backend.device), "backend": backend.name, "model_params": seg.num_parameters(),
        "tta": seg.config.tta_flip,
        "input_size": backend.input_size, "source": source.source_id, "batch": pipeline.batch_size,
        **stats.as_dict(), "torch_threads": torch.get_num_threads(),
        "cpu_path": backend.cpu_path, "cpu_path_choice": backend.choice,
    }
    threads = getattr(backend, "threads", None) or torch.get_num_threads()
    alone, why_not = None, None
    if alone_seconds > 0:
        try:
            alone = model_alone(backend, make_source(), pipeline.batch_size, alone_seconds)
        except SourceError as exc:  # a stream that will not open twice: keep what the run measured
            why_not = str(exc)
    report["ceiling"] = ceiling(seg, threads, report["model_fps"], report["e2e_fps"], backend.device, alone)
    if why_not:
        report["ceiling"]["model_alone_skipped"] = why_not
    if compare_steps:
        report.update(compare_step_counts(seg, make_source(), compare_steps, compare_frames, compare_rounds))
    if compare_backends:
        report.update(compare_models({"model": backend, **compare_backends}, make_source(), rounds=compare_rounds))
    if smoothing is not None:
        stages = Stages(backend)  # the pipeline's preprocess and runner, one frame at a time

        def predict(frame):
            item = stages.preprocess(frame)
            return stages.infer([item])[0], item.fov

        report["smoothing"] = evaluate_smoothing(islice(make_source(), frames), predict, smoothing,
                                                 seg.config.threshold).as_dict()
    return report

