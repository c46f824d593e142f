"""Frame-at-a-time segmentation for hosts that own the threads and buffers (GStreamer, Holoscan).

The pipeline's own stage chain (`stages.Stages`: preprocess with the profile's field of view and
colour correction -> backend -> NaN/inf guard -> smoother -> polyps), called on one frame at a
time, plus the overlay. No queues, no threads: the host framework schedules `__call__`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .backends import Backend, make_backend
from .calibration import Profile, load_profile
from .frames import Frame, Result
from .model import Segmenter
from .overlay import render_overlay
from .stages import Stages

Segmented = Result  # what FrameSegmenter returns: prob, mask, polyps, valid, fov (older name kept)


class FrameSegmenter:
    def __init__(self, backend: Backend, profile: Profile | None = None, smooth: bool = True):
        # No profile: the default one at the model's operating point (FOV found per frame, colours as they are).
        profile = profile or Profile.for_model(backend.seg.config)
        self.backend, self.profile = backend, profile
        self.stages = Stages.for_profile(backend, profile, smooth)
        self.index = 0

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "eager", engine: str | Path | None = None,
             profile: str | Path | None = None, device: str = "cpu", smooth: bool = True,
             threads: int | None = None) -> "FrameSegmenter":
        """From paths, as plugin properties give them; `engine` is a file from `syndiff-stream export`."""
        from .export import open_engine

        seg = Segmenter.from_pretrained(model)
        be = open_engine(seg, engine, device, threads) if engine else make_backend(backend, seg, device, threads=threads)
        return cls(be, load_profile(profile) if profile else None, smooth)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> Result:
        """RGB uint8 (H, W, 3) -> Result: probability and mask at the frame's resolution, polyps,
        and `valid` False (empty mask) when the model's output had NaN/inf."""
        result = self.stages(Frame(image, "host", self.index, None))
        self.index += 1
        return result

    @staticmethod
    def overlay(image: np.ndarray, result: Result) -> np.ndarray:
        return render_overlay(image, result.mask)
