"""Frame sources: video files, network streams and capture devices (PyAV), image folders, a
procedural `demo` scene, and a pseudo-video that moves a camera over still images.

`open_source(spec)` picks one from a string, as the CLI does:
  demo (or nothing)         built-in procedural endoscopy-like scene with true masks
  pseudo:FOLDER             camera pans/zooms over a dataset's images + masks (find_pairs layouts)
  FOLDER                    images in name order (with true masks if it is a dataset layout)
  rtsp:// rtmp:// srt:// udp:// tcp:// http(s)://   network stream
  v4l2:/dev/video0, /dev/video0, avfoundation:0, dshow:video=NAME   capture device
  FILE                      any container/codec FFmpeg reads

Each source has a `default_mode`: files, folders and pseudo-video are recorded (lossless);
devices, network streams and the rate-limited demo are live (latest frame wins).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from .frames import Frame, Mode

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "tcp", "rtp", "http", "https")
DEVICE_FORMATS = ("v4l2", "avfoundation", "dshow", "gdigrab", "x11grab", "android_camera")
# Low-latency demuxing for live inputs: no input buffering, no reordering delay.
LIVE_OPTIONS = {"fflags": "nobuffer", "flags": "low_delay"}
POLYP_TINT = np.array([1.05, 0.85, 0.85], np.float32)  # lesions read redder than the mucosa
MAX_BAD_PACKETS = 250  # undecodable packets in a row before a stream counts as unreadable


class SourceError(ValueError):
    """A source that cannot be opened or read: names the input at fault."""


class Source:
    """Iterable of `Frame`s. Subclasses set `source_id`, `kind`, `default_mode`, `fps`."""

    source_id: str = "source"
    kind: str = "file"
    default_mode: Mode = Mode.RECORDED
    fps: float | None = None

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __len__(self) -> int:  # number of frames when known, else 0
        return 0

    def close(self) -> None:
        pass


class PacedClock:
    """Sleeps so frame i leaves no earlier than start + i / fps: a live scope's cadence."""

    def __init__(self, fps: float | None):
        self.period = 1.0 / fps if fps else 0.0
        self.start: float | None = None
        self.slept = 0.0  # seconds spent waiting, so decode timings can leave it out

    def wait(self, index: int) -> None:
        if not self.period:
            return
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        delay = self.start + index * self.period - now
        if delay > 0:
            time.sleep(delay)
            self.slept += delay


# ---- PyAV: files, network, devices ---------------------------------------------------------------

def ffmpeg_reason(exc: Exception, kind: str) -> str:
    """FFmpeg's error in words, without its raw errno (e.g. '[Errno 1094995529] Invalid data ...')."""
    import av

    if isinstance(exc, av.error.InvalidDataError):
        return ("not a video FFmpeg can read (invalid data: a text file, a truncated download?)" if kind == "file"
                else "invalid data from the stream")
    return (getattr(exc, "strerror", None) or str(exc)).rstrip(".")


class AVSource(Source):
    """Anything FFmpeg opens. `fmt` selects a device demuxer (v4l2, avfoundation, dshow...)."""

    def __init__(self, url: str, fmt: str | None = None, kind: str = "file", options: dict | None = None,
                 source_id: str | None = None, realtime: bool = False, pace_fps: float | None = None):
        """`realtime` plays a file at its own frame rate, or at `pace_fps` (a scope of that rate)."""
        import av

        self.url, self.kind = url, kind
        self.source_id = source_id or (Path(url).stem if kind == "file" else url)
        self.default_mode = Mode.RECORDED if kind == "file" else Mode.LIVE
        opts = dict(LIVE_OPTIONS if kind != "file" else {}, **(options or {}))
        try:
            self.container = av.open(url, format=fmt, options=opts, timeout=10.0)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {url!r}{f' as {fmt}' if fmt else ''}: {ffmpeg_reason(exc, kind)}") from None
        if not self.container.streams.video:
            self.container.close()
            raise SourceError(f"{url!r} has no video stream")
        self.stream = self.container.streams.video[0]
        if self.stream.codec_context is None:  # the container names a codec FFmpeg cannot decode
            self.container.close()
            raise SourceError(f"{url!r}: its video codec is not supported by this FFmpeg build")
        self.skipped = 0  # packets or frames that could not be decoded, skipped and counted
        self.stream.thread_type = "AUTO"  # FFmpeg's frame+slice threads decode ahead of us
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else None
        self.clock = PacedClock((pace_fps or self.fps) if realtime else None)

    def __len__(self) -> int:
        return int(self.stream.frames or 0)

    def __iter__(self) -> Iterator[Frame]:
        """Decode packet by packet, so one damaged packet costs one skipped frame, not the file.
        Any pixel format (grey, 10-bit, odd sizes) and mid-stream size changes come out as RGB24."""
        index = 0
        for images in self._decoded():
            for image, pts in images:
                self.clock.wait(index)
                yield Frame(image, self.source_id, index, pts)
                index += 1
        if index == 0 and self.kind == "file":
            raise SourceError(f"{self.url!r}: no decodable video frames"
                              + (f" ({self.skipped} damaged packets skipped)" if self.skipped else ""))

    def _decoded(self) -> Iterator[list]:
        import av

        failures = 0
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets, None)
            except (av.FFmpegError, OSError) as exc:
                raise SourceError(f"{self.url!r}: reading failed after {self.skipped} skipped packets: {exc}") from None
            if packet is None:
                return
            try:  # the final empty packet flushes the decoder
                images = [(f.to_ndarray(format="rgb24"), f.time) for f in packet.decode()]
            except (av.FFmpegError, ValueError) as exc:
                self.skipped += 1
                failures += 1
                if failures > MAX_BAD_PACKETS:
                    raise SourceError(f"{self.url!r}: {failures} packets in a row do not decode ({exc})") from None
                continue
            failures = 0 if images else failures
            yield images

    def close(self) -> None:
        self.container.close()


class ReconnectingSource(Source):
    """A live source that comes back after a disconnect (a scope unplugged, a stream restarted).

    When the stream ends or fails, it is reopened with exponential backoff (`backoff` seconds,
    doubling up to `max_backoff`) until `timeout` seconds have passed without a connection; then
    iteration ends cleanly (`lost`). Frame indices keep counting across connections, and the first
    frame after a gap carries the gap's length (`Frame.gap_s`). `state` is "streaming",
    "reconnecting", "lost" or (stopped from outside) "ended", for status messages."""

    def __init__(self, connect: Callable[[], Source], timeout: float = 30.0, backoff: float = 0.25,
                 max_backoff: float = 8.0, first: Source | None = None):
        self.connect, self.timeout, self.backoff, self.max_backoff = connect, timeout, backoff, max_backoff
        self.current: Source | None = first if first is not None else connect()
        self.source_id, self.kind, self.fps = self.current.source_id, self.current.kind, self.current.fps
        self.default_mode = self.current.default_mode
        self.state, self.lost, self.last_error = "streaming", False, ""
        self.reconnects, self.disconnected_s = 0, 0.0
        self.skipped_before = 0  # undecodable packets of earlier connections
        self._stop = threading.Event()

    @property
    def skipped(self) -> int:
        return self.skipped_before + getattr(self.current, "skipped", 0)

    def __iter__(self) -> Iterator[Frame]:
        index, gap = 0, 0.0
        while self.current is not None and not self._stop.is_set():
            try:
                for frame in self.current:
                    yield dataclasses.replace(frame, index=index, gap_s=gap)
                    index, gap = index + 1, 0.0
                self.last_error = "stream ended"
            except SourceError as exc:
                self.last_error = str(exc)
            self._drop_current()
            started = time.monotonic()
            self.state = "reconnecting"
            self.current = self._reconnect(started)
            if self.current is None:
                self.lost = not self._stop.is_set()
                self.state = "lost" if self.lost else "ended"
                return
            gap = time.monotonic() - started
            self.reconnects += 1
            self.disconnected_s += gap
            self.state = "streaming"

    def _reconnect(self, started: float) -> Source | None:
        delay = self.backoff
        while True:
            left = self.timeout - (time.monotonic() - started)
            if left <= 0 or self._stop.wait(min(delay, left)):
                return None
            try:
                return self.connect()
            except SourceError as exc:
                self.last_error = str(exc)
            delay = min(2 * delay, self.max_backoff)

    def _drop_current(self) -> None:
        if self.current is not None:
            self.skipped_before += getattr(self.current, "skipped", 0)
            with contextlib.suppress(Exception):
                self.current.close()
            self.current = None

    def interrupt(self) -> None:
        """Stop waiting to reconnect (called from another thread when the pipeline stops)."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._drop_current()


# ---- still images --------------------------------------------------------------------------------

class ImageFolderSource(Source):
    """Images in name order, one frame each; true masks when the folder is a dataset layout."""

    kind = "folder"

    def __init__(self, folder: str | Path, fps: float = 30.0):
        from .datasets import DatasetError, find_pairs, pair_folders

        folder = Path(folder)
        self.source_id, self.fps = folder.name, fps
        try:
            self.pairs = find_pairs(folder, skip_unpaired=True)
        except DatasetError:
            try:
                self.pairs = pair_folders(folder, None)
            except DatasetError as exc:
                raise SourceError(str(exc)) from None

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Frame]:
        from .datasets import read_image, read_mask

        for i, pair in enumerate(self.pairs):
            truth = read_mask(pair.mask) if pair.mask else None
            yield Frame(read_image(pair.image), self.source_id, i, i / self.fps, truth=truth)


class PseudoVideoSource(Source):
    """A virtual camera that glides over each still image (pan + zoom with eased motion) for
    `frames_per_image` frames, then cuts to the next: moving sequences with exact true masks."""

    kind = "pseudo"

    def __init__(self, folder: str | Path, size: tuple[int, int] = (576, 720), frames_per_image: int = 30,
                 fps: float = 30.0, seed: int = 0, limit_images: int | None = None):
        from .datasets import DatasetError, find_pairs

        try:
            self.pairs = find_pairs(folder, skip_unpaired=True)
        except DatasetError as exc:
            raise SourceError(str(exc)) from None
        if limit_images:
            self.pairs = self.pairs[:limit_images]
        self.source_id = f"pseudo:{Path(folder).name}"
        self.size, self.frames_per_image, self.fps, self.seed = size, frames_per_image, fps, seed

    def __len__(self) -> int:
        return len(self.pairs) * self.frames_per_image

    def camera(self, rng: np.random.Generator, h: int, w: int, t: float) -> np.ndarray:
        """2x3 affine from output pixels to image pixels at eased time t in [0, 1]."""
        out_h, out_w = self.size
        zoom = np.interp(t, [0, 1], rng.uniform(0.6, 1.0, 2))  # fraction of the image seen
        scale = zoom * min(h / out_h, w / out_w)
        view_h, view_w = out_h * scale, out_w * scale
        start, end = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
        cy, cx = (start + (end - start) * t) * [max(h - view_h, 0), max(w - view_w, 0)] + [view_h / 2, view_w / 2]
        return np.array([[scale, 0, cx - view_w / 2], [0, scale, cy - view_h / 2]], np.float32)

    def __iter__(self) -> Iterator[Frame]:
        from .datasets import read_image, read_mask

        out_h, out_w = self.size
        index = 0
        for k, pair in enumerate(self.pairs):
            image = read_image(pair.image)
            mask = read_mask(pair.mask).astype(np.uint8) if pair.mask else None
            h, w = image.shape[:2]
            for j in range(self.frames_per_image):
                rng = np.random.default_rng((self.seed, k))  # same path for every frame of image k
                t = 0.5 - 0.5 * math.cos(math.pi * j / max(self.frames_per_image - 1, 1))  # eased
                m = cv2.invertAffineTransform(self.camera(rng, h, w, t))
                frame = cv2.warpAffine(image, m, (out_w, out_h), flags=cv2.INTER_LINEAR)
                truth = None if mask is None else cv2.warpAffine(mask, m, (out_w, out_h), flags=cv2.INTER_NEAREST) > 0
                yield Frame(frame, self.source_id, index, index / self.fps, truth=truth)
                index += 1


# ---- procedural demo -----------------------------------------------------------------------------

class DemoSource(Source):
    """A procedural colonoscopy-like scene: circular field of view with a dark vignette, a dark
    lumen with concentric haustral folds, vessels, specular highlights, and polyp-like domes that
    drift across the view (sometimes leaving it), with their true masks. Deterministic by seed.
    With `realtime`, frames leave at `fps` like a live scope (default mode live); without, as fast
    as they render (default mode recorded, for benchmarks). With `loop` N, the first N frames are
    rendered once, here, and replayed: rendering 1920x1080 takes one core about 30 ms, so a benchmark
    of a faster path would otherwise time the renderer. Rendering them lazily on the first pass put
    that cost inside the clock after all: a burst of late frames, drops and a p99 set by the
    renderer (docs/runtime.md, "The pipeline's own share of live latency")."""

    kind = "demo"

    def __init__(self, size: tuple[int, int] = (576, 720), fps: float = 30.0, seed: int = 0,
                 frames: int | None = None, realtime: bool = True, polyps: int = 2, loop: int | None = None):
        self.size, self.fps, self.seed, self.frames = size, fps, seed, frames
        self.loop = loop
        self.source_id = f"demo:{seed}"
        self.default_mode = Mode.LIVE if realtime else Mode.RECORDED
        self.clock = PacedClock(fps if realtime else None)
        h, w = size
        rng = np.random.default_rng(seed)
        # Static textures on a canvas larger than the view, so the camera can drift over them.
        self.margin = m = max(h, w) // 8
        ch, cw = h + 2 * m, w + 2 * m
        blotch = cv2.GaussianBlur(rng.standard_normal((ch, cw)).astype(np.float32), (0, 0), max(h, w) / 40)
        blotch /= blotch.std() + 1e-6
        vessels = np.zeros((ch, cw), np.float32)
        for _ in range(18):  # meandering thin vessels
            pts = np.cumsum(rng.normal(0, max(h, w) / 25, (12, 2)), 0) + rng.uniform(0, [cw, ch])
            cv2.polylines(vessels, [pts.astype(np.int32)], False, 1.0, thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
        vessels = cv2.GaussianBlur(vessels, (0, 0), 1.0)
        base = np.array([200, 95, 85], np.float32)  # pink-red mucosa (RGB)
        tex = base * (1 + 0.06 * blotch[..., None]) - vessels[..., None] * np.array([40, 70, 60], np.float32)
        tex += rng.normal(0, 3, (ch, cw, 1)).astype(np.float32)  # sensor grain
        self.texture = np.clip(tex, 0, 255).astype(np.uint8)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.yy, self.xx = yy, xx
        self.fov = np.hypot(yy - h / 2, xx - w / 2) < 0.49 * h  # circular field of view
        qy, qx = np.mgrid[0:h:complex(0, max(h // 4, 2)), 0:w:complex(0, max(w // 4, 2))]
        self.grid_q = qy, qx
        self.vignette_q = np.clip(1.1 - 0.55 * (np.hypot(qy - h / 2, qx - w / 2) / (h / 2)) ** 2, 0, 1)
        self.lumen_path = rng.uniform(0, 2 * math.pi, 4)
        self.polyp_params = [dict(
            radius=rng.uniform(0.07, 0.14) * h, aspect=rng.uniform(0.7, 1.0), angle=rng.uniform(0, 180),
            freq=rng.uniform(0.15, 0.35, 2), phase=rng.uniform(0, 2 * math.pi, 2), amp=rng.uniform(0.25, 0.45, 2),
            tint=rng.uniform(0.85, 1.05), lobes=rng.uniform(0.05, 0.12), lobe_phase=rng.uniform(0, 2 * math.pi),
        ) for _ in range(polyps)]
        if loop:  # before any clock starts (see the docstring)
            self._rendered = {k: self.render(k) for k in range(min(loop, frames or loop))}

    def __len__(self) -> int:
        return self.frames or 0

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame `index` -> (RGB uint8 image, bool true mask); a pure function of (seed, index)."""
        h, w = self.size
        m, t = self.margin, index / self.fps
        ox = int(m + m * 0.8 * math.sin(0.21 * t + self.lumen_path[0]))
        oy = int(m + m * 0.8 * math.sin(0.17 * t + self.lumen_path[1]))
        img = self.texture[oy:oy + h, ox:ox + w].astype(np.float32)
        # Light: a dark lumen whose position drifts, haustral folds as rings around it, the scope's
        # vignette, black outside the field of view. Smooth, so computed at quarter resolution.
        lx = w / 2 + 0.22 * h * math.sin(0.3 * t + self.lumen_path[2])
        ly = h / 2 + 0.18 * h * math.cos(0.25 * t + self.lumen_path[3])
        qy, qx = self.grid_q
        d = np.hypot(qx - lx, qy - ly) / h
        light = (1 - 0.85 * np.exp(-(d / 0.12) ** 2)) * (1 - 0.12 * np.maximum(np.sin(d * 38 - 1.5 * t), 0) ** 3)
        light = cv2.resize((light * self.vignette_q).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        light *= self.fov
        truth = np.zeros((h, w), bool)
        for p in self.polyp_params:
            cx = w / 2 + p["amp"][0] * h * math.sin(p["freq"][0] * t + p["phase"][0])
            cy = h / 2 + p["amp"][1] * h * math.sin(p["freq"][1] * t + p["phase"][1])
            reach = p["radius"] * (1 + p["lobes"]) / p["aspect"] * 1.1
            x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
            y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
            if x0 >= x1 or y0 >= y1:
                continue  # drifted out of view
            yy, xx = self.yy[y0:y1, x0:x1], self.xx[y0:y1, x0:x1]
            theta = np.arctan2(yy - cy, xx - cx) - math.radians(p["angle"])
            radius = p["radius"] * (1 + p["lobes"] * np.sin(3 * theta + p["lobe_phase"]))
            ell = np.hypot(np.cos(theta), np.sin(theta) / p["aspect"])
            rr = np.hypot(xx - cx, yy - cy) * ell / radius
            inside = rr < 1
            dome = np.sqrt(np.clip(1 - rr ** 2, 0, 1))  # hemispherical shading, lit from the scope
            lit = np.where(inside, (0.8 + 0.45 * dome) * p["tint"], 1.0)[..., None]
            lit = lit * np.where(inside[..., None], POLYP_TINT, 1.0)
            lit *= np.where((rr > 0.92) & (rr < 1.08), 0.75, 1.0)[..., None]  # shadowed rim
            hx, hy = cx - 0.3 * p["radius"], cy - 0.3 * p["radius"]  # specular highlight on the dome
            spec = 255 * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (0.08 * p["radius"]) ** 2) * inside
            view = img[y0:y1, x0:x1]
            view *= lit
            view += spec[..., None]
            truth[y0:y1, x0:x1] |= inside
        # Wet-mucosa specular glints scattered on the folds.
        rng = np.random.default_rng((self.seed, index // 6))
        for gx, gy in rng.uniform([0, 0], [w, h], (5, 2)):
            cv2.circle(img, (int(gx), int(gy)), int(rng.integers(2, 6)), (255, 255, 255), -1, lineType=cv2.LINE_AA)
        img *= light[..., None]
        return cv2.convertScaleAbs(img), truth & self.fov

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while self.frames is None or index < self.frames:
            self.clock.wait(index)
            if self.loop:
                image, truth = (a.copy() for a in self._rendered[index % self.loop])  # a stage may draw on it
            else:
                image, truth = self.render(index)
            yield Frame(image, self.source_id, index, index / self.fps, truth=truth)
            index += 1


# ---- choosing a source from a string -------------------------------------------------------------

def is_stream(spec: str | None) -> bool:
    """Whether `spec` names a network stream or a capture device: a source that delivers frames
    whether or not anyone reads them (they pile up from the moment it is opened)."""
    spec = (spec or "").strip()
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    fmt, _, target = spec.partition(":")
    return scheme in NETWORK_SCHEMES or (fmt in DEVICE_FORMATS and bool(target)) or spec.startswith("/dev/video")


def open_source(spec: str | None = None, *, fps: float | None = None, seed: int = 0,
                size: tuple[int, int] | None = None, realtime: bool | None = None,
                options: dict | None = None, reconnect_timeout: float = 0.0) -> Source:
    """A source from a CLI-style string (see the module docstring). Errors name the input.
    `reconnect_timeout` > 0 wraps network streams and devices in a `ReconnectingSource` (the first
    connection must succeed, so a wrong address is still an immediate error)."""
    source = _open_source(spec, fps=fps, seed=seed, size=size, realtime=realtime, options=options)
    if reconnect_timeout > 0 and source.kind in ("network", "device"):
        return ReconnectingSource(lambda: _open_source(spec, options=options), reconnect_timeout, first=source)
    return source


def _open_source(spec: str | None = None, *, fps: float | None = None, seed: int = 0,
                 size: tuple[int, int] | None = None, realtime: bool | None = None,
                 options: dict | None = None) -> Source:
    spec = (spec or "demo").strip()
    if spec == "demo" or spec.startswith("demo:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else seed
        return DemoSource(size=size or (576, 720), fps=fps or 30.0, seed=seed,
                          realtime=True if realtime is None else realtime)
    if spec.startswith("pseudo:"):
        return PseudoVideoSource(spec[len("pseudo:"):], size=size or (576, 720), fps=fps or 30.0, seed=seed)
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme in NETWORK_SCHEMES:
        return AVSource(spec, kind="network", options=options, realtime=False)
    fmt, _, target = spec.partition(":")
    if fmt in DEVICE_FORMATS and target:
        return AVSource(target, fmt=fmt, kind="device", options=options, source_id=spec)
    if spec.startswith("/dev/video"):
        return AVSource(spec, fmt="v4l2", kind="device", options=options, source_id=spec)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path, fps=fps or 30.0)
    if not path.exists():
        raise SourceError(f"source {spec!r}: no such file or folder (or use demo, pseudo:FOLDER, a URL or a device)")
    return AVSource(str(path), kind="file", options=options, realtime=bool(realtime), pace_fps=fps)
