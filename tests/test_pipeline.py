import threading
import time

import av
import numpy as np
import pytest
import torch

from conftest import rt_write_video
from syndiff_stream.backends import EagerBackend, make_backend
from syndiff_stream.frames import Frame, LivePolicy, Mode
from syndiff_stream.metrics import dice
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.preprocess import prepare, to_source
from syndiff_stream.publish import Publisher
from syndiff_stream.sources import DemoSource, Source, SourceError, open_source
from syndiff_stream.subscribe import Subscriber


def test_recorded_every_frame_published_at_source_resolution_matching_the_model(
        rt_tiny_segmenter, tmp_path, rt_endpoint):
    video = tmp_path / "clip.mp4"
    rt_write_video(video, frames=12, size=(120, 160))
    pub = Publisher(rt_endpoint, encoding="png")
    received = []
    with Subscriber(rt_endpoint) as sub:
        assert pub.wait_for_subscribers(1, timeout=5)
        reader = threading.Thread(target=lambda: received.extend(sub.messages(timeout=30)))
        reader.start()
        pipeline = Pipeline(open_source(str(video)), make_backend("eager", rt_tiny_segmenter), [pub])
        assert pipeline.mode is Mode.RECORDED and pipeline.batch_size > 1
        stats = pipeline.run()
        reader.join(timeout=30)
    assert stats.frames_in == stats.frames_out == len(received) == 12 and stats.dropped == 0
    assert [m.header["frame_index"] for m in received] == list(range(12))

    with av.open(str(video)) as container:  # decode independently and predict frame by frame
        images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    thr = rt_tiny_segmenter.config.threshold
    for msg, image in zip(received, images):
        assert msg.mask.shape == image.shape[:2] == tuple(msg.header["shape"])
        x, fov = prepare(image, rt_tiny_segmenter.config.image_size)
        prob = rt_tiny_segmenter.predict_proba(torch.from_numpy(x)[None])[0, 0].numpy()
        expected = to_source(prob, fov, *image.shape[:2]) >= thr
        assert 0.02 < expected.mean() < 0.98  # a mask with both classes: the comparison means something
        assert dice(msg.mask, expected) >= 0.99 and (msg.mask == expected).mean() >= 0.995


class SlowBackend(EagerBackend):
    """The tiny model plus a fixed 30 ms: a model clearly slower than its source."""

    def infer(self, batch):
        time.sleep(0.03 * len(batch))
        return super().infer(batch)


def test_live_mode_drops_frames_it_cannot_keep_up_with_and_counts_why(rt_tiny_segmenter):
    source = DemoSource(size=(72, 90), realtime=False, frames=120)  # renders far faster than 30 ms
    pipeline = Pipeline(source, SlowBackend(rt_tiny_segmenter), mode=Mode.LIVE)
    peak, order = [], []
    pipeline.sinks.append(type("Sink", (), {"write": lambda self, r: order.append(r.frame.index),
                                            "close": lambda self: None})())
    stats = pipeline.run(on_progress=lambda st: peak.append(len(pipeline.buffer)), progress_every=0.01)
    assert stats.frames_in == 120 and stats.dropped > 0
    assert stats.frames_out + stats.dropped == stats.frames_in  # every frame either shown or counted
    assert stats.dropped == stats.dropped_late + stats.dropped_capacity and stats.dropped_capacity > 0
    assert order == sorted(order)  # in order
    assert max(peak, default=0) <= pipeline.buffer.capacity == 3  # bounded buffer: memory stays flat
    d = stats.as_dict()
    assert d["latency_budget_ms"] == 100.0 and set(d["inter_arrival_ms"]) == {"p50", "p95", "p99"}


def test_recorded_mode_with_the_same_slow_model_loses_nothing(rt_tiny_segmenter):
    source = DemoSource(size=(72, 90), realtime=False, frames=10)
    stats = Pipeline(source, SlowBackend(rt_tiny_segmenter), mode=Mode.RECORDED, batch_size=2).run()
    assert stats.frames_out == 10 and stats.dropped == 0


def test_max_frames_and_stats(rt_tiny_segmenter):
    stats = Pipeline(DemoSource(size=(72, 90), realtime=False), make_backend("eager", rt_tiny_segmenter),
                     max_frames=5).run()
    d = stats.as_dict()
    assert d["frames"] == d["frames_out"] == 5 and d["source_size"] == [72, 90]
    assert d["decode_fps"] > 0 and d["model_fps"] > 0 and d["e2e_fps"] > 0
    assert set(d["latency_ms"]) == {"p50", "p95", "p99"}


def test_latency_splits_into_wait_model_call_and_finish(rt_tiny_segmenter):
    """Every frame's latency is its wait before the call, the call and the finish (plus the short
    hand-over queues): the parts are measured separately, so each is at most the whole."""
    stats = Pipeline(DemoSource(size=(72, 90), realtime=False, frames=12), SlowBackend(rt_tiny_segmenter),
                     mode=Mode.RECORDED, batch_size=1).run()
    d = stats.as_dict()
    assert len(stats.waits) == len(stats.finishes) == 12
    assert d["model_call_ms"]["p50"] >= 30  # the backend's sleep
    for part in ("wait_ms", "finish_ms", "model_call_ms"):
        assert set(d[part]) == {"p50", "p95", "p99"} and 0 <= d[part]["p50"] <= d["latency_ms"]["p99"]
    per_frame = [w + m + f for w, m, f in zip(stats.waits, stats.model_latencies, stats.finishes)]
    assert max(per_frame) <= max(stats.latencies) + 0.005 and min(per_frame) >= 0.03


class Broken(Source):
    def __iter__(self):
        yield Frame(np.zeros((40, 40, 3), np.uint8), "broken", 0, 0.0)
        raise SourceError("camera unplugged")


class FailingSink:
    def write(self, result):
        raise OSError("disk full")

    def close(self):
        pass


@pytest.mark.parametrize("source, sinks, error", [
    (Broken(), [], "camera unplugged"),
    (DemoSource(size=(48, 60), realtime=False, frames=50), [FailingSink()], "disk full"),
])
def test_a_failing_stage_stops_the_graph_and_is_raised(rt_tiny_segmenter, source, sinks, error):
    with pytest.raises((SourceError, OSError), match=error):
        Pipeline(source, make_backend("eager", rt_tiny_segmenter), sinks).run()
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name in ("decode", "infer")]


class ParallelSlowBackend(SlowBackend):
    """Two calls at once, each 30 ms per frame (sleep releases the GIL, like an ORT session);
    counts how many calls were ever inside `infer` together."""

    max_workers = 2

    def __init__(self, seg):
        super().__init__(seg)
        self.inside, self.most_inside, self.lock = 0, 0, threading.Lock()
        self.together, self.calls = threading.Barrier(2, timeout=30), 0  # the first two calls meet, if they can

    def configure(self, workers):
        self.workers = min(workers, self.max_workers)
        return self.workers

    def infer(self, batch):
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.calls += 1
            first_two = self.calls <= 2
        try:
            if first_two:  # no timing luck needed to see two calls overlap; a serial runner fails below
                try:
                    self.together.wait()
                except threading.BrokenBarrierError:
                    pass
            return super().infer(batch)
        finally:
            with self.lock:
                self.inside -= 1


def test_recorded_mode_keeps_one_batch_per_worker_in_flight_and_order(rt_tiny_segmenter):
    frames = 16
    backend = ParallelSlowBackend(rt_tiny_segmenter)
    pipeline = Pipeline(DemoSource(size=(72, 90), realtime=False, frames=frames), backend, mode=Mode.RECORDED,
                        batch_size=2)
    assert pipeline.runner.depth == 2
    pipeline.runner.warmup = lambda sizes: None  # the warm-up's two calls would meet without the pipeline
    order = []
    pipeline.sinks.append(type("Sink", (), {"write": lambda self, r: order.append(r.frame.index),
                                            "close": lambda self: None})())
    stats = pipeline.run()
    assert order == list(range(frames)) and stats.dropped == 0  # in order, though computed two at a time
    assert backend.most_inside == 2

def test_live_mode_keeps_one_frame_per_worker_in_flight_and_releases_them_in_order(rt_tiny_segmenter):
    backend = ParallelSlowBackend(rt_tiny_segmenter)
    no_deadline = LivePolicy(latency_budget_ms=1e9)  # frames dropped only for capacity: no clock in the test
    pipeline = Pipeline(DemoSource(size=(72, 90), realtime=False, frames=16), backend, mode=Mode.LIVE,
                        live=no_deadline)
    assert backend.workers == pipeline.runner.depth == 2 and pipeline.batch_size == 1
    pipeline.runner.warmup = lambda sizes: None  # the warm-up's two calls would meet without the pipeline
    order = []
    pipeline.sinks.append(type("Sink", (), {"write": lambda self, r: order.append(r.frame.index),
                                            "close": lambda self: None})())
    stats = pipeline.run()
    assert backend.most_inside == 2 and order == sorted(order) and order[-1] == 15
    assert stats.frames_out + stats.dropped_capacity == 16 and stats.dropped_late == 0


class RecordingDemo(DemoSource):
    """Notes when its first frame is asked for."""

    def __iter__(self):
        self.started = time.perf_counter()
        yield from super().__iter__()


class CallLog(ParallelSlowBackend):
    def infer(self, batch):
        self.log.append((threading.current_thread().name, len(batch), time.perf_counter()))
        return super().infer(batch)


@pytest.mark.parametrize("mode, sizes", [(Mode.LIVE, [1]), (Mode.RECORDED, [1, 2, 3, 4])])
def test_every_worker_is_warmed_up_for_each_batch_size_before_the_first_frame(rt_tiny_segmenter, mode, sizes):
    """A first call allocates; on a live stream it would make the first frames late."""
    backend = CallLog(rt_tiny_segmenter)
    backend.log = []
    source = RecordingDemo(size=(72, 90), realtime=False, frames=4)
    pipeline = Pipeline(source, backend, mode=mode, live=LivePolicy(latency_budget_ms=1e9))
    pipeline.run()
    warm = [(name, n) for name, n, t in backend.log if t < source.started]
    assert sorted(n for _, n in warm) == sorted(sizes * 2)  # each batch size once per worker
    assert all(len({name for name, m in warm if m == n}) == 2 for n in sizes)  # on both pool threads


def test_a_backend_that_fails_its_warm_up_leaves_the_sinks_closed(rt_tiny_segmenter):
    class Broken(EagerBackend):
        def infer(self, batch):
            raise RuntimeError("no such engine")

    closed = []
    sink = type("Sink", (), {"write": lambda self, r: None, "close": lambda self: closed.append("close"),
                             "abort": lambda self: closed.append("abort")})()
    with pytest.raises(RuntimeError, match="no such engine"):
        Pipeline(DemoSource(size=(48, 60), realtime=False, frames=5), Broken(rt_tiny_segmenter), [sink]).run()
    assert closed == ["abort"]

