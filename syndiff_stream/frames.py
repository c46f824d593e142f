"""The frame record every stage passes on, and the named policies for what happens when a stage
falls behind.

Two modes, chosen per source kind and overridable:
  recorded  lossless: every frame exactly once, in order; a full buffer blocks the producer
            (backpressure), so a file is processed as fast as the slowest stage allows.
  live      bounded latency, burst-tolerant (`LivePolicy`): frames wait in order, and one is
            dropped only when it is
              late      older than the latency budget when the next stage comes for it, or
              capacity  the pipeline cannot keep up: the oldest of a full buffer when another
                        frame arrives (ONE at a time, never the whole queue: choppy output), or,
                        when a queue of two or more has stood undrained for half the budget,
                        all but its newest frame (a standing queue would add its wait to every
                        frame; a burst drains long before).
            A newer frame arriving a few milliseconds later is no reason to drop one: network
            streams and encoders deliver frames in bursts of 2-4. No frame starts inference later
            than the budget after its capture, so latency <= budget + the model's time.
            `LivePolicy(capacity=1, latency_budget_ms=inf)` is the old "latest frame wins".
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

ARRIVAL_WINDOW = 10_000  # inter-arrival times kept for the jitter figures: memory stays flat


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


class LivePolicy(BaseModel):
    """What live mode may drop, and when (see the module docstring).

    The budget defaults to `budget_frames` frame intervals of the source's nominal rate (3 at 25 fps:
    120 ms; at 50 fps: 60 ms), or `default_budget_ms` when the rate is unknown; `latency_budget_ms`
    sets it outright. `capacity`, how many frames may wait, defaults to as many as arrive within the
    budget (3: a whole burst), so a source faster than the pipeline overflows the buffer (counted
    as capacity) before its frames grow old (counted as late, the sign of a stall). A queue that
    stands undrained for half the budget is cut to its newest frame (counted as capacity)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latency_budget_ms: float | None = Field(None, gt=0)
    budget_frames: float = Field(3.0, gt=0)
    default_budget_ms: float = Field(100.0, gt=0)
    capacity: int | None = Field(None, ge=1)

    def budget_s(self, fps: float | None = None) -> float:
        """The latency budget in seconds for a source of `fps` frames per second (None: unknown)."""
        if self.latency_budget_ms is not None:
            return self.latency_budget_ms / 1000
        if fps and fps > 0:
            return self.budget_frames / fps
        return self.default_budget_ms / 1000

    def capacity_for(self, fps: float | None = None) -> int:
        """Frames that may wait for a source of `fps` frames per second (None: unknown)."""
        if self.capacity is not None:
            return self.capacity
        if fps and fps > 0 and math.isfinite(self.budget_s(fps)):
            return max(2, round(self.budget_s(fps) * fps))
        return max(2, round(self.budget_frames))


class Closed(Exception):
    """Raised by `FrameBuffer.get` once the buffer is closed and empty."""


class FrameBuffer:
    """Bounded buffer between two stages with a named policy (see the module docstring).

    `put(item, t)` takes the item's capture time `t` (seconds on `clock`'s scale; default: now);
    in live mode a getter never receives an item older than `max_age` seconds by `clock`, and a
    queue of two or more that has not drained for `standing` seconds (default `max_age` / 2) is cut
    to its newest item. Drops are counted apart: `dropped_late` (too old) and `dropped_capacity`
    (full buffer, standing queue). The gaps
    between consecutive capture times are kept (`inter_arrival`) to show the source's jitter.
    `clock` is injectable so tests can script arrivals with a fake clock."""

    def __init__(self, capacity: int, mode: Mode, max_age: float = math.inf,
                 clock: Callable[[], float] = time.time, standing: float | None = None):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if not max_age > 0:
            raise ValueError(f"buffer max_age must be > 0 seconds, got {max_age}")
        self.capacity, self.mode, self.max_age, self.clock = capacity, Mode(mode), max_age, clock
        self.standing = max_age / 2 if standing is None else standing
        self._backlog_since: float | None = None  # clock time the buffer last stopped being empty
        self.dropped_late = self.dropped_capacity = 0
        self.inter_arrival: deque = deque(maxlen=ARRIVAL_WINDOW)
        self._last_t: float | None = None
        self._items: deque = deque()  # (capture time, item), oldest first
        self._cond = threading.Condition()
        self._closed = False

    @property
    def dropped(self) -> int:
        return self.dropped_late + self.dropped_capacity

    def put(self, item: Any, t: float | None = None) -> None:
        t = self.clock() if t is None else t
        with self._cond:
            if self._last_t is not None:
                self.inter_arrival.append(max(0.0, t - self._last_t))
            self._last_t = t
            if self.mode is Mode.RECORDED:
                while len(self._items) >= self.capacity and not self._closed:
                    self._cond.wait()
            elif len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped_capacity += 1
            if self._closed:
                return
            if not self._items:
                self._backlog_since = self.clock()
            self._items.append((t, item))
            self._cond.notify_all()

    def _drop_live(self) -> None:
        """Live mode, as a getter comes: drop what is too old, then cut a standing queue."""
        if self.mode is not Mode.LIVE or not self._items:
            return
        now = self.clock()
        while self._items and self._items[0][0] < now - self.max_age:
            self._items.popleft()
            self.dropped_late += 1
        if len(self._items) > 1 and now - self._backlog_since > self.standing:
            while len(self._items) > 1:
                self._items.popleft()
                self.dropped_capacity += 1
            self._backlog_since = now

    def get_batch(self, max_items: int = 1, timeout: float | None = None) -> list:
        """Block for one item, then take up to `max_items` without waiting (batching only what is
        already there, so batching never adds latency). Live mode first drops the late ones."""
        def ready():
            self._drop_live()
            return self._items or self._closed

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                return []
            if not self._items:
                raise Closed()
            batch = [self._items.popleft()[1] for _ in range(min(max_items, len(self._items)))]
            if not self._items:
                self._backlog_since = None
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

    def arrivals(self) -> list[float]:
        """A copy of the recent inter-arrival times (seconds), safe while producers run."""
        with self._cond:
            return list(self.inter_arrival)

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
