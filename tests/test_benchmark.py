"""benchmark.compare_models: checkpoints timed side by side under the same conditions."""

from syndiff_stream.backends import OnnxBackend
from syndiff_stream.benchmark import compare_models
from syndiff_stream.sources import DemoSource


def test_compared_models_run_with_the_same_threads(rt_tiny_segmenter, tmp_path):
    main = OnnxBackend(rt_tiny_segmenter, onnx_path=tmp_path / "a.onnx", threads=2)
    other = OnnxBackend(rt_tiny_segmenter, onnx_path=tmp_path / "b.onnx", threads=2)
    main.configure(2)  # as a pipeline run leaves it: one single-threaded session per core
    report = compare_models({"model": main, "other": other}, DemoSource(size=(72, 90), frames=3, seed=1), frames=3,
                            rounds=3)
    assert main.workers == other.workers == 1  # one call at a time, both threads for it, for every model
    assert set(report["compare_models"]) == {"model", "other"}
