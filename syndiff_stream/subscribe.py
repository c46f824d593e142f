"""Python subscriber: receive what `Publisher` sends and decode masks at source resolution.

    with Subscriber("tcp://127.0.0.1:5556", overlay=True) as sub:
        for msg in sub:           # stops at the publisher's end-of-stream message
            msg.mask              # bool (H, W) at the source's resolution
            msg.header["polyps"]  # boxes, areas, scores
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import zmq

from .keys import client_cert
from .protocol import (ENCODINGS, TOPIC_END, TOPIC_MASK, TOPIC_OVERLAY, TOPIC_STATUS, ProtocolError, check_shape,
                       decode_image, decode_mask, loads)

TOPICS = {TOPIC_MASK: "mask", TOPIC_OVERLAY: "overlay", TOPIC_END: "end", TOPIC_STATUS: "status"}


@dataclass
class Message:
    topic: str  # "mask", "overlay", "status" or "end"
    header: dict
    mask: np.ndarray | None = None  # bool (H, W) for "mask"
    image: np.ndarray | None = None  # RGB uint8 (H, W, 3) for "overlay"


def decode(parts: list[bytes]) -> Message:
    """One multipart message -> Message. Whatever arrives, the only error is ProtocolError."""
    if len(parts) != 3:
        raise ProtocolError(f"expected 3 message parts [topic, header, payload], got {len(parts)}")
    topic, raw_header, payload = parts
    if topic not in TOPICS:
        raise ProtocolError(f"unknown topic {bytes(topic[:32])!r}")
    header = loads(raw_header)
    if topic == TOPIC_MASK:
        encoding = header.get("encoding")
        if encoding not in ENCODINGS:
            raise ProtocolError(f"unknown mask encoding {encoding!r}")
        return Message("mask", header, mask=decode_mask(payload, encoding, header.get("shape")))
    if topic == TOPIC_OVERLAY:
        bgr = decode_image(payload, check_shape(header.get("shape")), cv2.IMREAD_COLOR)
        return Message("overlay", header, image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return Message(TOPICS[topic], header)  # end, status: the header is the message


class Subscriber:
    """SUB socket on `endpoint`, subscribed to masks (and overlays, status if asked) plus
    end-of-stream. For a CURVE publisher pass this client's secret certificate (`curve_secret`,
    from `syndiff-stream keys`) and the server's public one (`curve_server`)."""

    def __init__(self, endpoint: str, masks: bool = True, overlay: bool = False, hwm: int = 1000,
                 context: zmq.Context | None = None, status: bool = False,
                 curve_secret: str | Path | None = None, curve_server: str | Path | None = None):
        self.socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve_secret or curve_server:
            try:
                client_cert(self.socket, curve_secret, curve_server)
            except ValueError:
                self.socket.close()
                raise
        # "end" last: the publisher counts subscribers by it, and then sees the other topics too.
        for topic, wanted in ((TOPIC_MASK, masks), (TOPIC_OVERLAY, overlay), (TOPIC_STATUS, status), (TOPIC_END, True)):
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
