"""The stage chain every way of segmenting goes through, so a guard added here holds everywhere:

    preprocess (field of view, profile colour) -> backend (runner) -> guard (NaN/inf) -> smoother -> polyps -> gate

`Pipeline` runs these stages on its threads (decode, inference, finish); `FrameSegmenter` (the
GStreamer and Holoscan plugins), `predict` and `calibrate` call the same objects one frame or one
batch at a time. Nothing here owns a thread or a queue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .allocator import retain_freed_memory
from .backends import Backend
from .engine import Prepared, Preprocessor, make_runner
from .frames import Frame, Result
from .gating import AlarmGate, GateConfig
from .model import SegmenterConfig
from .postprocess import find_polyps
from .smoothing import Smoother, SmoothingConfig


def is_valid(prob: np.ndarray) -> bool:
    """The guard: model output with NaN or inf is no answer (overflow, a broken engine)."""
    return bool(np.isfinite(prob).all())


def default_smoothing(smooth: bool, config: SegmenterConfig) -> SmoothingConfig:
    """The CLI's smoothing when no profile says otherwise, at the checkpoint's operating point
    (threshold, minimum area): motion-aware, no hysteresis (docs/runtime.md); or none, each frame
    on its own, still less components under the minimum area."""
    if smooth:
        return SmoothingConfig.at(config.threshold, min_area=config.min_area)
    return SmoothingConfig.off(config.threshold, config.min_area)


class Stages:
    """The stages after decoding, as one object.

    `preprocess` replaces the default stage (e.g. a profile's ProfilePreprocessor); `smoothing`
    None keeps the model's per-frame masks (prob >= the model's threshold); `gating` None reports
    every polyp at once (`GateConfig.off()`)."""

    def __init__(self, backend: Backend, preprocess: Preprocessor | None = None,
                 smoothing: SmoothingConfig | None = None, gating: GateConfig | None = None):
        retain_freed_memory()  # frame-sized buffers: reused, not first-touched every frame (allocator.py)
        self.backend = backend
        self.preprocess = preprocess or Preprocessor(backend.input_size, on_device=backend.device.type == "cuda")
        self.smoother = Smoother(smoothing or default_smoothing(False, backend.seg.config))
        self.find_polyps = find_polyps
        self.gate = AlarmGate(gating or GateConfig.off())  # reported polyps only; frames pass untouched
        self.invalid = 0  # frames whose model output had NaN/inf
        self._runner = None

    @classmethod
    def for_profile(cls, backend: Backend, profile=None, smooth: bool = True,
                    gating: GateConfig | None = None) -> "Stages":
        """With a calibration profile: its preprocess stage (field of view, colour) and smoothing;
        without: the defaults (field of view found per frame, `default_smoothing`); `gating` as given."""
        from .calibration import ProfilePreprocessor

        if profile is None:
            return cls(backend, smoothing=default_smoothing(smooth, backend.seg.config), gating=gating)
        on_device = backend.device.type == "cuda"
        return cls(backend, ProfilePreprocessor(backend.input_size, profile, on_device=on_device),
                   profile.smoothing_config(smooth), gating)

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
            self.gate.reset()
            empty = np.zeros(frame.shape, np.float32)
            return Result(frame, empty, empty.astype(bool), [], item.fov,
                          time.time() - frame.capture_time, valid=False)
        cuts = self.smoother.cuts
        prob_src, mask = self.smoother.update(frame.image, prob, item.fov)
        if self.smoother.cuts != cuts:  # a scene cut: a polyp before it is not the one after it
            self.gate.reset()
        labelled = self.smoother.components  # the mask's labelling, made once (small-region removal)
        mask, polyps = self.gate.update(mask, self.find_polyps(mask, prob_src, labelled), labelled)
        return Result(frame, prob_src, mask, polyps, item.fov, time.time() - frame.capture_time)

    def __call__(self, frame: Frame) -> Result:
        """One frame through every stage, in order (no threads, no queues)."""
        item = self.preprocess(frame)
        return self.finish(item, self.infer([item])[0])

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
