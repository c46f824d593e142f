"""File sinks: an overlay video, a folder of mask PNGs, one JSON line per frame.

Each takes `write(result)` and `close()`. Files appear under their final names only when complete
(written to a temporary name, flushed to disk, then renamed), so an interrupted run never leaves a
file that looks finished but is truncated. `abort()` (called when the run fails, e.g. a full disk)
discards the unfinished temporary files: what was already there under the final names stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from fractions import Fraction
from pathlib import Path

import cv2

from .atomic import discard, fsync, temp_path
from .frames import Result
from .overlay import render_overlay
from .protocol import make_header


def pick_codec(preferred=("libx264", "h264", "mpeg4")) -> str:
    """H.264 where this FFmpeg build can encode it, else MPEG-4 part 2 (always built in)."""
    import av

    for name in preferred:
        try:
            if av.codec.Codec(name, "w"):
                return name
        except Exception:  # unknown or decode-only codec
            continue
    return "mpeg4"


class VideoWriter:
    """RGB frames into a video file with PyAV (H.264 when available), renamed into place on close."""

    def __init__(self, path: str | Path, fps: float = 30.0, codec: str | None = None, crf: int = 23):
        import av

        self.path, self.tmp = Path(path), temp_path(Path(path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.tmp), "w", format=None if self.path.suffix else "mp4")
        self.codec = codec or pick_codec()
        self.stream = self.container.add_stream(self.codec, rate=Fraction(fps).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        if self.codec in ("libx264", "h264"):
            self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames = 0

    def write_image(self, image) -> None:
        """A video stream has one size: the first frame's (cropped to even, for yuv420p). Later
        frames of another size (the source changed resolution) are scaled to it."""
        import av

        if self.frames == 0:
            h, w = image.shape[:2]
            self.stream.height, self.stream.width = max(h - h % 2, 2), max(w - w % 2, 2)
        h, w = self.stream.height, self.stream.width
        if image.shape[0] - h in (0, 1) and image.shape[1] - w in (0, 1):
            image = image[:h, :w]  # an odd size loses its last row/column
        else:
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        self.frames += 1

    def close(self) -> None:
        try:
            if self.frames:
                self.container.mux(self.stream.encode(None))
            self.container.close()
            if self.frames:
                fsync(self.tmp)
                self.tmp.replace(self.path)
        finally:
            discard(self.tmp)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.container.close()
        discard(self.tmp)


class OverlayVideoSink(VideoWriter):
    """Overlay frames (tinted, outlined polyps) into a video file."""

    def write(self, result: Result) -> None:
        self.write_image(render_overlay(result.frame.image, result.mask))


class MaskFolderSink:
    """One PNG per frame, `<index:06d>.png`, 0/255 at source resolution."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, result: Result) -> None:
        path = self.folder / f"{result.frame.index:06d}.png"
        tmp = temp_path(path)
        try:  # OpenCV reports a failed write (full disk, no permission) as False, not an exception
            if not cv2.imwrite(str(tmp), result.mask.astype("uint8") * 255):
                raise OSError(errno.EIO, "could not write mask PNG", str(path))
            tmp.replace(path)
        finally:
            discard(tmp)

    def close(self) -> None:
        pass


class JsonlSink:
    """Per-frame JSON lines with the publisher's header fields (polyps with their contours)."""

    def __init__(self, path: str | Path):
        self.path, self.tmp = Path(path), temp_path(Path(path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.tmp.open("w")

    def write(self, result: Result) -> None:
        header = make_header(result, "none")
        header["polyps"] = [p.as_dict(with_contour=True) for p in result.polyps]
        self.file.write(json.dumps(header, separators=(",", ":")) + "\n")

    def close(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.tmp.replace(self.path)
        finally:
            self.abort()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        discard(self.tmp)
