"""Exported engines: parity with eager on real images, loading by the runtime, clear errors."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import rt_make_tiny_segmenter
from syndiff_stream.backends import BackendError, make_backend
from syndiff_stream.cli import app
from syndiff_stream.export import EngineInfo, export_engine, open_engine
from syndiff_stream.metrics import dice
from syndiff_stream.model import Segmenter, default_checkpoint_path
from syndiff_stream.preprocess import prepare

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg-train"
needs_kvasir = pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"real images not found at {KVASIR}")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def real_images():
    from syndiff_stream.datasets import read_image

    if not (KVASIR / "images").is_dir():
        pytest.skip(f"real images not found at {KVASIR}")
    return [read_image(p) for p in sorted((KVASIR / "images").iterdir())[:12]]


def models():
    """The tiny test model always; the shipped compact model once it exists."""
    yield pytest.param("tiny", id="tiny")
    yield pytest.param("tiny-presence", id="tiny-presence")  # the frame-level gate is in the graph
    yield pytest.param("tiny-shifted", id="tiny-shifted")  # centred latents: the shift is in the graph
    if (default_checkpoint_path() / "config.json").is_file():
        yield pytest.param("shipped", id="shipped")


def load(which, tmp_path_factory):
    """(model, its --model arguments)."""
    if which == "shipped":
        return Segmenter.from_pretrained(), []
    path = tmp_path_factory.mktemp("tiny_model")
    seg = rt_make_tiny_segmenter(presence_head=which == "tiny-presence")
    if which == "tiny-shifted":
        seg.config.latent_shift = tuple(0.4 * (-1) ** k for k in range(seg.config.latent_channels))
    seg.save_pretrained(path)
    return Segmenter.from_pretrained(path), ["--model", path]


def agreement(seg, backend, images, threshold=None):
    """Dice between the backend's and eager's masks over all images, and the eager mask's share of
    pixels. A random tiny model is thresholded at eager's median probability, so the masks are
    half foreground and every borderline pixel counts (an all-empty mask would agree trivially)."""
    x = torch.from_numpy(np.stack([prepare(im, seg.config.image_size)[0] for im in images]))
    eager = make_backend("eager", seg).infer(x).numpy()
    got = backend.infer(x).numpy()
    t = float(np.median(eager)) if threshold is None else threshold
    return dice(got >= t, eager >= t), float((eager >= t).mean())


@needs_kvasir
@pytest.mark.parametrize("which", list(models()))
def test_onnx_engine_matches_eager_on_real_images(which, real_images, tmp_path, tmp_path_factory):
    seg, model_args = load(which, tmp_path_factory)
    out = tmp_path / "model.onnx"
    result = invoke("export", "--backend", "onnx", "--out", out, "--exporter", "torchscript", *model_args)
    assert result.exit_code == 0, result.output
    info = EngineInfo.read(out)
    assert (info.backend, info.precision, info.input_size) == ("onnx", "fp32", seg.config.image_size)
    score, share = agreement(seg, open_engine(seg, out, threads=1), real_images,
                             None if which != "shipped" else seg.config.threshold)
    assert 0.05 < share < 0.95 or which == "shipped"
    assert score >= 0.99, f"ONNX Runtime vs eager Dice {score:.4f}"


@needs_kvasir
def test_onnx_fp16_engine_stays_close(rt_tiny_segmenter, real_images, tmp_path):
    info = export_engine(rt_tiny_segmenter, "onnx", tmp_path / "m16.onnx", "fp16", exporter="torchscript")
    assert info.precision == "fp16"
    score, _ = agreement(rt_tiny_segmenter, open_engine(rt_tiny_segmenter, tmp_path / "m16.onnx", threads=1), real_images)
    assert score >= 0.99


@pytest.mark.slow
@needs_kvasir
def test_onnx_int8_engine_is_calibrated_on_frames(rt_tiny_segmenter, real_images, tmp_path):
    """Static INT8 calibrated on four real frames (~40 s on two cores): recorded in the sidecar, runs."""
    frames = tmp_path / "calib"
    frames.mkdir()
    for p in sorted((KVASIR / "images").iterdir())[20:24]:
        (frames / p.name).symlink_to(p)
    # the dynamo graph, what users get by default (its fused linear biases once broke quantisation)
    info = export_engine(rt_tiny_segmenter, "onnx", tmp_path / "m8.onnx", "int8", calibration=frames, exporter="dynamo")
    assert len(info.calibration) == 4 and all(len(e["sha256"]) == 64 for e in info.calibration)
    engine = open_engine(rt_tiny_segmenter, tmp_path / "m8.onnx", threads=1)
    score, _ = agreement(rt_tiny_segmenter, engine, real_images)
    assert score > 0.5  # int8 of a random model is not held to the fp32 bar; it must still segment alike


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SYNDIFF_TEST_INDUCTOR") != "1",
                    reason="inductor compiles for ~200 s on two busy cores; set SYNDIFF_TEST_INDUCTOR=1 to run")
@needs_kvasir
def test_torch_compile_matches_eager_on_real_images(rt_tiny_segmenter, real_images):
    score, _ = agreement(rt_tiny_segmenter, make_backend("compile", rt_tiny_segmenter), real_images)
    assert score >= 0.99


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None or not torch.cuda.is_available(),
                    reason="torch-tensorrt and a CUDA GPU are needed for TensorRT parity (pip install 'syndiff-stream[trt]')")
@needs_kvasir
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_eager_on_real_images(precision, rt_tiny_segmenter, real_images, tmp_path):
    out = tmp_path / f"m-{precision}.ep"
    export_engine(rt_tiny_segmenter, "tensorrt", out, precision)
    engine = open_engine(rt_tiny_segmenter, out, device="cuda")
    x = torch.from_numpy(np.stack([prepare(im, 64)[0] for im in real_images]))
    eager = rt_tiny_segmenter.predict_proba(x).numpy()
    t = float(np.median(eager))
    assert dice(engine.infer(x.cuda()).cpu().numpy() >= t, eager >= t) >= 0.99


@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="torch-tensorrt is installed")
def test_tensorrt_export_without_the_extra_names_it(rt_tiny_model_dir, tmp_path):
    result = invoke("export", "--backend", "tensorrt", "--model", rt_tiny_model_dir, "--out", tmp_path / "m.ep")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'syndiff-stream[trt]'" in lines[0]
    assert not (tmp_path / "m.ep").exists()


def test_dynamo_failure_falls_back_with_a_warning(rt_tiny_segmenter, tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("torch.export cannot trace this")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    with pytest.warns(UserWarning, match="TorchScript exporter"):
        info = export_engine(rt_tiny_segmenter, "onnx", tmp_path / "m.onnx")
    assert info.exporter == "torchscript" and (tmp_path / "m.onnx").is_file()


def test_run_and_bench_load_an_exported_engine(rt_tiny_model_dir, rt_video, tmp_path):
    out = tmp_path / "m.onnx"
    assert invoke("export", "--model", rt_tiny_model_dir, "--out", out, "--exporter", "torchscript").exit_code == 0
    result = invoke("run", rt_video, "--model", rt_tiny_model_dir, "--engine", out, "--publish", "",
                    "--masks", tmp_path / "masks", "--quiet")
    assert result.exit_code == 0, result.output
    assert "-> onnx on cpu" in result.output and len(list((tmp_path / "masks").glob("*.png"))) == 12
    result = invoke("bench", rt_video, "--model", rt_tiny_model_dir, "--engine", out, "--frames", 4, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])


def test_engine_from_another_checkpoint_is_refused(rt_tiny_segmenter, tmp_path):
    export_engine(rt_tiny_segmenter, "onnx", tmp_path / "m.onnx", exporter="torchscript")
    other = tmp_path / "other"
    rt_make_tiny_segmenter(seed=1).save_pretrained(other)
    result = invoke("run", "demo", "--model", other, "--engine", tmp_path / "m.onnx", "--publish", "", "--max-frames", 1)
    assert result.exit_code == 2 and "another checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, named", [
    (["--backend", "openvino"], "openvino"),
    (["--precision", "int4"], "int4"),
    (["--precision", "int8"], "--calibration"),
])
def test_bad_export_options_are_one_line(rt_tiny_model_dir, tmp_path, args, named):
    result = invoke("export", "--model", rt_tiny_model_dir, "--out", tmp_path / "m.onnx", *args)
    assert result.exit_code == 2 and named in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_engine_file_is_named(rt_tiny_segmenter, tmp_path):
    with pytest.raises(BackendError, match="no such file"):
        open_engine(rt_tiny_segmenter, tmp_path / "absent.onnx")
    assert not (tmp_path / "absent.onnx").exists()


def test_an_engine_onnx_runtime_cannot_load_is_an_export_error(tmp_path):
    from syndiff_stream.export import check_loadable

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a graph")
    with pytest.raises(BackendError, match="bad.onnx: the exported model does not load"):
        check_loadable(bad)


@pytest.mark.slow
def test_onnx_int8_options_reach_the_quantiser(rt_tiny_segmenter, tmp_path):
    """QOperator format with the first and last convolutions kept fp32: QLinearConv nodes, exactly two
    float convolutions left, the settings in the sidecar, and the engine runs (the onnx-int8-* CPU paths)."""
    import cv2
    import onnx

    from syndiff_stream.export import Int8Options

    frames = tmp_path / "calib"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(frames / f"{i}.png"), rng.integers(30, 220, (72, 90, 3)).astype(np.uint8))
    opts = Int8Options(format="qoperator", keep_edges=True)
    info = export_engine(rt_tiny_segmenter, "onnx", tmp_path / "q.onnx", "int8", calibration=frames,
                         exporter="torchscript", int8=opts)
    assert info.quantisation == {"format": "qoperator", "per_channel": True, "keep_edges": True}
    assert EngineInfo.read(tmp_path / "q.onnx").quantisation == info.quantisation
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "QLinearConv" in ops and ops.count("Conv") == 2 and "DequantizeLinear" in ops
    prob = open_engine(rt_tiny_segmenter, tmp_path / "q.onnx", threads=1).infer(torch.zeros(2, 3, 64, 64))
    assert prob.shape == (2, 1, 64, 64) and torch.isfinite(prob).all()
