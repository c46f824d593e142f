import threading
import time

import av
import numpy as np
import pytest
import torch

from conftest import rt_write_video
from syndiff_stream.backends import EagerBackend, make_backend
from syndiff_stream.frames import Frame, Mode
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


class FinishedSource(DemoSource):
    """The demo scene, with an event set once every frame has been decoded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.finished = threading.Event()

    def __iter__(self):
        yield from super().__iter__()
        self.finished.set()


class GatedBackend(EagerBackend):
    """The tiny model, whose first call waits until the source has given every frame: a model
    slower than its source by construction, not by this machine's speed."""

    def __init__(self, seg, gate):
        super().__init__(seg)
        self.gate = gate

    def infer(self, batch):
        assert self.gate.wait(60), "the source never finished"
        return super().infer(batch)


def test_live_mode_drops_frames_newest_wins_and_the_buffer_stays_bounded(rt_tiny_segmenter):
    source = FinishedSource(size=(72, 90), realtime=False, frames=120)
    pipeline = Pipeline(source, GatedBackend(rt_tiny_segmenter, source.finished), mode=Mode.LIVE)
    shown, peak = [], []
    pipeline.sinks.append(type("Sink", (), {"write": lambda self, r: shown.append(r.frame.index),
                                            "close": lambda self: None})())
    stats = pipeline.run(on_progress=lambda st: peak.append(len(pipeline.buffer)), progress_every=0.01)
    assert stats.frames_in == 120 and stats.dropped >= 100  # all but the frames in hand when the model woke
    assert stats.frames_out + stats.dropped == stats.frames_in == 120  # every frame either shown or counted
    assert shown == sorted(shown) and shown[-1] == 119  # the newest frame wins
    assert max(peak, default=0) <= 1  # bounded buffer: memory stays flat


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
    order = []
    pipeline.sinks.append(type("Sink", (), {"write": lambda self, r: order.append(r.frame.index),
                                            "close": lambda self: None})())
    stats = pipeline.run()
    assert order == list(range(frames)) and stats.dropped == 0  # in order, though computed two at a time
    assert backend.most_inside == 2
    # live mode asks for one call at a time: the newest frame, on every thread
    Pipeline(DemoSource(size=(72, 90), realtime=False, frames=2), backend, mode=Mode.LIVE)
    assert backend.workers == 1
