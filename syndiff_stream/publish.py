"""ZeroMQ publisher: every result out as [topic, JSON header, mask payload], never blocking.

The socket is an XPUB (subscribers connect with plain SUB sockets) for two reasons: it sees
subscriptions arrive, so a recorded run can wait for its subscriber before the first frame
(`wait_for_subscribers`), and with XPUB_NODROP a full send queue is reported instead of silently
discarded, so dropped sends are counted. Sends use NOBLOCK with a send high-water mark: a slow or
absent subscriber costs dropped messages, never a stalled pipeline.
"""

from __future__ import annotations

import ipaddress
import time
import warnings
from pathlib import Path

import cv2
import zmq

from .frames import Result
from .keys import server_cert, start_authenticator
from .overlay import render_overlay
from .protocol import (ENCODINGS, SCHEMA_VERSION, TOPIC_END, TOPIC_MASK, TOPIC_OVERLAY, TOPIC_STATUS, dumps,
                       encode_mask, make_header)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"


class RemoteBindWarning(UserWarning):
    """The publisher was told to bind beyond loopback."""


def is_local(endpoint: str) -> bool:
    """True when binding `endpoint` reaches this machine only: loopback TCP, ipc, inproc."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: may be reachable from outside
        return False


class Publisher:
    """Binds loopback unless `allow_remote` (then warns: masks describe patient video). With
    `curve_secret` every connection is CURVE-encrypted, and with `curve_allow` only clients whose
    public keys are in that folder are accepted (see `keys.py`). Overlays (patient video) are sent
    only with `overlay=True`."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, encoding: str = "png", overlay: bool = False,
                 hwm: int = 32, jpeg_quality: int = 80, context: zmq.Context | None = None,
                 allow_remote: bool = False, curve_secret: str | Path | None = None,
                 curve_allow: str | Path | None = None):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown mask encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
        if not is_local(endpoint):
            if not allow_remote:
                raise ValueError(f"{endpoint} is reachable from other machines: bind 127.0.0.1, or pass "
                                 "--allow-remote (with --curve-secret/--curve-allow to encrypt and authenticate)")
            warnings.warn(f"publishing on {endpoint}, reachable from other machines"
                          + ("" if curve_allow else "; anyone who connects receives the masks"
                             if not curve_secret else "; encrypted, but any client key is accepted"),
                          RemoteBindWarning, stacklevel=2)
        if curve_allow and not curve_secret:
            raise ValueError("--curve-allow needs --curve-secret (the publisher's .key_secret file)")
        self.endpoint, self.encoding, self.overlay, self.jpeg_quality = endpoint, encoding, overlay, jpeg_quality
        self.sent = self.dropped = 0
        self.subscribers = 0
        self.frames, self.source_id = 0, None
        self.auth = self.own_context = None
        if curve_secret:  # one ZAP authenticator per context: this publisher gets its own
            context = self.own_context = zmq.Context()
        self.socket = (context or zmq.Context.instance()).socket(zmq.XPUB)
        try:
            if curve_secret:
                server_cert(self.socket, curve_secret)
                self.auth = start_authenticator(context, curve_allow)
            self.socket.setsockopt(zmq.SNDHWM, hwm)
            self.socket.setsockopt(zmq.XPUB_NODROP, 1)
            self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscriber's subscriptions, not just the first
            self.socket.setsockopt(zmq.LINGER, 0)
            try:
                self.socket.bind(endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(f"cannot bind publisher to {endpoint}: {exc}") from None
        except ValueError:
            self._release(0)
            raise

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

    def status(self, state: dict) -> None:
        """Heartbeat: the pipeline's state, sent about once a second even when no frame comes
        (e.g. while a live source reconnects), so subscribers can tell a gap from a dead publisher."""
        self._send([TOPIC_STATUS, dumps({"schema": SCHEMA_VERSION, "source_id": self.source_id, **state}), b""])

    def end(self) -> None:
        """Tell subscribers the stream is over (best effort, like every send)."""
        self._send([TOPIC_END, dumps({"schema": SCHEMA_VERSION, "source_id": self.source_id,
                                      "frames": self.frames}), b""])

    def close(self, linger: float = 1.0) -> None:
        """Send end-of-stream, then give queued messages up to `linger` seconds to leave."""
        if not self.socket.closed:
            self.end()
            self._release(linger)

    def _release(self, linger: float) -> None:
        self.socket.close(linger=int(linger * 1000))
        if self.auth is not None:
            self.auth.stop()
        if self.own_context is not None:
            self.own_context.term()
