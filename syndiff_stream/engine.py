"""The two middle stages of the graph: preprocess a frame, run a batch through the backend.

On CPU, `Preprocessor` runs in the decode thread (so it overlaps inference) and `HostRunner`
calls the backend. On CUDA, the heavy part of preprocessing (crop, resize, normalise the full
frame) runs on the device inside `CudaRunner`, which overlaps upload, compute and download of
consecutive batches on three CUDA streams with pinned, double-buffered host memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backends import Backend
from .frames import Frame
from .preprocess import FieldOfView, find_field_of_view, prepare, to_model_range


@dataclass(frozen=True)
class Prepared:
    """A frame with its field of view and, on the CPU path, its model input (3, S, S)."""

    frame: Frame
    fov: FieldOfView
    x: np.ndarray | None = None


class Preprocessor:
    """Frame -> Prepared. `on_device` leaves the crop/resize to the GPU runner (the field of view
    is still found here, on a 128-pixel thumbnail, which is cheap)."""

    def __init__(self, size: int, on_device: bool = False):
        self.size, self.on_device = size, on_device

    def __call__(self, frame: Frame) -> Prepared:
        if self.on_device:
            return Prepared(frame, find_field_of_view(frame.image))
        x, fov = prepare(frame.image, self.size)
        return Prepared(frame, fov, x)


def prepare_on_device(images: torch.Tensor, fovs: Sequence[FieldOfView], size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) on any device -> model input (N, 3, S, S) in [-1, 1]: crop each field of
    view, resize with antialiasing (the GPU counterpart of OpenCV's INTER_AREA), normalise."""
    out = []
    for image, fov in zip(images, fovs):
        crop = image[fov.y0:fov.y1, fov.x0:fov.x1].permute(2, 0, 1)[None].float()
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return to_model_range(torch.cat(out))


class Done:
    """A finished batch (CPU path): `result()` returns model-resolution probabilities (N, S, S)."""

    def __init__(self, prob: np.ndarray):
        self.prob = prob

    def result(self) -> np.ndarray:
        return self.prob


class HostRunner:
    """CPU path: the backend batches the prepared inputs and infers; numpy in and out.

    A backend with `workers` > 1 (ONNX Runtime: one single-threaded session call per core) gets a
    thread pool and that many batches in flight; the pipeline still collects them in order. The
    worker, not the submitting thread, batches the rows (`Backend.infer_rows`)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.depth = max(1, backend.workers)  # batches in flight
        self.pool = ThreadPoolExecutor(self.depth, thread_name_prefix="infer") if self.depth > 1 else None

    def _call(self, rows: list[np.ndarray]) -> Done | Future:
        return self.pool.submit(self.backend.infer_rows, rows) if self.pool else Done(self.backend.infer_rows(rows))

    def submit(self, items: Sequence[Prepared]) -> Done | Future:
        return self._call([item.x for item in items])

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """One call per batch size on every pool thread at once, before the first frame: a first
        call allocates (ORT's arena, each thread's scratch and bound buffers), and on a live stream
        its 100-400 ms would fall on the first frames, which then wait past the budget or crowd the
        buffer."""
        size = self.backend.input_size
        for n in batch_sizes:
            rows = [np.zeros((3, size, size), np.float32)] * n
            for handle in [self._call(rows) for _ in range(self.depth)]:
                handle.result()

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


class CudaPending:
    def __init__(self, done: torch.cuda.Event, host_out: torch.Tensor):
        self.done, self.host_out = done, host_out

    def result(self) -> np.ndarray:
        self.done.synchronize()
        return self.host_out.numpy().copy()  # the pinned slot is reused two batches later


class CudaRunner:
    """GPU path: batch k+1 uploads while batch k computes and batch k-1 downloads.

    Each of the `depth` slots owns a pinned input buffer (raw uint8 frames) and a pinned output
    buffer (probabilities); the pipeline keeps at most `depth` batches in flight and collects the
    oldest before reusing its slot, so a slot is never overwritten while the GPU still reads it.
    Events order the streams: compute waits for its upload, download waits for its compute."""

    depth = 2

    def __init__(self, backend: Backend):
        if backend.device.type != "cuda":
            raise ValueError("CudaRunner needs a backend on a CUDA device")
        self.backend, self.device, self.size = backend, backend.device, backend.input_size
        self.upload, self.compute, self.download = (torch.cuda.Stream(self.device) for _ in range(3))
        self.slots: list[dict | None] = [None] * self.depth
        self.turn = 0

    def _slot(self, n: int, h: int, w: int) -> dict:
        index = self.turn % self.depth
        self.turn += 1
        slot = self.slots[index]
        if slot is None or slot["in"].shape[0] < n or slot["in"].shape[1:3] != (h, w):
            slot = self.slots[index] = {
                "in": torch.empty((n, h, w, 3), dtype=torch.uint8).pin_memory(),
                "out": torch.empty((n, self.size, self.size), dtype=torch.float32).pin_memory(),
            }
        return slot

    @torch.inference_mode()
    def submit(self, items: Sequence[Prepared]) -> CudaPending:
        n = len(items)
        h, w = items[0].frame.shape
        slot = self._slot(n, h, w)
        host_in, host_out = slot["in"][:n], slot["out"][:n]
        for i, item in enumerate(items):
            host_in[i].numpy()[...] = item.frame.image
        with torch.cuda.stream(self.upload):
            dev_in = host_in.to(self.device, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(self.upload)
        with torch.cuda.stream(self.compute):
            self.compute.wait_event(uploaded)
            dev_in.record_stream(self.compute)  # allocated on upload, used here: keep it alive
            x = prepare_on_device(dev_in, [item.fov for item in items], self.size)
            prob = self.backend.infer(x)[:, 0]
            computed = torch.cuda.Event()
            computed.record(self.compute)
        with torch.cuda.stream(self.download):
            self.download.wait_event(computed)
            prob.record_stream(self.download)
            host_out.copy_(prob, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.download)
        return CudaPending(done, host_out)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Lazy compilation (TensorRT engines, cuDNN autotuning) before the first frame."""
        self.backend.warmup(batch_sizes)
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        pass


def make_runner(backend: Backend) -> HostRunner | CudaRunner:
    return CudaRunner(backend) if backend.device.type == "cuda" else HostRunner(backend)
