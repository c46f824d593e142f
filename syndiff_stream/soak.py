"""`syndiff-stream soak`: a long live run that watches for slow leaks and drift (a benchmark, not CI).

The real graph runs on a paced source (the demo scene at its own frame rate by default) with a
publisher and one subscriber that decodes every message, for `minutes`. Every `sample_every`
seconds a sample records resident memory, the frame rate and latency percentiles over the
interval since the previous sample, and the drop counters. The summary compares memory between
the first and the last samples and fits its slope over the second half of the run (warm-up
allocations excluded), which is what a leak shows up in.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import numpy as np

from .pipeline import Pipeline, Stats
from .publish import Publisher
from .subscribe import Subscriber


def rss_mb() -> float:
    """Resident memory now, from /proc/self/statm (Linux); elsewhere the peak (ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024


class Sampler:
    """`on_progress` callback for `Pipeline.run`: one sample per call, over the interval since the last."""

    def __init__(self, on_sample=None):
        self.samples: list[dict] = []
        self.on_sample = on_sample
        self.start = self.last_time = time.perf_counter()
        self.last_frames = 0

    def __call__(self, stats: Stats) -> None:
        now = time.perf_counter()
        new = stats.frames_out - self.last_frames
        recent = list(stats.latencies)[-new:] if new else []
        lat = np.asarray(recent) * 1000 if recent else np.full(1, np.nan)
        sample = {
            "t_s": round(now - self.start, 1), "rss_mb": round(rss_mb(), 1), "frames_out": stats.frames_out,
            "fps": round(new / (now - self.last_time), 2) if now > self.last_time else 0.0,
            "latency_ms": {q: round(float(np.percentile(lat, int(q[1:]))), 1) for q in ("p50", "p95", "p99")},
            "dropped": stats.dropped, "invalid": stats.invalid,
        }
        self.samples.append(sample)
        self.last_time, self.last_frames = now, stats.frames_out
        if self.on_sample:
            self.on_sample(sample)


def summarize(samples: list[dict]) -> dict:
    """Memory growth and slope (second half), frame-rate and latency spread over the samples."""
    if not samples:
        return {}
    t = np.array([s["t_s"] for s in samples])
    rss = np.array([s["rss_mb"] for s in samples])
    half = t >= t[-1] / 2
    slope = float(np.polyfit(t[half], rss[half], 1)[0]) * 3600 if half.sum() >= 3 else None
    fps = np.array([s["fps"] for s in samples])
    p99 = np.array([s["latency_ms"]["p99"] for s in samples])
    return {
        "rss_first_mb": float(rss[0]), "rss_last_mb": float(rss[-1]), "rss_max_mb": float(rss.max()),
        "rss_growth_mb": round(float(rss[-1] - rss[0]), 1),
        "rss_slope_mb_per_hour_second_half": None if slope is None else round(slope, 1),
        "fps_mean": round(float(fps.mean()), 2), "fps_min": round(float(fps.min()), 2),
        "latency_p50_ms_median": round(float(np.nanmedian([s["latency_ms"]["p50"] for s in samples])), 1),
        "latency_p99_ms_max": round(float(np.nanmax(p99)), 1) if np.isfinite(p99).any() else None,
    }


def run_soak(source, backend, minutes: float, sample_every: float = 10.0, smoothing=None,
             on_sample=None, on_start=None) -> dict:
    """Run for `minutes` (then stop cleanly), sampling every `sample_every` s; one JSON-ready dict.
    `on_start(pipeline)` lets the caller stop it early (signals)."""
    publisher = Publisher("tcp://127.0.0.1:*")
    subscriber = Subscriber(publisher.socket.last_endpoint.decode())
    publisher.wait_for_subscribers(1, timeout=10)
    received = [0]

    def drain():  # a real consumer: decodes every mask it gets
        while (msg := subscriber.recv(timeout=2.0)) is not None and msg.topic != "end":
            received[0] += 1

    reader = threading.Thread(target=drain, name="soak-subscriber", daemon=True)
    reader.start()
    pipeline = Pipeline(source, backend, [publisher], smoothing=smoothing)
    timer = threading.Timer(minutes * 60, pipeline.request_stop)
    sampler = Sampler(on_sample)
    if on_start:
        on_start(pipeline)
    timer.start()
    try:
        stats = pipeline.run(on_progress=sampler, progress_every=sample_every)
        if stats.frames_out > sampler.last_frames:  # the stretch since the last sample
            sampler(stats)
    finally:
        timer.cancel()
        reader.join(timeout=5)
        subscriber.close()
    return {
        "minutes": minutes, "source": source.source_id, "mode": stats.mode, "backend": backend.name,
        "device": str(backend.device), "input_size": backend.input_size, "sample_every_s": sample_every,
        "summary": summarize(sampler.samples), "final": stats.as_dict(), "received_by_subscriber": received[0],
        "missed_by_subscriber": subscriber.missed,
        "samples": sampler.samples,
    }
