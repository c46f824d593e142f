"""Inference backends behind one interface: `infer(batch) -> prob`.

`batch` is float32 (N, 3, S, S) in [-1, 1] on the backend's device; the result is the polyp
probability (N, 1, S, S) on the same device. All run the single-step model (one U-Net pass from
the model's fixed seeded noise), so every backend gives the same mask for the same frame.

  eager      the PyTorch module as is
  compile    torch.compile (inductor by default); compiles on the first batch of each shape
  onnx       ONNX Runtime, the fast CPU path: the single-step model exported once (noise baked
             in, the graph fixed for ORT: `export_module`) and cached by checkpoint hash
  tensorrt   torch-tensorrt FP16 on CUDA (optional extra: pip install 'syndiff-stream[trt]')
  openvino   OpenVINO's CPU runtime on the `onnx` file (a CPU path: pip install 'syndiff-stream[openvino]')

Named variants of these (session options, int8, bf16, channels-last) are the CPU paths of
`cpu_paths.py`; `make_backend` builds either by name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from .model import Segmenter

BACKENDS = ("eager", "compile", "onnx", "tensorrt")
ONNX_EXPORT_VERSION = 2  # bump when the exported graph changes, to invalidate cached files
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
    cpu_path: str | None = None  # the CPU path it was built as (cpu_paths.py), when one
    choice: dict | None = None  # how `--backend auto` chose that path (cpu_paths.Choice, as a dict)

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

    def infer_rows(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """Prepared frames, each (3, S, S) float32 on the host -> probabilities (N, S, S) on the
        host: the host runner's call, made on its worker thread so that batching the rows is that
        worker's work and not the submitting thread's."""
        return self.infer_numpy(torch.from_numpy(np.stack(rows)))

    def warmup(self, batch_sizes=(1,)) -> None:
        """Run once per batch size so lazy compilation and allocation happen before timing."""
        for n in batch_sizes:
            self.infer(torch.zeros(n, 3, self.input_size, self.input_size, device=self.device))


class TorchBackend(Backend):
    """What eager and compiled PyTorch share: an optional bf16 autocast (probabilities come back
    fp32) and channels-last memory (oneDNN's convolutions prefer NHWC on the CPU)."""

    def __init__(self, seg: Segmenter, device="cpu", bf16: bool = False, channels_last: bool = False):
        seg = seg.to(device)
        if channels_last:  # a copy: Module.to converts in place, and other backends share `seg`
            seg = copy.deepcopy(seg).to(memory_format=torch.channels_last)
        super().__init__(seg, device)
        self.bf16, self.channels_last = bf16, channels_last

    def _precision(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def _layout(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch


class EagerBackend(TorchBackend):
    """The PyTorch module as is; `timestep` and `steps` (DDIM passes, for comparison) are only
    here, where no graph is fixed by export or compilation."""

    name = "eager"

    def __init__(self, seg: Segmenter, device="cpu", timestep: int | None = None, steps: int = 1,
                 bf16: bool = False, channels_last: bool = False):
        super().__init__(seg, device, bf16, channels_last)
        if steps < 1:
            raise BackendError(f"--steps must be >= 1, got {steps}")
        self.timestep, self.steps = timestep, steps

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        batch = self._layout(batch)
        with self._precision():
            if self.steps > 1:
                prob = self.seg.predict_proba_multistep(batch, self.steps)
            else:
                prob = self.seg.predict_proba(batch, self.timestep)
        return prob.float()


class CompileBackend(TorchBackend):
    name = "compile"

    def __init__(self, seg: Segmenter, device="cpu", compiler: str = "inductor", mode: str | None = None,
                 bf16: bool = False, channels_last: bool = False, freezing: bool = False):
        super().__init__(seg, device, bf16, channels_last)
        # freezing: inductor treats the weights as constants, so it can fold them and prepack them
        # into oneDNN's blocked layout once (the CPU inference setting of inductor's docs)
        options = {"freezing": True} if freezing and compiler == "inductor" else None
        # CUDA graphs without inductor's graph trees: the trees live in the compiling thread's local
        # storage, and the CUDA runner calls the model from its own thread (AssertionError in get_obj)
        self.graphs = mode == "reduce-overhead" and compiler == "inductor"
        if self.graphs:
            mode, options = None, {**(options or {}), "triton.cudagraphs": True, "triton.cudagraph_trees": False}
        self.module = torch.compile(SingleStep(self.seg), backend=compiler, mode=mode, dynamic=False, options=options)

    @torch.inference_mode()
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        batch = self._layout(batch)
        with self._precision():
            out = self.module(batch)
        # a CUDA graph replays into the same output buffer: the caller keeps its own copy
        return out.clone().float() if self.graphs else out.float()


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


GRAPHS = ("fused", "plain")  # the ORT-shaped export (default) and the module exported as it is


def onnx_cache_path(seg: Segmenter, graph: str = "fused") -> Path:
    """Where the backend keeps this checkpoint's export, one file per graph kind (files named by the
    hash alone are from before the graph kinds, plain graphs: no longer read)."""
    return cache_dir() / "onnx" / f"{model_hash(seg)}-{graph}.onnx"


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


def fold_stem(seg: Segmenter) -> Segmenter:
    """A copy whose vision-encoder stem (pixel unshuffle by r) is folded into the first convolution.

    ORT runs the unshuffle as a 6-D Transpose, about a twentieth of the whole model's time on a
    Zen 2 core (profile in docs/runtime.md); a k x k convolution of the unshuffled image is the same
    sum as a (k r) x (k r) convolution of the image at stride r, padding p r, with the weights
    rearranged, so the copy computes the same probabilities (to float rounding) with no transpose."""
    stem, conv = seg.vision_encoder.stem, seg.vision_encoder.encoder.conv_in
    if not isinstance(stem, torch.nn.PixelUnshuffle) or conv.stride != (1, 1) or conv.groups != 1 \
            or conv.dilation != (1, 1) or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
        return seg
    r, (out_c, in_c, kh, kw) = stem.downscale_factor, conv.weight.shape
    c = in_c // (r * r)
    folded = torch.nn.Conv2d(c, out_c, (kh * r, kw * r), stride=r, padding=(conv.padding[0] * r, conv.padding[1] * r),
                             bias=conv.bias is not None)
    with torch.no_grad():  # unshuffled channel c*r*r + i*r + j, tap (dh, dw) -> image tap (dh*r + i, dw*r + j)
        folded.weight.copy_(conv.weight.view(out_c, c, r, r, kh, kw).permute(0, 1, 4, 2, 5, 3)
                            .reshape(out_c, c, kh * r, kw * r))
        if conv.bias is not None:
            folded.bias.copy_(conv.bias)
    seg = copy.deepcopy(seg)
    seg.vision_encoder.stem = torch.nn.Identity()
    seg.vision_encoder.encoder.conv_in = folded
    return seg


class FixedTimeEmbedding(torch.nn.Module):
    """A resnet block's timestep projection at the one inference timestep: a constant (1, C)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.value


def fold_time_embedding(seg: Segmenter) -> Segmenter:
    """A copy whose U-Net resnet blocks add their timestep embedding as a constant.

    Inference is one pass at `config.inference_timestep`, but diffusers computes the embedding per
    frame (the timestep broadcast to the batch), so the exported graph adds a (batch, C, 1, 1)
    tensor after each block's first convolution: ORT's NCHWc layout cannot keep that Add blocked
    and pays an extra pass over the feature map with a reorder around it. As a constant (1, C) it is
    folded into the convolution's bias (ORT's Conv + Add fusion) and the time MLP drops out of the
    graph. Exact for the inference timestep only, the one `SingleStep` uses."""
    from diffusers.models.resnet import ResnetBlock2D

    seg = copy.deepcopy(seg)
    unet = seg.unet
    with torch.no_grad():
        t = torch.tensor([seg.config.inference_timestep], dtype=torch.long)
        emb = unet.time_embedding(unet.time_proj(t).to(unet.dtype))
        for block in unet.modules():
            if isinstance(block, ResnetBlock2D) and block.time_emb_proj is not None:
                temb = emb if block.skip_time_act else block.nonlinearity(emb)
                block.time_emb_proj = FixedTimeEmbedding(block.time_emb_proj(temb))
    return seg


def drop_unit_reductions(path: Path) -> None:
    """Replace ReduceMean over axes of static size 1 by Identity (ORT then removes it): the mask
    decoder averages its single channel, an ORT kernel pass over every output pixel for nothing."""
    import onnx

    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    changed = False
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 1:  # opset 18+: axes are an input
            axes = consts.get(node.input[1])
        else:
            axes = attrs.get("axes")
        shape = shapes.get(node.input[0])
        axes = None if axes is None else [int(a) for a in np.atleast_1d(axes)]
        if axes and attrs.get("keepdims", 1) == 1 and shape and all(shape[a] == 1 for a in axes):
            node.op_type, changed = "Identity", True
            del node.input[1:]
            del node.attribute[:]
    if changed:
        onnx.save(model, str(path))


def export_module(seg: Segmenter, graph: str = "fused") -> torch.nn.Module:
    """The module `export_onnx` traces: `fused` (the default) folds the encoder stem into its first
    convolution (`fold_stem`); `plain` is the model as trained, kept to measure the difference."""
    if graph not in GRAPHS:
        raise BackendError(f"graph {graph!r}: choose one of {', '.join(GRAPHS)}")
    seg = seg.cpu().eval()
    return SingleStep(fold_time_embedding(fold_stem(seg)) if graph == "fused" else seg)


def export_onnx(seg: Segmenter, path: str | Path, dynamo: bool | None = None, graph: str = "fused") -> Path:
    """Export the single-step model (image -> prob, dynamic batch) to `path`, atomically.

    Tries the dynamo exporter first and falls back to the TorchScript exporter when torch.export
    cannot trace the diffusers blocks; `dynamo` forces one of them. `graph`: see `export_module`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    module = export_module(seg, graph)
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
            if graph == "fused":
                drop_unit_reductions(tmp)
            tmp.replace(path)
            return path
        except Exception as exc:  # each exporter fails in its own ways on diffusers blocks
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {type(exc).__name__}: {str(exc)[:200]}")
            tmp.unlink(missing_ok=True)
    raise BackendError("ONNX export failed; " + " | ".join(errors))


def ort_session(path: str | Path, options=None, providers=("CPUExecutionProvider",),
                problem: str = "not a loadable ONNX model", disabled_optimizers: tuple[str, ...] = ()):
    """An ONNX Runtime session, or one clear error naming the file (ONNX is protobuf, never unpickled)."""
    import onnxruntime as ort

    extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers), **extra)
    except Exception as exc:  # ORT raises its own pybind types
        raise BackendError(f"{path}: {problem} ({str(exc).splitlines()[0][:200]})") from None


class OrtOptions(BaseModel):
    """ONNX Runtime session settings a CPU path varies (docs/runtime.md, CPU paths). The defaults
    are the `onnx` backend's: every graph optimisation (on x86 that includes the NCHWc layout
    transformer, the biggest single win), idle threads that sleep, flush-to-zero off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    level: Literal["basic", "extended", "layout", "all"] = "all"
    spinning: bool = False  # idle pool threads spin: lower latency, but they take decode's cores
    denormal_as_zero: bool = False  # flush denormals (changes numerics: parity is measured)
    memory_pattern: bool = True  # plan the buffers once per input shape
    cpu_arena: bool = True  # ORT's own allocator arena
    # ORT graph transformers to skip by name, e.g. "QuickGeluFusion": SiLU then stays Sigmoid + Mul,
    # which the NCHWc layout keeps blocked, where the fused QuickGelu needs a reorder on each side
    disabled_optimizers: tuple[str, ...] = ()

    def session_options(self, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            # ORT_ENABLE_LAYOUT arrived in ORT 1.23; older versions fall back to everything
            "layout": getattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[self.level]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle ORT threads spin by default, taking the cores decode and publishing need in between.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        opts.add_session_config_entry("session.set_denormal_as_zero", "1" if self.denormal_as_zero else "0")
        opts.enable_mem_pattern = self.memory_pattern
        opts.enable_cpu_mem_arena = self.cpu_arena
        return opts


def ort_graph_ops(path: str | Path, options: OrtOptions | None = None) -> Counter:
    """Operator counts of the graph ONNX Runtime runs for the file under `options` (its level and
    disabled optimisers; the default: every optimisation, NCHWc layout included): what an export
    change or a session setting did to the graph, without timing it."""
    import onnx

    options = options or OrtOptions()
    with tempfile.TemporaryDirectory() as tmp:
        opts = options.session_options(1)
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        opts.log_severity_level = 3  # the note that an NCHWc graph is machine-specific
        ort_session(path, opts, disabled_optimizers=options.disabled_optimizers)
        return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


class OnnxBackend(Backend):
    """ONNX Runtime, the fast CPU path.

    A 4M-parameter graph is too small to split well across cores: ORT's thread pool spends its time
    synchronising (2 threads: 60 fps at batch 4 on this 2-core machine). Single-threaded session
    calls, one per core, do not wait on each other (2 x 1 thread: 95 fps). So on CPU the backend
    offers `max_workers` = its threads, and the pipeline runs that many calls at once in both modes
    (a batch per core recorded, a frame per core live); a caller that runs one call at a time (a
    plugin, `predict`) keeps every thread for it (see `configure`). `options` are the session
    settings, `graph` the export kind (`export_module`); `onnx_path` a given file instead."""

    name = "onnx"

    def __init__(self, seg: Segmenter, device="cpu", onnx_path: str | Path | None = None,
                 threads: int | None = None, workers: int | None = None, dynamo: bool | None = None,
                 options: OrtOptions | None = None, graph: str = "fused"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendError("the onnx backend needs ONNX Runtime: pip install 'syndiff-stream[onnx]'") from None
        super().__init__(seg, device)
        self.path = Path(onnx_path) if onnx_path else onnx_cache_path(seg, graph)
        if not self.path.is_file():
            export_onnx(seg, self.path, dynamo=dynamo, graph=graph)
        self.options = options or OrtOptions()
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
        opts = self.options.session_options(max(1, self.threads // workers))
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort_session(self.path, opts, providers, disabled_optimizers=self.options.disabled_optimizers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.buffers = threading.local()  # each calling thread's bound input and output (infer_rows)
        self.workers = workers
        return workers

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in batch.split(ONNX_MAX_BATCH):
            x = chunk.detach().cpu().contiguous().numpy()
            out.append(torch.from_numpy(self.session.run(None, {self.input_name: x})[0]))
        return torch.cat(out).to(batch.device)

    def infer_rows(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """The rows stacked straight into this thread's input buffer and the model's output written
        into its output buffer (ORT's I/O binding), both kept from call to call: no per-call
        allocation of a batch and an output of 1-3 MB each, nor the copies of `infer`'s torch
        round trip, on a core that is the model's (docs/runtime.md, "The runner's part, placed")."""
        import onnxruntime as ort

        n = len(rows)
        if self.device.type != "cpu" or n > ONNX_MAX_BATCH:
            return super().infer_rows(rows)
        own = self.buffers
        if getattr(own, "capacity", 0) < n:  # grown to the largest batch this thread has run
            size = self.input_size
            own.x = np.empty((n, 3, size, size), np.float32)
            own.prob = np.empty((n, 1, size, size), np.float32)
            own.binding = self.session.io_binding()
            own.capacity = n
        x, prob = own.x[:n], own.prob[:n]
        np.stack(rows, out=x)
        own.binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x))
        own.binding.bind_ortvalue_output(self.output_name, ort.OrtValue.ortvalue_from_numpy(prob))
        self.session.run_with_iobinding(own.binding)
        return prob[:, 0].copy()  # the buffer is this thread's next call's: the caller may keep it


class OpenVinoBackend(Backend):
    """OpenVINO's CPU plugin on the same exported ONNX file as `onnx` (one more CPU runtime, for
    the CPUs where its kernels beat ORT's; `cpu_paths` times it against the others). Like `onnx`,
    concurrent callers split the threads: one OpenVINO stream per worker, and each calling thread
    keeps its own infer request (a request runs one call at a time)."""

    name = "openvino"

    def __init__(self, seg: Segmenter, device="cpu", threads: int | None = None, workers: int | None = None,
                 graph: str = "fused", precision: str = "f32"):
        if precision not in ("f32", "bf16"):
            raise BackendError(f"openvino precision {precision!r}: f32 or bf16")
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise BackendError("the openvino path needs OpenVINO: pip install 'syndiff-stream[openvino]'") from None
        if torch.device(device).type != "cpu":
            raise BackendError(f"the openvino path runs on the CPU, not {device}")
        super().__init__(seg, device)
        self.path = onnx_cache_path(seg, graph)
        if not self.path.is_file():
            export_onnx(seg, self.path, graph=graph)
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.max_workers = self.threads
        self.precision = precision
        self.compiled = None
        self.configure(workers or 1)

    def configure(self, workers: int) -> int:
        import threading

        import openvino as ov

        workers = max(1, min(workers, self.max_workers))
        if self.compiled is not None and workers == self.workers:
            return workers
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises its own types
            raise BackendError(f"{self.path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": workers,
            # OpenVINO's own default is bf16 on CPUs with AMX or AVX512_BF16: it changes the masks,
            # so only the openvino-bf16 path (parity measured) asks for it
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": "LATENCY" if workers == 1 else "THROUGHPUT"})
        self.requests = threading.local()
        self.workers = workers
        return workers

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        request = getattr(self.requests, "request", None)
        if request is None:
            request = self.requests.request = self.compiled.create_infer_request()
        out = []
        for chunk in batch.split(ONNX_MAX_BATCH):
            result = request.infer({0: chunk.detach().cpu().contiguous().numpy()})
            out.append(torch.from_numpy(np.array(result[self.compiled.output(0)], copy=True)))
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
    """Backend by name, or a CPU path by name (`cpu_paths.PATHS`). `threads` caps CPU threads
    (torch intra-op, or ORT's session)."""
    from .cpu_paths import PATHS, build_path

    calibration = kwargs.pop("calibration", None)
    if name in PATHS and name not in BACKENDS:
        return build_path(name, seg, device, threads, calibration=calibration, **kwargs)
    if calibration is not None:
        raise BackendError(f"--calibration is for the int8 CPU paths ({', '.join(p for p in PATHS if 'int8' in p)}), "
                           f"not {name}")
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)} "
                           f"or a CPU path ({', '.join(p for p in PATHS if p not in BACKENDS)})")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    if threads:
        torch.set_num_threads(threads)  # also what eager comparisons (bench --compare-steps) use
    if name == "eager":
        backend = EagerBackend(seg, device)
    elif name == "compile":
        backend = CompileBackend(seg, device, **kwargs)
    elif name == "onnx":
        backend = OnnxBackend(seg, device, threads=threads, **kwargs)
    else:
        return TensorRTBackend(seg, device, **kwargs)
    if backend.device.type == "cpu":
        backend.cpu_path = name  # the CPU path of the same name (cpu_paths.PATHS) is this backend
    return backend
