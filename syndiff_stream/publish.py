"""ZeroMQ publisher: every result out as [topic, JSON header, mask payload], never blocking.

The socket is an XPUB (subscribers connect with plain SUB sockets) for two reasons: it sees
subscriptions arrive, so a recorded run can wait for its subscriber before the first frame
(`wait_for_subscribers`), and with XPUB_NODROP a full send queue is reported instead of silently
discarded, so dropped sends are counted. Sends use NOBLOCK with a send high-water mark: a slow or
absent subscriber costs dropped messages, never a stalled pipeline.
"""

from __future__ import annotations

import time

import cv2
import zmq

from .frames import Result
from .overlay import render_overlay
from .protocol import ENCODINGS, SCHEMA_VERSION, TOPIC_END, TOPIC_MASK, TOPIC_OVERLAY, dumps, encode_mask, make_header

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"


class Publisher:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, encoding: str = "png", overlay: bool = False,
                 hwm: int = 32, jpeg_quality: int = 80, context: zmq.Context | None = None):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown mask encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
        self.endpoint, self.encoding, self.overlay, self.jpeg_quality = endpoint, encoding, overlay, jpeg_quality
        self.sent = self.dropped = 0
        self.subscribers = 0
        self.frames, self.source_id = 0, None
        self.socket = (context or zmq.Context.instance()).socket(zmq.XPUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscriber's subscriptions, not just the first
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise ValueError(f"cannot bind publisher to {endpoint}: {exc}") from None

    def _send(self, parts: list[bytes]) -> bool:
        try:
            self.socket.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def _poll_subscriptions(self, timeout_ms: int = 0) -> None:
        while self.socket.poll(timeout_ms, zmq.POLLIN):
            msg = self.socket.recv()
            if msg[1:] == TOPIC_END:  # every Subscriber subscribes to "end" last: one per subscriber
                self.subscribers += 1 if msg[:1] == b"\x01" else -1
            timeout_ms = 0

    def wait_for_subscribers(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until `count` subscribers have connected (True) or `timeout` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while self.subscribers < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._poll_subscriptions(int(min(left, 0.1) * 1000) or 1)
        return True

    def write(self, result: Result) -> None:
        self.frames, self.source_id = self.frames + 1, result.frame.source_id
        header = make_header(result, self.encoding)
        self._send([TOPIC_MASK, dumps(header), encode_mask(result.mask, self.encoding)])
        if self.overlay:
            image = cv2.cvtColor(render_overlay(result.frame.image, result.mask), cv2.COLOR_RGB2BGR)
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            self._send([TOPIC_OVERLAY, dumps(dict(header, encoding="jpeg")), jpeg.tobytes()])

    def end(self) -> None:
        """Tell subscribers the stream is over (best effort, like every send)."""
        self._send([TOPIC_END, dumps({"schema": SCHEMA_VERSION, "source_id": self.source_id,
                                      "frames": self.frames}), b""])

    def close(self, linger: float = 1.0) -> None:
        """Send end-of-stream, then give queued messages up to `linger` seconds to leave."""
        if not self.socket.closed:
            self.end()
            self.socket.close(linger=int(linger * 1000))
