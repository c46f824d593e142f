"""benchmark.compare_models: checkpoints timed side by side under the same conditions."""

from syndiff_stream.backends import OnnxBackend
from syndiff_stream.benchmark import compare_models
from syndiff_stream.sources import DemoSource


def test_compared_models_run_with_the_same_threads(rt_tiny_segmenter, tmp_path):
    # one export for both (the second session loads the file), by the quicker TorchScript exporter:
    # what is tested is how the sessions share the threads, not the export
    main = OnnxBackend(rt_tiny_segmenter, onnx_path=tmp_path / "a.onnx", threads=2, dynamo=False)
    other = OnnxBackend(rt_tiny_segmenter, onnx_path=tmp_path / "a.onnx", threads=2)
    main.configure(2)  # as a pipeline run leaves it: one single-threaded session per core
    report = compare_models({"model": main, "other": other}, DemoSource(size=(72, 90), frames=3, seed=1), frames=3,
                            rounds=3)
    assert main.workers == other.workers == 1  # one call at a time, both threads for it, for every model
    assert set(report["compare_models"]) == {"model", "other"}


def test_bench_reports_the_machine_ceiling_and_the_share_reached(rt_tiny_segmenter):
    import pytest

    from syndiff_stream.backends import EagerBackend
    from syndiff_stream.benchmark import run_benchmark
    from syndiff_stream.machine import model_flops

    backend = EagerBackend(rt_tiny_segmenter)
    report = run_benchmark(rt_tiny_segmenter, backend, lambda: DemoSource(size=(72, 90), frames=6, seed=1), frames=6,
                           alone_seconds=0.2)
    c = report["ceiling"]
    assert c["cpu"]["model"] and c["cpu"]["kernel_capability"] and isinstance(c["cpu"]["vector_extensions"], list)
    assert c["model_gflop_per_frame"] == round(model_flops(rt_tiny_segmenter) / 1e9, 4) > 0
    assert c["matmul_gflops"] > 0 and c["threads"] >= 1
    # the ceiling is the best library's GEMM: torch's and, where installed, ONNX Runtime's
    assert c["matmul_gflops"] == max(c["matmul_probes"].values()) == c["matmul_probes"][c["matmul_library"]]
    assert c["ceiling_fps"] == pytest.approx(c["matmul_gflops"] / c["model_gflop_per_frame"], rel=0.01)
    assert c["model_share"] == pytest.approx(report["model_fps"] / c["ceiling_fps"], rel=0.01, abs=1e-3)
    assert c["pipeline_share"] == pytest.approx(report["e2e_fps"] / c["ceiling_fps"], rel=0.01, abs=1e-3)
    assert c["pipeline_of_model"] == pytest.approx(report["e2e_fps"] / report["model_fps"], rel=0.01)
    # the model with the cores to itself, timed after the pipeline run on the same frames
    assert c["model_alone_fps"] > 0
    assert c["model_alone_share"] == pytest.approx(c["model_alone_fps"] / c["ceiling_fps"], rel=0.01, abs=1e-3)
    assert c["pipeline_of_model_alone"] == pytest.approx(report["e2e_fps"] / c["model_alone_fps"], rel=0.01)
    untimed = run_benchmark(rt_tiny_segmenter, backend, lambda: DemoSource(size=(72, 90), frames=2, seed=1), frames=2,
                            alone_seconds=0)["ceiling"]
    assert untimed["model_alone_fps"] is None and untimed["model_alone_share"] is None


def test_the_model_alone_runs_the_sources_first_frames_as_the_pipeline_batches_them(rt_tiny_segmenter, monkeypatch):
    import numpy as np

    from syndiff_stream import benchmark
    from syndiff_stream.backends import EagerBackend
    from syndiff_stream.preprocess import prepare

    seen = {}
    monkeypatch.setattr(benchmark, "throughput", lambda backend, x, seconds: seen.update(x=x, seconds=seconds) or 123.0)
    backend = EagerBackend(rt_tiny_segmenter)
    assert benchmark.model_alone(backend, DemoSource(size=(72, 90), frames=6, seed=1), batch=3, seconds=0.5) == 123.0
    frames = list(DemoSource(size=(72, 90), frames=3, seed=1))
    expected = np.stack([prepare(f.image, backend.input_size)[0] for f in frames])
    assert seen["seconds"] == 0.5 and np.array_equal(seen["x"].numpy(), expected)
    assert benchmark.model_alone(backend, DemoSource(size=(72, 90), frames=0, seed=1), batch=3) is None


def test_flops_of_a_convolution_are_counted_as_two_per_multiply_add():
    import torch

    from syndiff_stream.machine import matmul_gflops, model_flops

    class One(torch.nn.Module):  # just enough of a Segmenter for model_flops
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.config = type("C", (), {"image_size": 8})()

        def predict_proba(self, x):
            return self.conv(x)

    assert model_flops(One()) == 2 * 3 * 4 * 9 * 8 * 8
    assert matmul_gflops(1, size=64, seconds=0.05) > 0


def test_the_gemm_probe_reads_every_library_at_hand():
    import importlib.util

    from syndiff_stream.machine import matmul_probes

    probes = matmul_probes(1, sizes=(64,), seconds=0.05)
    assert set(probes) == {"torch"} | ({"onnxruntime"} if importlib.util.find_spec("onnxruntime") else set())
    assert all(v > 0 for v in probes.values())


def test_throughput_submits_the_next_call_as_soon_as_the_oldest_is_collected(rt_tiny_segmenter):
    """As the pipeline does: not in rounds that wait for every call in flight to end."""
    import threading

    import numpy as np
    import torch

    from syndiff_stream.backends import Backend
    from syndiff_stream.benchmark import throughput

    class Overlapping(Backend):
        workers = 2

        def __init__(self, seg):
            super().__init__(seg)
            self.started = [threading.Event() for _ in range(8)]
            self.calls, self.lock, self.saw_next = 0, threading.Lock(), None

        def infer_rows(self, rows):
            with self.lock:
                index, self.calls = self.calls, self.calls + 1
            if index < len(self.started):
                self.started[index].set()
            if index == 3:  # the second timed call ends only once a third has started beside it
                self.saw_next = self.started[4].wait(timeout=2)
            return np.zeros((len(rows), self.input_size, self.input_size), np.float32)

    backend = Overlapping(rt_tiny_segmenter)
    size = backend.input_size
    fps = throughput(backend, torch.zeros(2, 3, size, size), seconds=0, min_calls=2)
    assert backend.saw_next is True
    assert backend.calls >= 2 + 4 and fps > 0  # two warm-up calls, then min_calls per worker


def test_a_source_that_will_not_open_again_keeps_the_pipelines_figures(rt_tiny_segmenter):
    from syndiff_stream.backends import EagerBackend
    from syndiff_stream.benchmark import run_benchmark
    from syndiff_stream.sources import SourceError

    opened = []

    def make_source():
        if opened:
            raise SourceError("rtsp://camera: busy")
        opened.append(1)
        return DemoSource(size=(72, 90), frames=3, seed=1)

    report = run_benchmark(rt_tiny_segmenter, EagerBackend(rt_tiny_segmenter), make_source, frames=3, alone_seconds=0.2)
    assert report["frames_out"] == 3 and report["ceiling"]["model_share"] > 0
    assert report["ceiling"]["model_alone_fps"] is None and "busy" in report["ceiling"]["model_alone_skipped"]
