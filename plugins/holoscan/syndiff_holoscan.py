"""Holoscan operator `SyndiffSegOp`: a frame tensor in, a mask tensor and an overlay out.

    source --frame--> SyndiffSegOp --mask-->    (uint8 H x W x 1, 255 = polyp)
                                   --overlay--> (uint8 H x W x 3, RGB, tinted and outlined)

Input: a TensorMap (dict of tensors, as Holoscan's replayer and format converter emit) holding an
RGB uint8 H x W x 3 (or x 4: alpha is dropped) tensor named by `in_tensor_name` (empty: the
first), or an array itself; host or CUDA memory (any object with __array_interface__ or
__cuda_array_interface__). Outputs are TensorMaps too, so C++ operators such as Holoviz can take
them. The model runs through syndiff_stream.segment.FrameSegmenter, the same stages as the CLI.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path


def preload_cuda_runtime() -> None:
    """Holoscan's libraries link libcudart.so.12; on a machine without the CUDA toolkit it comes
    from the nvidia-cuda-runtime-cu12 wheel, which is not on the loader's path: load it first."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    for folder in (spec.submodule_search_locations if spec else []):
        for lib in sorted(Path(folder, "lib").glob("libcudart.so.*")):
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return


preload_cuda_runtime()

import numpy as np  # noqa: E402
from holoscan.core import Operator, OperatorSpec  # noqa: E402

from syndiff_stream.segment import FrameSegmenter  # noqa: E402


def to_host_image(data, name: str = "") -> np.ndarray:
    """A received message -> RGB uint8 (H, W, 3) numpy array."""
    if isinstance(data, dict) or hasattr(data, "keys"):
        if not data:
            raise ValueError("SyndiffSegOp: received an empty tensor map")
        data = data[name] if name else data[next(iter(data.keys()))]
    if hasattr(data, "__cuda_array_interface__") and not hasattr(data, "__array_interface__"):
        import cupy

        data = cupy.asnumpy(cupy.asarray(data))
    image = np.asarray(data)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"SyndiffSegOp: expected an RGB uint8 H x W x 3 frame, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image[..., :3])


class SyndiffSegOp(Operator):
    """Keyword arguments as FrameSegmenter.load: model, backend, engine, profile, device, smooth."""

    def __init__(self, fragment, *args, model=None, backend: str = "eager", engine=None, profile=None,
                 device: str = "cpu", smooth: bool = True, in_tensor_name: str = "", **kwargs):
        self.segmenter = FrameSegmenter.load(model, backend, engine, profile, device, smooth)
        self.in_tensor_name = in_tensor_name
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("frame")
        spec.output("mask")
        spec.output("overlay")

    def compute(self, op_input, op_output, context):
        image = to_host_image(op_input.receive("frame"), self.in_tensor_name)
        result = self.segmenter(image)
        op_output.emit({"mask": (result.mask.astype(np.uint8) * 255)[..., None]}, "mask")
        op_output.emit({"overlay": self.segmenter.overlay(image, result)}, "overlay")
