"""What this machine can do, so that a speed reads as a share of it rather than as a fact about the day.

The CPU changes from session to session (an AVX-512 machine one day, AVX2 the next), so an absolute
frames-per-second figure says more about the machine than about the code. `bench` therefore
reports the model's floating-point work per frame, the machine's measured dense fp32 throughput
(short GEMM probes on the same threads, the best of torch's and ONNX Runtime's), and the frame rate
that would give: the ceiling. The
share of it that the model and the whole pipeline reach is the figure that compares across days.
The same CPU facts are what a training run records (`syndiff_trainer.machine`).
"""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch

# CPU flags that choose kernels (x86 and Arm); the rest of /proc/cpuinfo's flags do not.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpu_facts() -> dict:
    """CPU model and its kernel-choosing vector extensions, from /proc/cpuinfo where there is one,
    and the level of torch's own CPU kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        text = info.read_text(errors="replace")
        found = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        words = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        flags = set(words.group(1).split()) if words else set()
    return {"model": model, "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
            "kernel_capability": torch.backends.cpu.get_cpu_capability()}


def model_flops(seg, device: torch.device | None = None) -> int:
    """Floating-point operations of one single-step inference on one frame (torch's FlopCounterMode:
    2 per multiply-add of every convolution and matmul; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = device or next(seg.parameters()).device
    x = torch.zeros(1, 3, seg.config.image_size, seg.config.image_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        seg.predict_proba(x)
    return int(counter.get_total_flops())


PROBE_SIZES = (512, 1024)  # square fp32 GEMMs: one that stays in cache, one that streams


def _best_gflops(run, size: int, seconds: float, sync=lambda: None) -> float:
    """The best of short bursts of `run` (one size x size GEMM) for about `seconds`."""
    run()  # warm-up: allocation, kernel choice
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync()
        start = time.perf_counter()
        for _ in range(4):
            run()
        sync()
        best = max(best, 4 * 2 * size ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def _ort_gemm(threads: int, size: int):
    """One ONNX Runtime MatMul (MLAS's GEMM, the kernels the default CPU path runs on) as a callable;
    None without onnxruntime."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
        [numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "b")])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.standard_normal((size, size), dtype=np.float32)}
    return lambda: session.run(None, feed)


def matmul_probes(threads: int, device: torch.device | None = None, sizes=PROBE_SIZES,
                  seconds: float = 1.0) -> dict[str, float]:
    """Dense fp32 GEMM throughput in GFLOP/s per library on `threads` threads, each the best of
    short bursts (the attainable peak, not the average under load). On a CPU both torch's BLAS and
    ONNX Runtime's MLAS: which is faster depends on the CPU (torch's MKL takes a slower path on
    AMD: 195 against MLAS's 464 GFLOP/s on a Zen 5, docs/runtime.md), and the ceiling must be what
    this machine can do, not what one library does on it."""
    device = device or torch.device("cpu")
    per = seconds / (len(sizes) * (1 if device.type == "cuda" else 2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        for size in sizes:
            a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
            out["torch"] = max(out.get("torch", 0.0), _best_gflops(lambda: torch.mm(a, b), size, per, sync))
    finally:
        torch.set_num_threads(before)
    if device.type == "cpu":
        for size in sizes:
            gemm = _ort_gemm(threads, size)
            if gemm is not None:
                out["onnxruntime"] = max(out.get("onnxruntime", 0.0), _best_gflops(gemm, size, per))
    return out


def matmul_gflops(threads: int, device: torch.device | None = None, size: int | None = None,
                  seconds: float = 1.0) -> float:
    """The machine's dense fp32 throughput: the best library's GEMM (`matmul_probes`)."""
    return max(matmul_probes(threads, device, (size,) if size else PROBE_SIZES, seconds).values())


def ceiling(seg, threads: int, model_fps: float, e2e_fps: float, device: torch.device | None = None,
            model_alone_fps: float | None = None) -> dict:
    """The frame rate the machine's fp32 throughput allows for this model, and the share of it the
    model and the pipeline reach (`bench`'s `ceiling` block; docs/runtime.md). `model_fps` is the
    model inside the pipeline, sharing the cores with decoding and finishing; `model_alone_fps`
    the model with the cores to itself, the figure a kernel or runtime change moves."""
    flops = model_flops(seg, torch.device("cpu"))
    probes = matmul_probes(threads, device)
    library = max(probes, key=probes.get)
    gflops = probes[library]
    top = gflops * 1e9 / flops
    share = lambda fps: round(fps / top, 3) if fps else None  # noqa: E731
    of = lambda fps, whole: round(fps / whole, 3) if fps and whole else None  # noqa: E731
    out = {"cpu": cpu_facts(), "threads": threads, "matmul_gflops": round(gflops, 1), "matmul_library": library,
           "matmul_probes": {k: round(v, 1) for k, v in probes.items()},
           "model_gflop_per_frame": round(flops / 1e9, 4), "ceiling_fps": round(top, 1),
           "model_alone_fps": round(model_alone_fps, 2) if model_alone_fps else None,
           "model_alone_share": share(model_alone_fps),
           "model_share": share(model_fps), "pipeline_share": share(e2e_fps),
           "pipeline_of_model": of(e2e_fps, model_fps), "pipeline_of_model_alone": of(e2e_fps, model_alone_fps)}
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
