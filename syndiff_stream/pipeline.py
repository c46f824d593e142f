"""The streaming graph, wired in one place:

    source -> preprocess -> [frame buffer: recorded | live] -> backend -> smoother -> polyps -> gate -> sinks

Threads overlap the work: decode (source + CPU preprocessing), inference (takes a batch from the
buffer only when a slot is free, and submits it: on CUDA, two batches in flight on separate
streams; on CPU with ONNX Runtime, one single-threaded call per core, in both modes), collect
(waits for the oldest batch in flight, so results leave in order, and frees its slot), and the
calling thread (smoothing, postprocessing, sinks and the publisher). The frame buffer is the only
place frames are dropped, by the named policy of the mode; the queue after inference always applies
backpressure, so a slow sink slows inference down instead of losing results silently.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from .backends import Backend
from .engine import Prepared, Preprocessor, make_runner
from .frames import Closed, FrameBuffer, LivePolicy, Mode, Result
from .gating import GateConfig
from .smoothing import SmoothingConfig
from .sources import Source
from .stages import Stages

LATENCY_WINDOW = 10_000  # latency percentiles over the most recent frames: memory stays flat
_END = object()


@dataclass
class Stats:
    """Counters and timings of one run; `as_dict` gives the rates the CLI and `bench` print."""

    mode: str = ""
    frames_in: int = 0  # frames taken from the source
    frames_out: int = 0  # results through every stage
    dropped: int = 0  # frames dropped by the live buffer: dropped_late + dropped_capacity
    dropped_late: int = 0  # older than the latency budget when inference came for them
    dropped_capacity: int = 0  # the pipeline could not keep up: a full buffer's oldest, a standing queue cut
    latency_budget_s: float | None = None  # live mode's budget (None in recorded mode)
    decode_s: float = 0.0  # time in the source (decoding / rendering), without live pacing
    preprocess_s: float = 0.0
    model_s: float = 0.0  # time inside the backend (wall time of the inference stage on CUDA)
    model_frames: int = 0
    wall_s: float = 0.0  # first frame requested -> last result out
    scene_cuts: int = 0
    skipped: int = 0  # undecodable packets/frames the source skipped
    invalid: int = 0  # frames whose model output had NaN/inf: published empty, flagged invalid
    reconnects: int = 0  # live source reconnections
    disconnected_s: float = 0.0  # total time a live source was disconnected
    source_lost: bool = False  # a live source did not come back within its reconnect timeout
    interrupted: bool = False
    source_size: tuple[int, int] | None = None  # (H, W) of the latest frame
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)
    # per inference call, submit -> result: what one frame (batch) costs the model, in flight
    model_latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)
    # capture -> inference call submitted (decode, preprocess, the buffer's wait) and the finishing
    # stage's own time (guard, smoother, polyps): with model_latencies they place a latency
    # percentile (latency = wait + model call + the collect queue + finish)
    waits: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)
    finishes: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)
    # gaps between consecutive capture times: the source's arrival jitter (bursts show as a p50 near
    # zero with a p95 of several frame intervals)
    inter_arrival: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)

    @staticmethod
    def _rate(n: int, seconds: float) -> float:
        return round(n / seconds, 2) if seconds > 0 else 0.0

    @staticmethod
    def _percentiles(seconds: deque) -> dict:
        ms = np.asarray(seconds) * 1000 if seconds else np.zeros(1)
        return {q: round(float(np.percentile(ms, int(q[1:]))), 2) for q in ("p50", "p95", "p99")}

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "source_size": list(self.source_size or ()), "frames": self.frames_in, "frames_out": self.frames_out,
            "decode_fps": self._rate(self.frames_in, self.decode_s),
            "preprocess_fps": self._rate(self.frames_in, self.preprocess_s),
            "model_fps": self._rate(self.model_frames, self.model_s),
            "e2e_fps": self._rate(self.frames_out, self.wall_s),
            "latency_ms": self._percentiles(self.latencies),
            "model_call_ms": self._percentiles(self.model_latencies),
            "wait_ms": self._percentiles(self.waits), "finish_ms": self._percentiles(self.finishes),
            "inter_arrival_ms": self._percentiles(self.inter_arrival),
            "dropped": self.dropped, "dropped_late": self.dropped_late, "dropped_capacity": self.dropped_capacity,
            "latency_budget_ms": None if self.latency_budget_s is None else round(self.latency_budget_s * 1000, 1),
            "scene_cuts": self.scene_cuts,
            "skipped": self.skipped, "invalid": self.invalid, "reconnects": self.reconnects,
            "disconnected_s": round(self.disconnected_s, 3), "source_lost": self.source_lost,
        }

    def state(self) -> dict:
        """What a heartbeat reports: counters that show a live run is healthy, or why not."""
        d = self.as_dict()
        return {k: d[k] for k in ("frames", "frames_out", "dropped", "dropped_late", "dropped_capacity", "skipped",
                                  "invalid", "reconnects", "disconnected_s")}


class Pipeline:
    def __init__(self, source: Source, backend: Backend, sinks: Sequence = (), *, mode: Mode | str | None = None,
                 smoothing: SmoothingConfig | None = None, batch_size: int | None = None,
                 buffer_size: int | None = None, max_frames: int | None = None,
                 preprocess: Preprocessor | None = None, heartbeat_every: float = 1.0,
                 stages: Stages | None = None, gating: GateConfig | None = None, live: LivePolicy | None = None):
        """`smoothing=None` keeps the model's per-frame masks (prob >= threshold); `batch_size`
        defaults to 4 in recorded mode and 1 in live mode (batching adds latency); `live` is live
        mode's drop policy (latency budget, capacity; `buffer_size` overrides its capacity); `preprocess`
        replaces the default stage (e.g. a calibration profile's ProfilePreprocessor); `stages` gives
        the whole chain instead (`Stages.for_profile`), then `preprocess`, `smoothing` and `gating` are
        unused; `gating=None` reports every polyp at once (`GateConfig.off()`); sinks with a
        `status(dict)` method (the publisher) get the run's state every `heartbeat_every` seconds."""
        self.mode = Mode(mode) if mode else source.default_mode
        self.live = live or LivePolicy()
        is_live = self.mode is Mode.LIVE
        self.batch_size = batch_size or (1 if is_live else 4)
        self.max_frames = max_frames
        # ---- the graph: the stage chain (stages.py) on three threads, plus buffer and sinks ------
        self.source = source
        self.stages = stages or Stages(backend, preprocess, smoothing, gating)
        self.preprocess = self.stages.preprocess
        fps = nominal_fps(source)
        budget = self.live.budget_s(fps) if is_live else None
        capacity = buffer_size or (self.live.capacity_for(fps) if is_live else 2 * self.batch_size)
        self.buffer = FrameBuffer(capacity, self.mode, max_age=budget or float("inf"))
        # As many calls in flight as the backend runs well at once: on CPU with ONNX Runtime one
        # single-threaded call per core, which beats one call on every thread for throughput and,
        # as soon as frames come faster than one call takes, for latency too. Results stay in order.
        backend.configure(backend.max_workers)
        self.runner = make_runner(backend)
        self.smoother = self.stages.smoother
        self.sinks = list(sinks)
        # ----------------------------------------------------------------------------------------
        self.backend = backend
        self.results: queue.Queue = queue.Queue(maxsize=2 * self.batch_size * self.runner.depth)
        self.stats = Stats(mode=self.mode.value, latency_budget_s=budget)
        self._slots = threading.Semaphore(self.runner.depth)  # batches in flight
        self._pending: queue.Queue = queue.Queue()  # (items, handle, t0) in submission order
        self.stop = threading.Event()
        self.stop_requested = threading.Event()  # set by `request_stop` (signals, soak timer)
        self.heartbeat_every = heartbeat_every
        self.errors: list[BaseException] = []
        self._last_done = 0.0

    def describe(self) -> str:
        smooth = self.smoother.config.describe()
        sinks = ", ".join(type(s).__name__ for s in self.sinks) or "none"
        budget = (f", budget {self.stats.latency_budget_s * 1000:.0f} ms"
                  if self.stats.latency_budget_s is not None else "")
        return (f"{self.source.source_id} -> preprocess {self.backend.input_size}px -> {self.mode.value} buffer "
                f"({self.buffer.capacity}{budget}) -> {self.backend.name} on {self.backend.device} (batch {self.batch_size}"
                f"{f' x {self.runner.depth} in flight' if self.runner.depth > 1 else ''}) "
                f"-> smoothing {smooth} -> polyps -> gating {self.stages.gate.config.describe()} -> {sinks}")

    # ---- stage loops ----------------------------------------------------------------------------
    def _decode(self) -> None:
        stats, clock = self.stats, getattr(self.source, "clock", None)
        try:
            frames = iter(self.source)
            while not self.stop.is_set() and (self.max_frames is None or stats.frames_in < self.max_frames):
                t0, slept0 = time.perf_counter(), clock.slept if clock else 0.0
                frame = next(frames, None)
                t1 = time.perf_counter()
                if frame is None:
                    break
                item = self.preprocess(frame)
                stats.decode_s += t1 - t0 - ((clock.slept - slept0) if clock else 0.0)
                stats.preprocess_s += time.perf_counter() - t1
                stats.frames_in += 1
                self.buffer.put(item, frame.capture_time)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.buffer.close()

    def _emit(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.results.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _take_slot(self) -> bool:
        while not self.stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return True
        return False

    def _infer(self) -> None:
        """Take frames only when a slot is free, so live mode hands the model the freshest frames
        still within budget, not ones grabbed early to wait for a busy core."""
        try:
            while self._take_slot():
                try:
                    batch = self.buffer.get_batch(self.batch_size, timeout=0.1)
                except Closed:
                    self._slots.release()
                    break
                if not batch:
                    self._slots.release()
                    continue
                for i, (_, same_shape) in enumerate(groupby(batch, key=lambda item: item.frame.shape)):
                    if i and not self._take_slot():
                        return
                    items = list(same_shape)
                    submitted = time.time()
                    self.stats.waits.extend(submitted - item.frame.capture_time for item in items)
                    t0 = time.perf_counter()
                    self._pending.put((items, self.runner.submit(items), t0))
        except BaseException as exc:
            self.errors.append(exc)
            self.stop.set()
        finally:
            self._pending.put(_END)

    def _collect_loop(self) -> None:
        """Results in submission order, each as soon as it and those before it are done."""
        try:
            while not self.stop.is_set():
                entry = self._pending.get()
                if entry is _END:
                    break
                self._collect(entry)
                self._slots.release()
        except BaseException as exc:
            self.errors.append(exc)
            self.stop.set()
        finally:
            if self.stop.is_set():
                with suppress(queue.Full):
                    self.results.put_nowait(_END)
            else:
                self._emit(_END)

    def _collect(self, entry) -> None:
        items, handle, t0 = entry
        prob = handle.result()
        now = time.perf_counter()
        # Busy time of the inference stage: with batches overlapping, count each second once.
        self.stats.model_s += now - max(t0, self._last_done)
        self.stats.model_latencies.append(now - t0)
        self._last_done = now
        self.stats.model_frames += len(items)
        for item, p in zip(items, prob):
            self._emit((item, p))

    def _finish(self, item: Prepared, prob: np.ndarray) -> Result:
        return self.stages.finish(item, prob)

    # ---- run ------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop soon and cleanly (safe from a signal handler or another thread): `run` returns
        with `interrupted` set after closing every output."""
        self.stop_requested.set()
        getattr(self.source, "interrupt", lambda: None)()

    def run(self, on_progress: Callable[[Stats], None] | None = None, progress_every: float = 0.5) -> Stats:
        """Process the source to its end (or `max_frames`, Ctrl-C, `request_stop`); close the sinks;
        return stats. Errors in any stage stop the graph and are re-raised here, and then the file
        sinks discard their unfinished files instead of finalising them (`abort`)."""
        stats = self.stats
        try:
            self.runner.warmup(range(1, self.batch_size + 1))  # the buffer hands over any size up to it
        except BaseException:  # a backend that cannot run: close what was opened, keep nothing half-written
            self.runner.close()
            self._close_sinks(failed=True)
            self.source.close()
            raise
        start = last_report = last_beat = time.perf_counter()
        threads = [threading.Thread(target=self._decode, name="decode", daemon=True),
                   threading.Thread(target=self._infer, name="infer", daemon=True),
                   threading.Thread(target=self._collect_loop, name="collect", daemon=True)]
        for t in threads:
            t.start()
        try:
            while not self.stop_requested.is_set():
                try:
                    entry = self.results.get(timeout=0.1)
                except queue.Empty:
                    entry = None
                if entry is _END or (entry is None and not threads[-1].is_alive() and self.results.empty()):
                    break
                if entry is not None:
                    t0 = time.perf_counter()
                    result = self._finish(*entry)
                    stats.finishes.append(time.perf_counter() - t0)
                    for sink in self.sinks:
                        sink.write(result)
                    stats.frames_out += 1
                    stats.source_size = result.frame.shape
                    stats.latencies.append(result.latency)
                    stats.wall_s = time.perf_counter() - start
                now = time.perf_counter()
                if on_progress and now - last_report >= progress_every:
                    self._refresh()
                    on_progress(stats)
                    last_report = now
                if now - last_beat >= self.heartbeat_every:
                    self._heartbeat()
                    last_beat = now
            stats.interrupted = self.stop_requested.is_set()
        except KeyboardInterrupt:
            stats.interrupted = True
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.stop.set()
            self.buffer.close()
            getattr(self.source, "interrupt", lambda: None)()
            for t in threads:
                t.join(timeout=10)
            self.runner.close()
            self._refresh()
            with suppress(Exception):  # the last word on the state: "ended" or "lost"
                self._heartbeat(final=True)
            self._close_sinks(failed=bool(self.errors))
            self.source.close()
        if self.errors:
            raise self.errors[0]
        return stats

    def _heartbeat(self, final: bool = False) -> None:
        self._refresh()
        state = getattr(self.source, "state", "streaming")
        state = {"state": state if not final or state == "lost" else "ended", "source_id": self.source.source_id,
                 "time": time.time(), **self.stats.state()}
        for sink in self.sinks:
            if hasattr(sink, "status"):
                sink.status(state)

    def _close_sinks(self, failed: bool) -> None:
        """Close every sink even when one fails (a full disk must not leave the others open);
        after a failure, sinks that can discard their unfinished files do so."""
        for sink in self.sinks:
            try:
                (sink.abort if failed and hasattr(sink, "abort") else sink.close)()
            except Exception as exc:
                self.errors.append(exc)

    def _refresh(self) -> None:
        source = self.source
        self.stats.skipped = getattr(source, "skipped", 0)
        self.stats.reconnects = getattr(source, "reconnects", 0)
        self.stats.disconnected_s = getattr(source, "disconnected_s", 0.0)
        self.stats.source_lost = getattr(source, "lost", False)
        self.stats.dropped = self.buffer.dropped
        self.stats.dropped_late, self.stats.dropped_capacity = self.buffer.dropped_late, self.buffer.dropped_capacity
        self.stats.inter_arrival = deque(self.buffer.arrivals(), maxlen=LATENCY_WINDOW)
        self.stats.scene_cuts = self.smoother.cuts
        self.stats.invalid = self.stages.invalid


def nominal_fps(source: Source) -> float | None:
    """The rate frames are meant to arrive at: the pace a file is played at, else the stream's own."""
    clock = getattr(source, "clock", None)
    if clock is not None and getattr(clock, "period", 0):
        return 1.0 / clock.period
    fps = getattr(source, "fps", None)
    return float(fps) if fps else None
