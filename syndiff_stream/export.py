"""Export the single-step model to an engine file for deployment, and open such a file again.

  onnx      fp32  the dynamo exporter (torch.export); the TorchScript exporter, with a warning,
                  where torch.export cannot trace the model
            fp16  the fp32 graph converted by ONNX Runtime's float16 converter (inputs and outputs
                  stay float32), for GPU execution providers
            int8  static quantisation by ONNX Runtime, calibrated on a set of frames: QDQ,
                  per-channel weights, convolutions only by default (`Int8Options`)
  tensorrt  torch-tensorrt (dynamo IR), saved as an exported program; int8 is quantised by
            TensorRT Model Optimizer (modelopt.torch.quantization) on a set of frames, since
            TensorRT's old PTQ calibrators are gone. Needs a CUDA GPU and the `trt` extra.

Each engine gets a sidecar `<engine>.json` (backend, precision, checkpoint hash, input size, the
calibration set). `open_engine` reads it and refuses an engine built from another checkpoint, so a
mismatched file fails with one line instead of running with the wrong weights.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from .backends import Backend, BackendError, OnnxBackend, SingleStep, TensorRTBackend, export_onnx, model_hash, ort_session
from .model import Segmenter

PRECISIONS = ("fp32", "fp16", "int8")
EXPORT_BACKENDS = ("onnx", "tensorrt")
TRT_EXTRA = "pip install 'syndiff-stream[trt]'"
CALIBRATION_BATCH = 8


class Int8Options(BaseModel):
    """How ONNX Runtime quantises the graph (the int8 CPU paths vary these; docs/runtime.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["qdq", "qoperator"] = "qdq"  # QDQ pairs around fp32 ops, or QLinearConv ops
    per_channel: bool = True  # one weight scale per output channel, or one per tensor
    keep_edges: bool = False  # leave the first and last convolutions in fp32 (input and mask edges)


@dataclass
class EngineInfo:
    """What the sidecar records about an engine."""

    backend: str
    precision: str
    model_hash: str
    input_size: int
    max_batch: int
    exporter: str = ""
    export_s: float = 0.0
    calibration: list = field(default_factory=list)  # the INT8 calibration set manifest entries
    quantisation: dict = field(default_factory=dict)  # ONNX int8: the Int8Options used
    torch: str = torch.__version__

    @classmethod
    def read(cls, engine: str | Path) -> "EngineInfo | None":
        path = sidecar(engine)
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise BackendError(f"engine metadata {path} is not readable ({exc})") from None

    def write(self, engine: str | Path) -> Path:
        path = sidecar(engine)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def sidecar(engine: str | Path) -> Path:
    return Path(f"{engine}.json")


# ---- calibration frames -------------------------------------------------------------------------

def calibration_set(spec: str | Path, limit: int = 64) -> tuple[list[np.ndarray], list[dict]]:
    """Frames to calibrate INT8 on, with their manifest: a profile (its `int8` manifest, each file
    checked against its SHA-256), a folder of images or a video (`limit` frames, evenly spaced)."""
    from .calibration import ProfileError, load_manifest, load_profile, read_frames

    spec = Path(spec)
    try:
        if spec.suffix in (".json", ".yaml", ".yml"):
            profile = load_profile(spec)
            if profile.int8 is None:
                raise BackendError(f"--calibration {spec}: the profile has no int8 calibration set "
                                   "(calibrate with --int8-frames)")
            images = load_manifest(profile.int8, spec.parent)
            return images, [e.model_dump() for e in profile.int8.frames]
        frames, manifest = read_frames(spec, limit=limit)
    except ProfileError as exc:
        raise BackendError(str(exc)) from None
    return [f.image for f in frames], [e.model_dump() for e in manifest]


def model_inputs(images: list[np.ndarray], size: int) -> list[torch.Tensor]:
    """Frames -> model-input batches (field of view cropped, normalised), as the runtime prepares them."""
    from .preprocess import prepare

    x = np.stack([prepare(image, size)[0] for image in images])
    return [torch.from_numpy(x[i:i + CALIBRATION_BATCH]) for i in range(0, len(x), CALIBRATION_BATCH)]


# ---- export -------------------------------------------------------------------------------------

def export_engine(seg: Segmenter, backend: str, out: str | Path, precision: str = "fp32",
                  calibration: str | Path | None = None, max_batch: int = 8, exporter: str = "auto",
                  int8: Int8Options | None = None, calibration_limit: int = 64) -> EngineInfo:
    """Write the engine to `out` and its sidecar beside it. `exporter` (onnx only): auto (dynamo,
    falling back to TorchScript with a warning), dynamo or torchscript; `int8` (onnx int8 only):
    how ORT quantises; `calibration_limit`: frames taken from a folder or video."""
    if backend not in EXPORT_BACKENDS:
        raise BackendError(f"--backend {backend!r}: export supports {', '.join(EXPORT_BACKENDS)}")
    if precision not in PRECISIONS:
        raise BackendError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and calibration is None:
        raise BackendError("--precision int8 needs --calibration (a folder of frames, a video or a profile)")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise BackendError(f"--exporter {exporter!r}: choose auto, dynamo or torchscript")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg = seg.eval()
    images, manifest = calibration_set(calibration, calibration_limit) if precision == "int8" else ([], [])
    start = time.perf_counter()
    if backend == "onnx":
        used = _export_onnx(seg, out, precision, images, exporter, int8 or Int8Options())
    else:
        used = _export_tensorrt(seg, out, precision, images, max_batch)
    quantisation = (int8 or Int8Options()).model_dump() if backend == "onnx" and precision == "int8" else {}
    info = EngineInfo(backend, precision, model_hash(seg), seg.config.image_size, max_batch, used,
                      round(time.perf_counter() - start, 2), manifest, quantisation=quantisation)
    info.write(out)
    return info


def _export_onnx(seg: Segmenter, out: Path, precision: str, images, exporter: str, int8: Int8Options) -> str:
    fp32 = out if precision == "fp32" else out.with_name(f".{out.name}.fp32.onnx")
    if exporter == "auto":
        try:
            export_onnx(seg, fp32, dynamo=True)
            used = "dynamo"
        except BackendError as exc:
            warnings.warn(f"the dynamo exporter failed, using the TorchScript exporter ({str(exc)[:300]})", stacklevel=2)
            export_onnx(seg, fp32, dynamo=False)
            used = "torchscript"
    else:
        export_onnx(seg, fp32, dynamo=exporter == "dynamo")
        used = exporter
    try:
        if precision == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(out))
        elif precision == "int8":
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process

            class Frames(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter(model_inputs(images, seg.config.image_size))

                def get_next(self):
                    x = next(self.batches, None)
                    return None if x is None else {"image": x.numpy()}

            # Shape inference and graph clean-up first (ORT's recommended pre-processing), and only
            # convolutions quantised: per-channel quantisation of the dynamo graph's fused linear
            # biases writes an Add that ORT then refuses to load.
            pre = out.with_name(f".{out.name}.pre.onnx")
            try:
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
                fmt = QuantFormat.QDQ if int8.format == "qdq" else QuantFormat.QOperator
                quantize_static(str(pre), str(out), Frames(), quant_format=fmt, per_channel=int8.per_channel,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["Conv"], nodes_to_exclude=edge_convs(pre) if int8.keep_edges else [])
            finally:
                pre.unlink(missing_ok=True)
        check_loadable(out)
    except Exception:
        out.unlink(missing_ok=True)  # nothing half-made under the final name
        raise
    finally:
        if fp32 != out:
            fp32.unlink(missing_ok=True)
    return used


def edge_convs(path: Path) -> list[str]:
    """Names of the first and the last convolution in graph order (the image's and the mask's)."""
    import onnx

    convs = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    return sorted({convs[0], convs[-1]}) if convs else []


def check_loadable(path: Path) -> None:
    """An engine that ONNX Runtime cannot open is an export failure, not a surprise at run time."""
    ort_session(path, problem="the exported model does not load in ONNX Runtime")


def _trt():
    try:
        import torch_tensorrt
    except ImportError:
        raise BackendError(f"tensorrt export needs torch-tensorrt: {TRT_EXTRA}") from None
    if not torch.cuda.is_available():
        raise BackendError("tensorrt export needs a CUDA GPU (export --backend onnx on CPU)")
    return torch_tensorrt


def _export_tensorrt(seg: Segmenter, out: Path, precision: str, images, max_batch: int) -> str:
    torch_tensorrt = _trt()
    s = seg.config.image_size
    example = torch.zeros(1, 3, s, s, device="cuda")
    if precision != "int8":
        module = TensorRTBackend(seg, "cuda", max_batch=max_batch, fp16=precision == "fp16").module
        torch_tensorrt.save(module, str(out), output_format="exported_program", inputs=[example])
        return "torch-tensorrt dynamo"
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.utils import export_torch_mode
    except ImportError:
        raise BackendError(f"tensorrt int8 needs TensorRT Model Optimizer (nvidia-modelopt): {TRT_EXTRA}") from None
    batches = [b.cuda() for b in model_inputs(images, s)]
    module = SingleStep(seg.cuda()).eval()

    def forward_loop(model):
        for b in batches:
            model(b)

    mtq.quantize(module, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)
    inputs = [torch_tensorrt.Input(min_shape=(1, 3, s, s), opt_shape=(max_batch, 3, s, s),
                                   max_shape=(max_batch, 3, s, s), dtype=torch.float32)]
    with torch.no_grad(), export_torch_mode():
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
        trt = torch_tensorrt.dynamo.compile(program, inputs=inputs, enabled_precisions={torch.int8, torch.float16},
                                            truncate_double=True)
        torch_tensorrt.save(trt, str(out), output_format="exported_program", inputs=[example])
    return "torch-tensorrt dynamo + modelopt int8"


# ---- loading ------------------------------------------------------------------------------------

def open_engine(seg: Segmenter, engine: str | Path, device: str = "cpu", threads: int | None = None,
                backend: str | None = None) -> Backend:
    """The backend that runs an exported engine file. `seg` supplies the input size and is checked
    against the checkpoint hash in the engine's sidecar, when there is one."""
    engine = Path(engine)
    if not engine.is_file():
        raise BackendError(f"--engine {engine}: no such file (make one with syndiff-stream export)")
    info = EngineInfo.read(engine)
    kind = info.backend if info else ("onnx" if engine.suffix == ".onnx" else "tensorrt")
    if backend not in (None, "auto", kind):
        raise BackendError(f"--engine {engine} is a {kind} engine, not {backend}")
    if info and info.model_hash != model_hash(seg):
        raise BackendError(f"--engine {engine} was exported from another checkpoint or torch version "
                           f"(hash {info.model_hash}, this model {model_hash(seg)}): pass the matching --model (and --tta) or re-export")
    if info and info.input_size != seg.config.image_size:
        raise BackendError(f"--engine {engine} takes {info.input_size}px input, the model {seg.config.image_size}px")
    if kind == "onnx":
        return OnnxBackend(seg, device, onnx_path=engine, threads=threads)
    _trt()
    return TensorRTBackend(seg, device if device != "cpu" else "cuda", max_batch=info.max_batch if info else 8,
                           engine_path=engine)
