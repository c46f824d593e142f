"""Python subscriber: receive what `Publisher` sends and decode masks at source resolution.

    with Subscriber("tcp://127.0.0.1:5556", overlay=True) as sub:
        for msg in sub:           # stops at the publisher's end-of-stream message
            msg.mask              # bool (H, W) at the source's resolution
            msg.header["polyps"]  # boxes, areas, scores
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
import zmq

from .protocol import TOPIC_END, TOPIC_MASK, TOPIC_OVERLAY, ProtocolError, decode_mask, loads


@dataclass
class Message:
    topic: str  # "mask", "overlay" or "end"
    header: dict
    mask: np.ndarray | None = None  # bool (H, W) for "mask"
    image: np.ndarray | None = None  # RGB uint8 (H, W, 3) for "overlay"


def decode(parts: list[bytes]) -> Message:
    if len(parts) != 3:
        raise ProtocolError(f"expected 3 message parts [topic, header, payload], got {len(parts)}")
    topic, raw_header, payload = parts
    header = loads(raw_header)
    if topic == TOPIC_MASK:
        return Message("mask", header, mask=decode_mask(payload, header["encoding"], header["shape"]))
    if topic == TOPIC_OVERLAY:
        bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ProtocolError("overlay payload is not a JPEG image")
        return Message("overlay", header, image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if topic == TOPIC_END:
        return Message("end", header)
    raise ProtocolError(f"unknown topic {topic!r}")


class Subscriber:
    """SUB socket on `endpoint`, subscribed to masks (and overlays if asked) plus end-of-stream."""

    def __init__(self, endpoint: str, masks: bool = True, overlay: bool = False, hwm: int = 1000,
                 context: zmq.Context | None = None):
        self.socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        # "end" last: the publisher counts subscribers by it, and then sees the other topics too.
        for topic, wanted in ((TOPIC_MASK, masks), (TOPIC_OVERLAY, overlay), (TOPIC_END, True)):
            if wanted:
                self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)

    def recv(self, timeout: float | None = None) -> Message | None:
        """Next message, or None after `timeout` seconds."""
        if timeout is not None and not self.socket.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        return decode(self.socket.recv_multipart())

    def __iter__(self) -> Iterator[Message]:
        return self.messages()

    def messages(self, timeout: float | None = None) -> Iterator[Message]:
        """Messages until end-of-stream (or until `timeout` seconds pass without one)."""
        while (msg := self.recv(timeout)) is not None and msg.topic != "end":
            yield msg

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
