"""`syndiff-stream serve`: watch a publisher's overlays live in a browser.

    Feed (ZeroMQ SUB, a thread)  ->  newest frame + newest status  ->  /ws (one page per browser)

The feed keeps only the newest frame: nothing queues. Each browser pulls: the server sends a frame
over the WebSocket, the page draws it on a canvas and answers "ready", and only then gets the
newest frame there is, so a slow browser skips frames (counted) instead of falling behind.
Overlay JPEGs from the publisher (`run --publish-overlay`) are passed through undecoded; a
publisher that sends masks only is drawn as the masks' outlines on black. Boxes, counters and the
source state are drawn by the page from the JSON header that travels with each frame, and the
state is pushed about twice a second even when no frame comes, so a stalled stream shows
"reconnecting" while the page stays live. `/mjpeg` serves the same frames as an MJPEG stream for
embedding (no boxes, and a slow reader gets whatever the TCP buffers hold: see docs/serve.md for
the measured frame ages that chose the WebSocket for the page).

Loopback by default; any other address needs an access token (see `Access`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import socket
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import zmq

from .overlay import render_overlay
from .protocol import TOPIC_MASK, TOPIC_OVERLAY, ProtocolError, check_shape, image_size, loads
from .subscribe import Subscriber, decode

try:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles
    from starlette.websockets import WebSocket, WebSocketDisconnect
except ImportError:  # the [serve] extra is optional: `cli serve` turns this into one clear line
    Starlette = None

SILENT_AFTER = 3.0  # seconds without a heartbeat before the page says "reconnecting"
STATE_EVERY = 0.5  # seconds between state pushes to each page
OVERLAYS_STOPPED = 5.0  # seconds without an overlay before masks are drawn instead (a new publisher)
COOKIE = "syndiff_token"
JPEG_QUALITY = 80


class ServeError(RuntimeError):
    pass


def require_web() -> None:
    if Starlette is None:
        raise ServeError("serve needs the web extra: pip install 'syndiff-stream[serve]'")
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeError("serve needs the web extra: pip install 'syndiff-stream[serve]'") from None


def parse_http(address: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 in brackets) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ServeError(f"--http {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name or "0.0.0.0"-like wildcard written otherwise: treat as reachable
        return False


# ---- the feed: one subscriber, newest frame and status only ---------------------------------------

@dataclass
class Frame:
    seq: int  # serve's own count of frames received, 1-based
    header: dict
    jpeg: bytes | None = None  # the publisher's overlay, untouched
    mask: np.ndarray | None = None  # when the publisher sends masks only
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def image(self) -> bytes:
        """JPEG for this frame: the overlay as sent, else the mask's outline on black (made once,
        on first request, so a serve with no page open decodes nothing)."""
        with self._lock:
            if self.jpeg is None:
                rgb = render_overlay(np.zeros((*self.mask.shape, 3), np.uint8), self.mask)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                self.jpeg = buf.tobytes()
            return self.jpeg


class Feed:
    """Subscribes to `endpoint` in a thread and keeps the newest frame and heartbeat. ZeroMQ
    reconnects by itself when the publisher goes away and comes back; `state()` says what the
    page should show meanwhile."""

    def __init__(self, endpoint: str, curve_secret: str | Path | None = None, curve_server: str | Path | None = None,
                 silent_after: float = SILENT_AFTER):
        self.endpoint, self.silent_after = endpoint, silent_after
        # Built here so a bad key file fails before the server starts.
        self.sub = Subscriber(endpoint, masks=True, overlay=True, status=True, hwm=8, context=zmq.Context(),
                              curve_secret=curve_secret, curve_server=curve_server)
        self.lock = threading.Lock()
        self.frame: Frame | None = None
        self.status: dict | None = None
        self.heard = None  # monotonic time of the last message of any kind
        self.last_overlay = None  # monotonic time of the last overlay: masks only carry headers then
        self.received = self.invalid_messages = 0
        self.arrivals: deque[float] = deque(maxlen=64)
        self.started = time.monotonic()
        self.listeners: set = set()  # (loop, asyncio.Event) per open page, woken on every change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-feed", daemon=True)

    def start(self) -> "Feed":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.sub.close()
        self.sub.socket.context.term()

    def _run(self) -> None:
        sock = self.sub.socket
        while not self._stop.is_set():
            if not sock.poll(100, zmq.POLLIN):
                continue
            parts = sock.recv_multipart()
            try:
                self._take(parts)
            except ProtocolError:
                with self.lock:
                    self.invalid_messages += 1
                continue
            self._wake()

    def _take(self, parts: list[bytes]) -> None:
        now = time.monotonic()
        if len(parts) == 3 and parts[0] == TOPIC_OVERLAY:
            # Checked without decoding: the browser decodes it, in its sandbox.
            header = loads(parts[1])
            if header.get("encoding") != "jpeg" or image_size(parts[2]) != check_shape(header.get("shape")):
                raise ProtocolError("overlay payload is not a JPEG of the header shape")
            with self.lock:
                self.last_overlay = self.heard = now
                self._new_frame(header, jpeg=parts[2], now=now)
            return
        if (len(parts) == 3 and parts[0] == TOPIC_MASK and self.last_overlay is not None
                and now - self.last_overlay < OVERLAYS_STOPPED):
            loads(parts[1])  # checked; its overlay follows, and that is the frame
            with self.lock:
                self.heard = now
            return
        msg = decode(parts)
        with self.lock:
            self.heard = now
            if msg.topic == "mask":
                self._new_frame(msg.header, mask=msg.mask, now=now)
            elif msg.topic == "status":
                self.status = msg.header
            elif msg.topic == "end":
                last = dict(self.status or {})  # the final heartbeat said "ended" or "lost": keep which
                self.status = dict(last, state="lost" if last.get("state") == "lost" else "ended")
                self.last_overlay = None  # the next publisher may send masks only

    def _new_frame(self, header: dict, now: float, jpeg: bytes | None = None, mask: np.ndarray | None = None) -> None:
        self.received += 1
        self.arrivals.append(now)
        self.frame = Frame(self.received, header, jpeg=jpeg, mask=mask)

    def _wake(self) -> None:
        with self.lock:
            listeners = list(self.listeners)
        for loop, event in listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that page's loop is closed
                self.unlisten(event)

    def latest(self) -> Frame | None:
        with self.lock:
            return self.frame

    def state(self) -> dict:
        """What the page shows besides the video: source state, counters, rates."""
        now = time.monotonic()
        with self.lock:
            status, heard, frame = dict(self.status or {}), self.heard, self.frame
            arrivals = [t for t in self.arrivals if now - t <= 2.0]
            received, invalid = self.received, self.invalid_messages
        silent = now - (heard if heard is not None else self.started)
        state = status.get("state", "connecting")
        if silent > self.silent_after:
            detail = (f"no message from the publisher for {silent:.0f} s; reconnecting to {self.endpoint}"
                      + (f" (it said '{state}')" if status else ""))
            state = "reconnecting"
        elif heard is None:
            state, detail = "connecting", f"waiting for {self.endpoint}"
        elif state == "reconnecting":
            detail = f"the publisher's source is reconnecting ({status.get('disconnected_s', 0):.0f} s)"
        else:
            detail = {"streaming": "", "ended": "the publisher ended its stream",
                      "lost": "the publisher's source did not come back"}.get(state, "")
        fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 and arrivals[-1] > arrivals[0] else 0.0
        return {"state": state, "detail": detail, "source_id": status.get("source_id") or (frame.header.get("source_id") if frame else None),
                "fps": round(fps, 1), "received": received, "invalid_messages": invalid,
                "publisher": {k: status.get(k) for k in ("frames", "frames_out", "dropped", "skipped", "invalid", "reconnects")},
                "latency_ms": frame.header.get("latency_ms") if frame else None}

    def listen(self) -> asyncio.Event:
        """An event set on every new frame or message, for one page's loop."""
        event = asyncio.Event()
        with self.lock:
            self.listeners.add((asyncio.get_running_loop(), event))
        return event

    def unlisten(self, event: asyncio.Event) -> None:
        with self.lock:
            self.listeners = {pair for pair in self.listeners if pair[1] is not event}


# ---- access ----------------------------------------------------------------------------------------

class Access:
    """Loopback: no token, but only Host headers naming loopback (no DNS rebinding) and, on the
    WebSocket, only this page's own Origin. Any other address: a token, given once as ?token= (the
    page then keeps it in an HttpOnly cookie) or as the cookie."""

    def __init__(self, token: str | None):
        self.token = token

    def ok(self, conn) -> bool:
        if self.token is None:
            return True
        given = conn.query_params.get("token") or conn.cookies.get(COOKIE) or ""
        return secrets.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def same_origin(ws) -> bool:
        origin = ws.headers.get("origin")
        if origin is None:  # not a browser: no cross-site risk
            return True
        return origin.partition("://")[2].rstrip("/") == ws.headers.get("host", "")


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ServeError(f"cannot read --token-file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ServeError(f"--token-file {path}: the token must be at least 16 characters")
    return token


# ---- the web app ----------------------------------------------------------------------------------

def pack(frame: Frame, state: dict, skipped: int) -> bytes:
    """One binary WebSocket message: 4-byte big-endian JSON length, JSON, JPEG."""
    meta = json.dumps({"type": "frame", "seq": frame.seq, "header": frame.header, "state": state,
                       "skipped": skipped}).encode()
    return len(meta).to_bytes(4, "big") + meta + frame.image()


def make_app(feed: Feed, access: Access, hosts: list[str] | None = None):
    """Starlette app: / (page), /static (its assets), /ws (frames + state), /mjpeg, /state."""
    require_web()
    static = resources.files("syndiff_stream") / "web"

    async def page(request):
        if not access.ok(request):
            return PlainTextResponse("access token required: open the URL printed by syndiff-stream serve", 403)
        if access.token is not None and "token" in request.query_params:
            response = RedirectResponse("/", 303)  # the token leaves the address bar, stays in a cookie
            response.set_cookie(COOKIE, access.token, httponly=True, samesite="strict")
            return response
        return HTMLResponse((static / "index.html").read_text(), headers={"Cache-Control": "no-store"})

    async def state(request):
        if not access.ok(request):
            return PlainTextResponse("forbidden", 403)
        return JSONResponse(feed.state())

    async def ws(websocket: WebSocket):
        if not access.ok(websocket) or not access.same_origin(websocket):
            await websocket.close(code=1008)
            return
        await websocket.accept()
        event = feed.listen()
        ready, sent_seq, skipped, last_state = asyncio.Event(), 0, 0, 0.0
        ready.set()

        async def acks():
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") == "ready":
                    ready.set()
                    event.set()

        reader = asyncio.create_task(acks())
        try:
            while not reader.done():
                frame, now = feed.latest(), time.monotonic()
                if ready.is_set() and frame is not None and frame.seq > sent_seq:
                    if sent_seq:
                        skipped += frame.seq - sent_seq - 1  # newer frames overtook them while the page drew
                    ready.clear()
                    sent_seq = frame.seq
                    data = await asyncio.to_thread(pack, frame, feed.state(), skipped) if frame.jpeg is None \
                        else pack(frame, feed.state(), skipped)
                    await websocket.send_bytes(data)
                    last_state = now
                elif now - last_state >= STATE_EVERY:
                    await websocket.send_text(json.dumps({"type": "state", "state": feed.state(), "skipped": skipped}))
                    last_state = now
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), STATE_EVERY)
                except asyncio.TimeoutError:
                    pass
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            feed.unlisten(event)
            reader.cancel()

    async def mjpeg(request):
        if not access.ok(request):
            return PlainTextResponse("forbidden", 403)
        event = feed.listen()

        async def parts():
            sent = 0
            try:
                while True:
                    frame = feed.latest()
                    if frame is not None and frame.seq > sent:
                        sent = frame.seq
                        jpeg = frame.image() if frame.jpeg is not None else await asyncio.to_thread(frame.image)
                        yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
                               + jpeg + b"\r\n")
                    event.clear()
                    try:
                        await asyncio.wait_for(event.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass
            finally:
                feed.unlisten(event)

        return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame",
                                 headers={"Cache-Control": "no-store"})

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=hosts)] if hosts else []
    return Starlette(routes=[Route("/", page), Route("/state", state), Route("/mjpeg", mjpeg),
                             WebSocketRoute("/ws", ws), Mount("/static", StaticFiles(directory=str(static)))],
                     middleware=middleware)


class RemoteServeWarning(UserWarning):
    """The page was bound beyond loopback: patient video is reachable with the token."""


@dataclass
class Page:
    """A prepared page server: `listen()` binds (port 0 picks one), `url` is what to open (with the
    token, if any), `run()` serves until interrupted."""
    server: object  # uvicorn.Server
    feed: Feed
    host: str
    port: int
    token: str | None
    sock: socket.socket | None = None

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def listen(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            self.feed.close()
            raise ServeError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.sock, self.port = sock, sock.getsockname()[1]

    def run(self) -> None:
        if self.sock is None:
            self.listen()
        self.feed.start()
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.feed.close()


def prepare(endpoint: str, http: str = "127.0.0.1:8080", token_file: Path | None = None,
            curve_secret: Path | None = None, curve_server: Path | None = None) -> Page:
    """Check the addresses and keys, pick the token, build the app (nothing is bound yet); warns
    (RemoteServeWarning) when the page would be reachable from other machines."""
    require_web()
    import uvicorn

    host, port = parse_http(http)
    local = is_loopback(host)
    token = read_token(token_file) if token_file else (None if local else secrets.token_urlsafe(24))
    if not local:
        warnings.warn(f"serving on {host}:{port}, reachable from other machines: the page shows patient video "
                      "to anyone with the token (plain HTTP: use it on a trusted network only)",
                      RemoteServeWarning, stacklevel=2)
    feed = Feed(endpoint, curve_secret=curve_secret, curve_server=curve_server)
    # Loopback: accept only Host headers naming loopback, so no other site's name can rebind to it.
    app = make_app(feed, Access(token), hosts=["127.0.0.1", "localhost"] if local else None)
    # Open /mjpeg streams never finish by themselves: give them 2 s on Ctrl-C, then cut them.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="websockets-sansio",
                                           timeout_graceful_shutdown=2))
    return Page(server, feed, host, port, token)
