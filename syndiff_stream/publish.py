"""ZeroMQ outputs: every result out as [topic, JSON header, mask payload].

Two sockets, two guarantees (docs/protocol.md, Delivery):

- `Publisher` (XPUB; subscribers connect plain SUB sockets) never blocks the pipeline. Each
  subscriber has its own send queue bounded by the high-water mark; when one subscriber's queue is
  full, ZeroMQ drops that subscriber's messages only, and every other subscriber keeps receiving
  every frame. ZeroMQ does not tell a PUB/XPUB socket which subscriber lost what, so the count is
  kept where it can be known: each message carries a `seq` number, and `Subscriber.missed` counts
  the gaps on the subscriber's side. The XPUB sees subscriptions arrive (`wait_for_subscribers`);
  they are drained on every send for the publisher's whole life.
- `ReliableSender` (PUSH; one consumer connects a PULL socket, `Subscriber(reliable=True)`) gives
  that consumer every message exactly once, in order: a send waits while the consumer's queue is
  full, so the pipeline waits for the consumer as recorded mode waits for its source. A consumer
  that reads nothing for `stall_timeout` seconds stops the run with one clear error.
"""

from __future__ import annotations

import ipaddress
import re
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
_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


class RemoteBindWarning(UserWarning):
    """The publisher was told to bind beyond loopback."""


def check_endpoint(endpoint: str, bind: bool = True) -> str:
    """`endpoint` unchanged when ZeroMQ can use it, else ValueError saying what is wrong with it.
    tcp://HOST:PORT (PORT 1-65535, or * to bind any free port), ipc://PATH, inproc://NAME."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        raise ValueError(f"{endpoint!r} is not a ZeroMQ endpoint: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    if scheme != "tcp":
        if not rest:
            raise ValueError(f"{endpoint!r}: {scheme}:// needs a {'path' if scheme == 'ipc' else 'name'}")
        return endpoint
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{endpoint!r}: expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:5556")
    if port == "*":
        if not bind:
            raise ValueError(f"{endpoint!r}: a subscriber connects to a port number, not *")
    elif not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{endpoint!r}: port {port!r} is not a number from 1 to 65535")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare == "*" and bind:
        return endpoint
    try:
        ipaddress.ip_address(bare)
        return endpoint
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", bare) or ":" in bare or not _HOST_NAME.match(bare):
        raise ValueError(f"{endpoint!r}: {bare!r} is not an IP address or host name")
    return endpoint


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


class _Sender:
    """What both sockets share: endpoint checks, CURVE, the messages and their `seq` numbers."""

    socket_type = zmq.XPUB

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, encoding: str = "png", overlay: bool = False,
                 hwm: int = 32, jpeg_quality: int = 80, context: zmq.Context | None = None,
                 allow_remote: bool = False, curve_secret: str | Path | None = None,
                 curve_allow: str | Path | None = None):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown mask encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
        check_endpoint(endpoint)
        if not is_local(endpoint):
            if not allow_remote:
                raise ValueError(f"{endpoint} is reachable from other machines: bind 127.0.0.1, or pass "
                                 "--allow-remote (with --curve-secret/--curve-allow to encrypt and authenticate)")
            warnings.warn(f"publishing on {endpoint}, reachable from other machines"
                          + ("" if curve_allow else "; anyone who connects receives the masks"
                             if not curve_secret else "; encrypted, but any client key is accepted"),
                          RemoteBindWarning, stacklevel=3)
        if curve_allow and not curve_secret:
            raise ValueError("--curve-allow needs --curve-secret (the publisher's .key_secret file)")
        self.endpoint, self.encoding, self.overlay, self.jpeg_quality = endpoint, encoding, overlay, jpeg_quality
        self.sent = 0
        self.frames, self.source_id = 0, None
        self.auth = self.own_context = None
        if curve_secret:  # one ZAP authenticator per context: this socket gets its own
            context = self.own_context = zmq.Context()
        self.socket = (context or zmq.Context.instance()).socket(self.socket_type)
        try:
            if curve_secret:
                server_cert(self.socket, curve_secret)
                self.auth = start_authenticator(context, curve_allow)
            self.socket.setsockopt(zmq.SNDHWM, hwm)
            self.socket.setsockopt(zmq.LINGER, 0)
            self._configure()
            try:
                self.socket.bind(endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(f"cannot bind {endpoint}: {exc}") from None
        except ValueError:
            self._release(0)
            raise

    def _configure(self) -> None:
        """Socket options of the subclass, set before binding."""

    def _send(self, parts: list[bytes]) -> None:
        raise NotImplementedError

    def write(self, result: Result) -> None:
        self.source_id = result.frame.source_id
        header = dict(make_header(result, self.encoding), seq=self.frames)
        self.frames += 1
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
        """Tell consumers the stream is over."""
        self._send([TOPIC_END, dumps({"schema": SCHEMA_VERSION, "source_id": self.source_id,
                                      "frames": self.frames}), b""])

    def close(self, linger: float = 1.0) -> None:
        """Send end-of-stream, then give queued messages up to `linger` seconds to leave."""
        if not self.socket.closed:
            try:
                self.end()
            finally:
                self._release(linger)

    def _release(self, linger: float) -> None:
        self.socket.close(linger=int(linger * 1000))
        if self.auth is not None:
            self.auth.stop()
        if self.own_context is not None:
            self.own_context.term()


class Publisher(_Sender):
    """XPUB for any number of subscribers; never blocks. Binds loopback unless `allow_remote`
    (then warns: masks describe patient video). With `curve_secret` every connection is
    CURVE-encrypted, and with `curve_allow` only clients whose public keys are in that folder are
    accepted (see `keys.py`). Overlays (patient video) are sent only with `overlay=True`.

    No XPUB_NODROP: with it, one full subscriber queue made every send fail, for every subscriber.
    Without it ZeroMQ drops per subscriber at that subscriber's high-water mark, silently on this
    side; subscribers count what they missed from `seq` (`Subscriber.missed`)."""

    socket_type = zmq.XPUB

    def _configure(self) -> None:
        self.subscribers = 0
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscriptions, not just the first
        self.socket.setsockopt(zmq.XPUB_VERBOSER, 1)  # and every unsubscription (a subscriber leaving)

    def _send(self, parts: list[bytes]) -> None:
        self._poll_subscriptions()  # drained for the publisher's whole life, never left to pile up
        self.socket.send_multipart(parts, flags=zmq.NOBLOCK)  # a full queue drops, never raises or blocks
        self.sent += 1

    def _poll_subscriptions(self, timeout_ms: int = 0) -> None:
        while self.socket.poll(timeout_ms, zmq.POLLIN):
            msg = self.socket.recv()
            if msg[1:] == TOPIC_END:  # every Subscriber subscribes to "end" last: one per subscriber
                self.subscribers += 1 if msg[:1] == b"\x01" else -1
            timeout_ms = 0

    def wait_for_subscribers(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until `count` subscribers have connected (True) or `timeout` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        self._poll_subscriptions()
        while self.subscribers < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._poll_subscriptions(int(min(left, 0.1) * 1000) or 1)
        return True


class ConsumerStalled(ConnectionError):
    """The reliable consumer read nothing for `stall_timeout` seconds (or never connected)."""


class ReliableSender(_Sender):
    """PUSH for one consumer that needs every frame exactly once, in order (a recorder, a research
    logger). Sends wait while the consumer's queue is full or before it has connected
    (ZMQ_IMMEDIATE: nothing is queued for a consumer that is not there), so the pipeline goes at
    the consumer's pace. After `stall_timeout` seconds without progress `write` raises
    ConsumerStalled, which stops the run with one line instead of hanging it. Connect one consumer
    only: PUSH deals messages round-robin, so two consumers would each get half."""

    socket_type = zmq.PUSH

    def __init__(self, endpoint: str, *args, stall_timeout: float = 60.0, **kwargs):
        self.stall_timeout, self.stalled = stall_timeout, False
        super().__init__(endpoint, *args, **kwargs)

    def _configure(self) -> None:
        self.socket.setsockopt(zmq.IMMEDIATE, 1)

    def _send(self, parts: list[bytes]) -> None:
        deadline = time.monotonic() + self.stall_timeout
        while self.stalled or not self.socket.poll(100, zmq.POLLOUT):
            if self.stalled or time.monotonic() > deadline:  # once stalled, later sends (heartbeats) fail at once
                self.stalled = True
                raise ConsumerStalled(f"reliable consumer on {self.endpoint} took nothing for "
                                      f"{self.stall_timeout:g} s (not connected, or stopped reading)")
        self.socket.send_multipart(parts)
        self.sent += 1

    def close(self, linger: float = 5.0) -> None:
        """End-of-stream waits like a frame, then queued messages get `linger` seconds to leave."""
        super().close(linger)

    def abort(self) -> None:
        """After a failed run (the pipeline calls this instead of `close`): no `end`, no waiting,
        so a consumer that stalled the run does not hold its shutdown too. The consumer sees the
        stream stop without `end`: incomplete."""
        if not self.socket.closed:
            self._release(0)
