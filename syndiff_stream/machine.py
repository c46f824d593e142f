"""What this machine can do, so that a speed reads as a share of it rather than as a fact about the day.

The CPU changes from session to session (an AVX-512 machine one day, AVX2 the next), so an absolute
frames-per-second figure says more about the machine than about the code. `bench` therefore
reports the model's floating-point work per frame, the machine's measured dense fp32 throughput
(a short matmul probe on the same threads), and the frame rate that would give: the ceiling. The
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


def matmul_gflops(threads: int, device: torch.device | None = None, size: int = 1024, seconds: float = 1.0) -> float:
    """Dense fp32 matmul throughput in GFLOP/s on `threads` torch threads (the best of short
    bursts for about `seconds`: the machine's attainable peak, not its average under load)."""
    device = device or torch.device("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        torch.mm(a, b)  # warm-up: allocation, kernel choice
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 4 * 2 * size ** 3 / (time.perf_counter() - start) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


def ceiling(seg, threads: int, model_fps: float, e2e_fps: float, device: torch.device | None = None) -> dict:
    """The frame rate the machine's fp32 throughput allows for this model, and the share of it the
    model and the pipeline reach (`bench`'s `ceiling` block; docs/runtime.md)."""
    flops = model_flops(seg, torch.device("cpu"))
    gflops = matmul_gflops(threads, device)
    top = gflops * 1e9 / flops
    out = {"cpu": cpu_facts(), "threads": threads, "matmul_gflops": round(gflops, 1),
           "model_gflop_per_frame": round(flops / 1e9, 4), "ceiling_fps": round(top, 1),
           "model_share": round(model_fps / top, 3) if model_fps else None,
           "pipeline_share": round(e2e_fps / top, 3) if e2e_fps else None,
           "pipeline_of_model": round(e2e_fps / model_fps, 3) if model_fps and e2e_fps else None}
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
