"""Frame-at-a-time segmentation for hosts that own the threads and buffers (GStreamer, Holoscan).

The same stages as the pipeline, called in order on one frame: preprocess (profile's field of view
and colour correction) -> backend -> smoother -> mask, plus the overlay. No queues, no threads: the
host framework schedules `__call__`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backends import Backend, make_backend
from .calibration import Profile, ProfilePreprocessor, load_profile
from .frames import Frame
from .model import Segmenter
from .overlay import render_overlay
from .smoothing import Smoother


@dataclass(frozen=True)
class Segmented:
    prob: np.ndarray  # float32 (H, W): smoothed polyp probability at source resolution
    mask: np.ndarray  # bool (H, W)


class FrameSegmenter:
    def __init__(self, backend: Backend, profile: Profile | None = None, smooth: bool = True):
        # No profile: the default one at the model's threshold (FOV found per frame, colours as they are).
        profile = profile or Profile(threshold=backend.seg.config.threshold)
        self.backend, self.profile = backend, profile
        self.preprocess = ProfilePreprocessor(backend.input_size, profile)
        self.smoother = Smoother(profile.smoothing_config(smooth))
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
    def __call__(self, image: np.ndarray) -> Segmented:
        """RGB uint8 (H, W, 3) -> probability and mask at the frame's resolution."""
        item = self.preprocess(Frame(image, "host", self.index, None))
        self.index += 1
        x = torch.from_numpy(item.x[None]).to(self.backend.device)
        prob = self.backend.infer(x)[0, 0].cpu().numpy()
        return Segmented(*self.smoother.update(image, prob, item.fov))

    @staticmethod
    def overlay(image: np.ndarray, result: Segmented) -> np.ndarray:
        return render_overlay(image, result.mask)
