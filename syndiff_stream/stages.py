"""The stage chain every way of segmenting goes through, so a guard added here holds everywhere:

    preprocess (field of view, profile colour) -> backend (runner) -> guard (NaN/inf) -> smoother -> polyps

`Pipeline` runs these stages on its threads (decode, inference, finish); `FrameSegmenter` (the
GStreamer and Holoscan plugins), `predict` and `calibrate` call the same objects one frame or one
batch at a time. Nothing here owns a thread or a queue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .backends import Backend
from .engine import Prepared, Preprocessor, make_runner
from .frames import Frame, Result
from .postprocess import find_polyps
from .smoothing import Smoother, SmoothingConfig


def is_valid(prob: np.ndarray) -> bool:
    """The guard: model output with NaN or inf is no answer (overflow, a broken engine)."""
    return bool(np.isfinite(prob).all())


def default_smoothing(smooth: bool, threshold: float) -> SmoothingConfig | None:
    """The CLI's smoothing when no profile says otherwise: motion-aware, no hysteresis (docs/runtime.md)."""
    return SmoothingConfig.at(threshold) if smooth else None


class Stages:
    """The stages after decoding, as one object.

    `preprocess` replaces the default stage (e.g. a profile's ProfilePreprocessor); `smoothing`
    None keeps the model's per-frame masks (prob >= the model's threshold)."""

    def __init__(self, backend: Backend, preprocess: Preprocessor | None = None,
                 smoothing: SmoothingConfig | None = None):
        self.backend = backend
        self.preprocess = preprocess or Preprocessor(backend.input_size, on_device=backend.device.type == "cuda")
        self.smoother = Smoother(smoothing or SmoothingConfig.off(backend.seg.config.threshold))
        self.find_polyps = find_polyps
        self.invalid = 0  # frames whose model output had NaN/inf
        self._runner = None

    @classmethod
    def for_profile(cls, backend: Backend, profile=None, smooth: bool = True) -> "Stages":
        """With a calibration profile: its preprocess stage (field of view, colour) and smoothing;
        without: the defaults (field of view found per frame, `default_smoothing`)."""
        from .calibration import ProfilePreprocessor

        if profile is None:
            return cls(backend, smoothing=default_smoothing(smooth, backend.seg.config.threshold))
        on_device = backend.device.type == "cuda"
        return cls(backend, ProfilePreprocessor(backend.input_size, profile, on_device=on_device),
                   profile.smoothing_config(smooth))

    @property
    def runner(self):
        """The backend's runner for calls outside the pipeline (which makes its own, configured)."""
        if self._runner is None:
            self._runner = make_runner(self.backend)
        return self._runner

    def infer(self, items: Sequence[Prepared]) -> np.ndarray:
        """Prepared items of one frame size -> model-resolution probabilities (N, S, S)."""
        return self.runner.submit(list(items)).result()

    def finish(self, item: Prepared, prob: np.ndarray) -> Result:
        """Model output -> Result at source resolution: guard, smoother, polyps."""
        frame = item.frame
        if not is_valid(prob):
            # NaN/inf from the model (overflow, a broken engine): never threshold garbage into a
            # mask. An empty mask flagged invalid, kept out of the EMA's memory.
            self.invalid += 1
            self.smoother.reset()
            empty = np.zeros(frame.shape, np.float32)
            return Result(frame, empty, empty.astype(bool), [], item.fov,
                          time.time() - frame.capture_time, valid=False)
        prob_src, mask = self.smoother.update(frame.image, prob, item.fov)
        return Result(frame, prob_src, mask, self.find_polyps(mask, prob_src), item.fov,
                      time.time() - frame.capture_time)

    def __call__(self, frame: Frame) -> Result:
        """One frame through every stage, in order (no threads, no queues)."""
        item = self.preprocess(frame)
        return self.finish(item, self.infer([item])[0])

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
