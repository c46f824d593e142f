"""Inference backends behind one interface: `infer(batch) -> prob`.

`batch` is float32 (N, 3, S, S) in [-1, 1] on the backend's device; the result is the polyp
probability (N, 1, S, S) on the same device. All run the single-step model (one U-Net pass from
the model's fixed seeded noise), so every backend gives the same mask for the same frame.

  eager      the PyTorch module as is
  compile    torch.compile (inductor by default); compiles on the first batch of each shape
  onnx       ONNX Runtime, the fast CPU path: the single-step model exported once (noise baked
             in) and cached by checkpoint hash
  tensorrt   torch-tensorrt FP16 on CUDA (optional extra: pip install 'syndiff-stream[trt]')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .model import Segmenter

BACKENDS = ("eager", "compile", "onnx", "tensorrt")
ONNX_EXPORT_VERSION = 1  # bump when the exported graph changes, to invalidate cached files
ONNX_MAX_BATCH = 32  # diffusers' upsampler branches on batch >= 64; stay below it


class BackendError(RuntimeError):
    """A backend that cannot run here: names what is missing."""


class SingleStep(torch.nn.Module):
    """image -> probability, the graph that is compiled or exported (noise is a buffer inside)."""

    def __init__(self, seg: Segmenter):
        super().__init__()
        self.seg = seg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg.predict_proba(x)


class Backend:
    name = "base"
    max_batch = ONNX_MAX_BATCH
    workers = 1  # `infer` calls that may run at once, each on its own share of the cores
    max_workers = 1

    def configure(self, workers: int) -> int:
        """Ask for `workers` concurrent `infer` calls; returns how many this backend runs well."""
        return self.workers

    def __init__(self, seg: Segmenter, device: str | torch.device = "cpu"):
        self.seg = seg.eval()
        self.device = torch.device(device)
        self.input_size = seg.config.image_size

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def infer_numpy(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) on any device -> probabilities (N, S, S) as float32 numpy on the host."""
        return self.infer(batch.to(self.device))[:, 0].float().cpu().numpy()

    def warmup(self, batch_sizes=(1,)) -> None:
        """Run once per batch size so lazy compilation and allocation happen before timing."""
        for n in batch_sizes:
            self.infer(torch.zeros(n, 3, self.input_size, self.input_size, device=self.device))


class EagerBackend(Backend):
    """The PyTorch module as is; `timestep` and `steps` (DDIM passes, for comparison) are only
    here, where no graph is fixed by export or compilation."""

    name = "eager"

    def __init__(self, seg: Segmenter, device="cpu", timestep: int | None = None, steps: int = 1):
        super().__init__(seg.to(device), device)
        if steps < 1:
            raise BackendError(f"--steps must be >= 1, got {steps}")
        self.timestep, self.steps = timestep, steps

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        if self.steps > 1:
            return self.seg.predict_proba_multistep(batch, self.steps)
        return self.seg.predict_proba(batch, self.timestep)


class CompileBackend(Backend):
    name = "compile"

    def __init__(self, seg: Segmenter, device="cpu", compiler: str = "inductor", mode: str | None = None):
        super().__init__(seg.to(device), device)
        self.module = torch.compile(SingleStep(self.seg), backend=compiler, mode=mode, dynamic=False)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)


# ---- ONNX Runtime -------------------------------------------------------------------------------

def model_hash(seg: Segmenter) -> str:
    """Content hash of config + weights: the ONNX cache key (same checkpoint, same file)."""
    h = hashlib.sha256(json.dumps({"v": ONNX_EXPORT_VERSION, "torch": torch.__version__,
                                   "config": repr(seg.config)}, sort_keys=True).encode())
    for name, tensor in sorted(seg.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("SYNDIFF_CACHE", Path.home() / ".cache" / "syndiff-stream"))


@contextmanager
def quiet_logger(name: str):
    """The exporters log pages of notes about operators this graph never uses."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(seg: Segmenter, path: str | Path, dynamo: bool | None = None) -> Path:
    """Export the single-step model (image -> prob, dynamic batch) to `path`, atomically.

    Tries the dynamo exporter first and falls back to the TorchScript exporter when torch.export
    cannot trace the diffusers blocks; `dynamo` forces one of them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    module = SingleStep(seg.cpu().eval())
    size = seg.config.image_size
    example = (torch.zeros(2, 3, size, size),)
    attempts = [True, False] if dynamo is None else [dynamo]
    errors = []
    for use_dynamo in attempts:
        try:
            with warnings.catch_warnings(), quiet_logger("torch.onnx"), quiet_logger("torch.export"):
                warnings.simplefilter("ignore")
                if use_dynamo:
                    batch = torch.export.Dim("batch", min=1, max=ONNX_MAX_BATCH)
                    torch.onnx.export(module, example, str(tmp), dynamo=True, input_names=["image"],
                                      output_names=["prob"], dynamic_shapes={"x": {0: batch}},
                                      external_data=False, verbose=False)
                else:
                    torch.onnx.export(module, example, str(tmp), dynamo=False, input_names=["image"],
                                      output_names=["prob"], opset_version=17,
                                      dynamic_axes={"image": {0: "batch"}, "prob": {0: "batch"}})
            tmp.replace(path)
            return path
        except Exception as exc:  # each exporter fails in its own ways on diffusers blocks
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {type(exc).__name__}: {str(exc)[:200]}")
            tmp.unlink(missing_ok=True)
    raise BackendError("ONNX export failed; " + " | ".join(errors))


def ort_session(path: str | Path, options=None, providers=("CPUExecutionProvider",),
                problem: str = "not a loadable ONNX model"):
    """An ONNX Runtime session, or one clear error naming the file (ONNX is protobuf, never unpickled)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # ORT raises its own pybind types
        raise BackendError(f"{path}: {problem} ({str(exc).splitlines()[0][:200]})") from None


class OnnxBackend(Backend):
    """ONNX Runtime, the fast CPU path.

    A 4M-parameter graph is too small to split well across cores: ORT's thread pool spends its time
    synchronising (2 threads: 60 fps at batch 4 on this 2-core machine). Single-threaded session
    calls, one per core, do not wait on each other (2 x 1 thread: 95 fps). So on CPU the backend
    offers `max_workers` = its threads, and the pipeline runs that many calls at once in both modes
    (a batch per core recorded, a frame per core live); a caller that runs one call at a time (a
    plugin, `predict`) keeps every thread for it (see `configure`)."""

    name = "onnx"

    def __init__(self, seg: Segmenter, device="cpu", onnx_path: str | Path | None = None,
                 threads: int | None = None, workers: int | None = None, dynamo: bool | None = None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendError("the onnx backend needs ONNX Runtime: pip install 'syndiff-stream[onnx]'") from None
        super().__init__(seg, device)
        self.path = Path(onnx_path) if onnx_path else cache_dir() / "onnx" / f"{model_hash(seg)}.onnx"
        if not self.path.is_file():
            export_onnx(seg, self.path, dynamo=dynamo)
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.max_workers = self.threads if self.device.type == "cpu" else 1
        self.session = None
        self.configure(workers or 1)  # a caller that runs one call at a time gets every thread

    def configure(self, workers: int) -> int:
        """Split the threads into `workers` single-session callers (CPU); returns the workers set."""
        import onnxruntime as ort

        workers = max(1, min(workers, self.max_workers))
        if self.session is not None and workers == self.workers:
            return workers
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = max(1, self.threads // workers)
        opts.inter_op_num_threads = 1
        # Idle ORT threads spin by default, taking the cores decode and publishing need in between.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort_session(self.path, opts, providers)
        self.input_name = self.session.get_inputs()[0].name
        self.workers = workers
        return workers

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in batch.split(ONNX_MAX_BATCH):
            x = chunk.detach().cpu().contiguous().numpy()
            out.append(torch.from_numpy(self.session.run(None, {self.input_name: x})[0]))
        return torch.cat(out).to(batch.device)


# ---- TensorRT -----------------------------------------------------------------------------------

class TensorRTBackend(Backend):
    """torch-tensorrt FP16 engine built for batch sizes 1..max_batch at the model's input size."""

    name = "tensorrt"

    def __init__(self, seg: Segmenter, device="cuda", max_batch: int = 8, fp16: bool = True,
                 engine_path: str | Path | None = None):
        try:
            import torch_tensorrt
        except ImportError:
            raise BackendError("the tensorrt backend needs torch-tensorrt: pip install 'syndiff-stream[trt]'") from None
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise BackendError("the tensorrt backend needs a CUDA GPU (use --backend onnx on CPU)")
        super().__init__(seg.to(device), device)
        self.max_batch = max_batch
        if engine_path is not None:  # an exported program written by `syndiff-stream export`
            # torch.export.load only: torch_tensorrt.load tries TorchScript (pickle) first. Importing
            # torch_tensorrt above registers the TensorRT ops the program calls.
            self.module = torch.export.load(str(engine_path)).module()
            return
        s = self.input_size
        inputs = [torch_tensorrt.Input(min_shape=(1, 3, s, s), opt_shape=(max_batch, 3, s, s),
                                       max_shape=(max_batch, 3, s, s), dtype=torch.float32)]
        precisions = {torch.float16, torch.float32} if fp16 else {torch.float32}
        self.module = torch_tensorrt.compile(SingleStep(self.seg), ir="dynamo", inputs=inputs,
                                             enabled_precisions=precisions, truncate_double=True)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.module(c).float() for c in batch.split(self.max_batch)])


def pick_device(name: str) -> str:
    """cpu | cuda | cuda:N | auto (cuda when torch sees a GPU) -> the device to run on; the one
    copy of device choice (the CLI's --device, plugins, the device check)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise BackendError(f"--device {name!r}: choose cpu, cuda or auto")
    if name != "cpu" and not torch.cuda.is_available():
        raise BackendError(f"--device {name}: no CUDA GPU is available here (use --device cpu)")
    return name


def resolve_backend(name: str, device: str) -> str:
    """`auto` -> the fastest backend installed for `device` (tensorrt on CUDA, onnx on CPU, else
    eager); any other name unchanged."""
    import importlib.util

    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "tensorrt" if importlib.util.find_spec("torch_tensorrt") else "eager"
    return "onnx" if importlib.util.find_spec("onnxruntime") else "eager"


def make_backend(name: str, seg: Segmenter, device: str = "cpu", threads: int | None = None, **kwargs) -> Backend:
    """Backend by name. `threads` caps CPU threads (torch intra-op, or ORT's session)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    if threads:
        torch.set_num_threads(threads)  # also what eager comparisons (bench --compare-steps) use
    if name == "eager":
        return EagerBackend(seg, device)
    if name == "compile":
        return CompileBackend(seg, device, **kwargs)
    if name == "onnx":
        return OnnxBackend(seg, device, threads=threads, **kwargs)
    return TensorRTBackend(seg, device, **kwargs)
