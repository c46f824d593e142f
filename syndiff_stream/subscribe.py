"""Python subscriber: receive what `Publisher` sends and decode masks at source resolution.

    with Subscriber("tcp://127.0.0.1:5556", overlay=True) as sub:
        for msg in sub:           # stops at the publisher's end-of-stream message
            msg.mask              # bool (H, W) at the source's resolution
            msg.header["polyps"]  # boxes, areas, scores
        sub.missed                # mask messages this subscriber lost (its queue was full)

`Subscriber(endpoint, reliable=True)` connects to a `run --reliable` endpoint instead: every
frame exactly once, in order, and the publisher waits for this consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import zmq

from .keys import client_cert
from .publish import check_endpoint
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
    end-of-stream; with `reliable=True` a PULL socket on a `ReliableSender` (`run --reliable`),
    which sends every topic: those not asked for are skipped here. For a CURVE publisher pass this
    client's secret certificate (`curve_secret`, from `syndiff-stream keys`) and the server's
    public one (`curve_server`).

    `received` counts mask messages; `missed` counts those the publisher sent but this subscriber
    never got (gaps in the headers' `seq`, and at `end` the ones after the last received), counted
    from the first mask received: frames sent before it connected are not counted."""

    def __init__(self, endpoint: str, masks: bool = True, overlay: bool = False, hwm: int = 1000,
                 context: zmq.Context | None = None, status: bool = False,
                 curve_secret: str | Path | None = None, curve_server: str | Path | None = None,
                 reliable: bool = False):
        check_endpoint(endpoint, bind=False)
        self.wanted = {TOPIC_END} | {t for t, on in ((TOPIC_MASK, masks), (TOPIC_OVERLAY, overlay),
                                                      (TOPIC_STATUS, status)) if on}
        self.received = self.missed = 0
        self._next_seq: int | None = None
        self.reliable = reliable
        self.socket = (context or zmq.Context.instance()).socket(zmq.PULL if reliable else zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve_secret or curve_server:
            try:
                client_cert(self.socket, curve_secret, curve_server)
            except ValueError:
                self.socket.close()
                raise
        # "end" last: the publisher counts subscribers by it, and then sees the other topics too.
        for topic in (TOPIC_MASK, TOPIC_OVERLAY, TOPIC_STATUS, TOPIC_END):
            if topic in self.wanted and not reliable:
                self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)

    def recv(self, timeout: float | None = None) -> Message | None:
        """Next message of a wanted topic, or None after `timeout` seconds without one."""
        while True:
            if timeout is not None and not self.socket.poll(int(timeout * 1000), zmq.POLLIN):
                return None
            parts = self.socket.recv_multipart()
            if parts and parts[0] not in self.wanted:  # a reliable stream carries every topic
                continue
            msg = decode(parts)
            self._count(msg)
            return msg

    def _count(self, msg: Message) -> None:
        seq = msg.header.get("seq")
        if msg.topic == "mask" and isinstance(seq, int):
            self.received += 1
            if self._next_seq is not None and seq > self._next_seq:
                self.missed += seq - self._next_seq
            self._next_seq = seq + 1
        elif msg.topic == "end" and self._next_seq is not None and TOPIC_MASK in self.wanted:
            frames = msg.header.get("frames")
            if isinstance(frames, int) and frames > self._next_seq:
                self.missed += frames - self._next_seq

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
