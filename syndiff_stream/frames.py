"""The frame record every stage passes on, and the named policies for what happens when a stage
falls behind.

Two modes, chosen per source kind and overridable:
  recorded  lossless: every frame exactly once, in order; a full buffer blocks the producer
            (backpressure), so a file is processed as fast as the slowest stage allows.
  live      latest frame wins: a full buffer drops its ONE oldest frame to make room (never the
            whole queue, which makes output choppy), and counts it. Latency stays bounded by the
            buffer size times the per-frame time of the slowest stage.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np


class Mode(str, Enum):
    RECORDED = "recorded"
    LIVE = "live"


@dataclass(frozen=True)
class Frame:
    """One decoded frame. `capture_time` is wall-clock epoch seconds (comparable across processes),
    taken when the frame left its source; `pts` is the stream's presentation time in seconds."""

    image: np.ndarray  # RGB uint8 (H, W, 3)
    source_id: str
    index: int
    pts: float | None
    capture_time: float = field(default_factory=time.time)
    truth: np.ndarray | None = None  # bool (H, W), when the source knows the true mask
    gap_s: float = 0.0  # seconds a live source was disconnected just before this frame

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


class Closed(Exception):
    """Raised by `FrameBuffer.get` once the buffer is closed and empty."""


class FrameBuffer:
    """Bounded buffer between two stages with a named policy (see the module docstring)."""

    def __init__(self, capacity: int, mode: Mode):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.mode = capacity, Mode(mode)
        self.dropped = 0
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: Any) -> None:
        with self._cond:
            if self.mode is Mode.RECORDED:
                while len(self._items) >= self.capacity and not self._closed:
                    self._cond.wait()
            elif len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped += 1
            if self._closed:
                return
            self._items.append(item)
            self._cond.notify_all()

    def get_batch(self, max_items: int = 1, timeout: float | None = None) -> list:
        """Block for one item, then take up to `max_items` without waiting (batching only what is
        already there, so batching never adds latency)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                return []
            if not self._items:
                raise Closed()
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._cond.notify_all()
            return batch

    def get(self, timeout: float | None = None):
        batch = self.get_batch(1, timeout)
        return batch[0] if batch else None

    def close(self) -> None:
        """No more puts; getters drain what is left, then see `Closed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Result:
    """A frame after the whole graph: what sinks and the publisher receive."""

    frame: Frame
    prob: np.ndarray  # float32 (H, W) smoothed probability at source resolution
    mask: np.ndarray  # bool (H, W) at source resolution
    polyps: list  # postprocess.Polyp, largest first
    fov: Any  # preprocess.FieldOfView used for this frame
    latency: float  # seconds from capture_time to the end of postprocessing
    valid: bool = True  # False when the model gave NaN/inf: mask and polyps are then empty, not garbage
