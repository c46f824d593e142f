"""`syndiff-stream view`: render what a publisher sends, in a window or into a video file.

Overlays (JPEG, when the publisher sends them) are shown as they are; a frame that arrives as a
mask only is drawn as its outline on black. Boxes and scores come from the header.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np

from .overlay import render_overlay
from .subscribe import Message, Subscriber

WINDOW = "syndiff-stream"


class ViewerError(RuntimeError):
    pass


def has_display() -> bool:
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def draw(msg: Message) -> np.ndarray:
    """RGB image for one message: its overlay, or the mask's outline on black, plus boxes."""
    if msg.image is not None:
        image = msg.image.copy()
    else:
        image = render_overlay(np.zeros((*msg.mask.shape, 3), np.uint8), msg.mask)
    for polyp in msg.header["polyps"]:
        x0, y0, x1, y1 = polyp["box"]
        cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), (255, 220, 0), 1)
        cv2.putText(image, f"{polyp['score']:.2f}", (x0, max(y0 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (255, 220, 0), 1, cv2.LINE_AA)
    return image


def paired(messages):
    """One message per frame: its overlay if one follows its mask, else the mask."""
    pending = None
    for msg in messages:
        if msg.topic == "overlay":
            pending = None
            yield msg
        else:
            if pending is not None:
                yield pending
            pending = msg
    if pending is not None:
        yield pending


def view_stream(endpoint: str, out: Path | None = None, max_frames: int | None = None, timeout: float = 10.0,
                curve_secret: Path | None = None, curve_server: Path | None = None) -> int:
    """Show or record frames until the stream ends, `max_frames`, or `timeout` s of silence.
    `curve_secret`/`curve_server`: this client's and the publisher's certificates (CURVE)."""
    from .publish import check_endpoint
    from .sinks import VideoWriter

    check_endpoint(endpoint, bind=False)  # a bad endpoint is named before anything else is tried
    if out is None and not has_display():
        raise ViewerError("no display here: pass --out FILE.mp4 to record the overlays instead")
    writer = VideoWriter(out) if out is not None else None
    n = 0
    try:
        with Subscriber(endpoint, masks=True, overlay=True, curve_secret=curve_secret, curve_server=curve_server) as sub:
            for msg in paired(sub.messages(timeout)):
                image = draw(msg)
                if writer is not None:
                    writer.write_image(image)
                else:
                    try:
                        cv2.imshow(WINDOW, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                            break
                    except cv2.error:
                        raise ViewerError("this OpenCV has no GUI support: pass --out FILE.mp4") from None
                n += 1
                if max_frames and n >= max_frames:
                    break
    finally:
        if writer is not None:
            writer.close()
    return n
