import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import rt_make_tiny_segmenter
from syndiff_stream.backends import BackendError, CompileBackend, OnnxBackend, make_backend, model_hash
from syndiff_stream.engine import prepare_on_device
from syndiff_stream.metrics import dice
from syndiff_stream.preprocess import prepare
from syndiff_stream.sources import DemoSource


@pytest.fixture(scope="module")
def demo_inputs():
    frames = list(DemoSource(size=(144, 180), realtime=False, frames=3, seed=5))
    return torch.from_numpy(np.stack([prepare(f.image, 64)[0] for f in frames]))


def test_eager_is_the_model(rt_tiny_segmenter, demo_inputs):
    out = make_backend("eager", rt_tiny_segmenter).infer(demo_inputs)
    assert out.shape == (3, 1, 64, 64)
    assert torch.equal(out, rt_tiny_segmenter.predict_proba(demo_inputs))


def test_onnx_matches_eager_and_is_cached(rt_tiny_segmenter, demo_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path))
    ort = OnnxBackend(rt_tiny_segmenter, threads=1, dynamo=False)  # the fast exporter; see the slow test
    assert ort.path.parent == tmp_path / "onnx" and ort.path.stem == f"{model_hash(rt_tiny_segmenter)}-fused"
    eager = rt_tiny_segmenter.predict_proba(demo_inputs)
    for batch in (demo_inputs[:1], demo_inputs):  # dynamic batch
        prob = ort.infer(batch)
        assert prob.shape == (len(batch), 1, 64, 64)
    thr = rt_tiny_segmenter.config.threshold
    assert dice(prob.numpy() >= thr, eager.numpy() >= thr) >= 0.99
    assert torch.allclose(prob, eager, atol=1e-3)
    mtime = ort.path.stat().st_mtime_ns
    OnnxBackend(rt_tiny_segmenter, threads=1)  # cached: no second export
    assert ort.path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_onnx_default_export_is_dynamo(rt_tiny_segmenter, demo_inputs, tmp_path, monkeypatch):
    """The default tries torch.export first (about a minute on two cores, once per checkpoint)."""
    real_export, calls = torch.onnx.export, []

    def spy(*args, dynamo=True, **kwargs):
        calls.append(dynamo)
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    ort = OnnxBackend(rt_tiny_segmenter, onnx_path=tmp_path / "m.onnx", threads=1)
    assert calls == [True]
    eager = rt_tiny_segmenter.predict_proba(demo_inputs)
    assert dice(ort.infer(demo_inputs).numpy() >= 0.5, eager.numpy() >= 0.5) >= 0.99


def test_onnx_falls_back_to_the_torchscript_exporter(rt_tiny_segmenter, demo_inputs, tmp_path, monkeypatch):
    real_export = torch.onnx.export
    calls = []

    def dynamo_fails(*args, dynamo=True, **kwargs):
        calls.append(dynamo)
        if dynamo:
            raise RuntimeError("torch.export cannot trace this")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    ort = OnnxBackend(rt_tiny_segmenter, onnx_path=tmp_path / "m.onnx", threads=1)
    assert calls == [True, False]
    assert torch.allclose(ort.infer(demo_inputs), rt_tiny_segmenter.predict_proba(demo_inputs), atol=1e-3)


def test_model_hash_follows_the_weights():
    a, b = rt_make_tiny_segmenter(0), rt_make_tiny_segmenter(0)
    assert model_hash(a) == model_hash(b)
    assert model_hash(a) != model_hash(rt_make_tiny_segmenter(1))


@pytest.mark.slow
def test_torch_compile_backend_matches_eager(rt_tiny_segmenter, demo_inputs):
    # The "eager" compiler keeps the test fast; inductor is the default for real runs.
    compiled = make_backend("compile", rt_tiny_segmenter, compiler="eager")
    assert torch.allclose(compiled.infer(demo_inputs), rt_tiny_segmenter.predict_proba(demo_inputs), atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="torch-tensorrt is installed")
def test_tensorrt_missing_is_one_clear_line(rt_tiny_segmenter):
    with pytest.raises(BackendError, match=r"pip install 'syndiff-stream\[trt\]'"):
        make_backend("tensorrt", rt_tiny_segmenter)


def test_bad_backend_or_device_is_named(rt_tiny_segmenter):
    with pytest.raises(BackendError, match="fast"):
        make_backend("fast", rt_tiny_segmenter)
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA"):
            make_backend("eager", rt_tiny_segmenter, device="cuda")


def test_device_preprocessing_matches_the_cpu_path():
    """The GPU path's crop/resize/normalise, run here on CPU tensors, agrees with `prepare`."""
    frames = list(DemoSource(size=(288, 360), realtime=False, frames=2, seed=2))
    expected = [prepare(f.image, 64) for f in frames]
    x = prepare_on_device(torch.from_numpy(np.stack([f.image for f in frames])), [e[1] for e in expected], 64)
    assert x.shape == (2, 3, 64, 64)
    assert (x - torch.from_numpy(np.stack([e[0] for e in expected]))).abs().mean() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runner_matches_eager_cpu(rt_tiny_segmenter):
    from syndiff_stream.engine import CudaRunner, Preprocessor

    frames = list(DemoSource(size=(144, 180), realtime=False, frames=4, seed=5))
    runner = CudaRunner(make_backend("eager", rt_make_tiny_segmenter(), device="cuda"))
    items = [Preprocessor(64, on_device=True)(f) for f in frames]
    first, second = runner.submit(items[:2]), runner.submit(items[2:])
    prob = np.concatenate([first.result(), second.result()])
    cpu = rt_tiny_segmenter.predict_proba(torch.from_numpy(np.stack([prepare(f.image, 64)[0] for f in frames])))
    assert dice(prob >= 0.5, cpu[:, 0].numpy() >= 0.5) >= 0.95


def test_onnx_splits_threads_into_parallel_workers(rt_tiny_segmenter, demo_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path))
    ort = OnnxBackend(rt_tiny_segmenter, threads=2, dynamo=False)
    threads = lambda: ort.session.get_session_options().intra_op_num_threads  # noqa: E731
    assert ort.max_workers == 2 and ort.workers == 1 and threads() == 2  # one call at a time: both threads
    expected = ort.infer(demo_inputs)
    assert ort.configure(2) == 2 and threads() == 1  # recorded pipeline: a 1-thread call per core
    assert torch.allclose(ort.infer(demo_inputs), expected, atol=1e-5)
    assert ort.configure(8) == 2  # never more workers than threads


def test_onnx_rows_run_into_each_threads_own_buffers(rt_tiny_segmenter, demo_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path))
    ort = OnnxBackend(rt_tiny_segmenter, threads=2, dynamo=False)
    rows = list(demo_inputs.numpy())
    expected = ort.infer_numpy(demo_inputs)
    first = ort.infer_rows(rows[:1])  # buffers for one frame, then grown to three, then a view of two
    kept = first.copy()
    for n in (3, 2, 3):
        assert np.allclose(ort.infer_rows(rows[:n]), expected[:n], atol=1e-5)
    assert np.array_equal(first, kept)  # a result is the caller's: later calls do not write into it
    ort.configure(2)  # a new session: new bindings
    with ThreadPoolExecutor(2) as pool:  # two threads at once, each its own rows
        calls = [pool.submit(ort.infer_rows, rows[i:i + 1] * 2) for i in (0, 1, 2, 0, 1, 2)]
        for i, call in zip((0, 1, 2, 0, 1, 2), calls):
            assert np.allclose(call.result(), expected[[i, i]], atol=1e-5)


def test_a_batch_norm_model_exports_with_parity_and_without_group_norms(demo_inputs, tmp_path, monkeypatch):
    """norm = "batch" (issue 25): in the ORT graph no InstanceNormalization is left, and most
    BatchNorms are folded into the convolution before them."""
    from syndiff_stream.backends import ort_graph_ops
    from syndiff_stream.model import batch_norms

    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path))
    seg = rt_make_tiny_segmenter(0, norm="batch")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking statistics, so that a dropped or misplaced norm shows
        for norm in batch_norms(seg):
            norm.running_mean.copy_(torch.randn(norm.num_features, generator=gen) * 0.1)
            norm.running_var.copy_(torch.rand(norm.num_features, generator=gen) + 0.5)
    ort = OnnxBackend(seg, threads=1, dynamo=False)
    assert torch.allclose(ort.infer(demo_inputs), seg.predict_proba(demo_inputs), atol=1e-3)
    ops = ort_graph_ops(ort.path)
    assert ops.get("InstanceNormalization", 0) == 0
    assert ops.get("BatchNormalization", 0) < len(batch_norms(seg)) / 2


def test_cuda_graph_mode_runs_from_another_thread_and_returns_its_own_copy(rt_tiny_segmenter, demo_inputs):
    # The CUDA runner calls the model from its own thread: inductor's graph trees assert there
    # (seen on the lent H200), so the graphs mode compiles without them; on the CPU inductor skips
    # the graphs and the rest of the path is the same.
    from concurrent.futures import ThreadPoolExecutor

    backend = CompileBackend(rt_tiny_segmenter, "cpu", mode="reduce-overhead")
    assert backend.graphs
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(backend.infer, demo_inputs).result()
        kept = first.clone()
        pool.submit(backend.infer, torch.flip(demo_inputs, dims=[3])).result()
    assert torch.equal(first, kept)  # a second replay did not overwrite the first result
    assert torch.allclose(first, rt_tiny_segmenter.predict_proba(demo_inputs), atol=1e-4)


def test_a_relu_model_exports_with_parity_and_without_silu(demo_inputs, tmp_path, monkeypatch):
    """act = "relu" (issue 25): no Sigmoid or QuickGelu left in the ORT graph, where ReLU rides
    inside the convolutions."""
    from syndiff_stream.backends import ort_graph_ops

    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path))
    seg = rt_make_tiny_segmenter(0, norm="batch", act="relu")
    ort = OnnxBackend(seg, threads=1, dynamo=False)
    assert torch.allclose(ort.infer(demo_inputs), seg.predict_proba(demo_inputs), atol=1e-3)
    ops = ort_graph_ops(ort.path)
    assert ops.get("QuickGelu", 0) == 0 and ops.get("Sigmoid", 0) <= 1  # the output's sigmoid at most
