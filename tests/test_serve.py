"""`syndiff-stream serve`: the page in a real headless Chromium against the demo source, and the
server's access rules, newest-frame delivery and state without a browser."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette", reason="serve needs the [serve] extra")
pytest.importorskip("uvicorn", reason="serve needs the [serve] extra")
pytest.importorskip("websockets", reason="serve needs the [serve] extra")

from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from browser import Chromium, find_chromium  # noqa: E402
from syndiff_stream import serve as serve_mod  # noqa: E402
from syndiff_stream.backends import make_backend  # noqa: E402
from syndiff_stream.frames import Frame, Result  # noqa: E402
from syndiff_stream.pipeline import Pipeline  # noqa: E402
from syndiff_stream.postprocess import find_polyps  # noqa: E402
from syndiff_stream.preprocess import FieldOfView  # noqa: E402
from syndiff_stream.publish import Publisher  # noqa: E402
from syndiff_stream.sources import open_source  # noqa: E402

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="chromium is not installed (.ci/system-deps installs it)")
CLI = [sys.executable, "-c", "from syndiff_stream.cli import app; app()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict | None = None):
    """(status, headers, body) without following redirects."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class Served:
    """`syndiff-stream serve` in a subprocess, up once /state answers."""

    def __init__(self, endpoint: str, *extra: str, headers: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*CLI, "serve", endpoint, "--http", f"127.0.0.1:{self.port}", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if get(self.base + "/state", headers)[0] in (200, 403):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve did not answer within 60 s"
            time.sleep(0.2)

    def state(self) -> dict:
        return json.loads(get(self.base + "/state")[2])

    def close(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


@pytest.fixture
def served(rt_endpoint):
    servers = []

    def start(*extra, headers=None):
        servers.append(Served(rt_endpoint, *extra, headers=headers))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def result(index: int, h: int = 48, w: int = 64) -> Result:
    mask = np.zeros((h, w), bool)
    mask[10:30, 20:40] = True
    frame = Frame(np.full((h, w, 3), 90, np.uint8), "cam", index, index / 30)
    return Result(frame, mask.astype(np.float32), mask, find_polyps(mask, mask.astype(np.float32)),
                  FieldOfView.full(h, w), 0.012)


class DemoRun:
    """`run demo --mode live --publish-overlay` in a thread, with the tiny model: what the page watches."""

    def __init__(self, endpoint: str, segmenter, fps: float = 10):
        self.pipeline = Pipeline(open_source("demo", fps=fps, size=(288, 360), realtime=True),
                                 make_backend("eager", segmenter), [Publisher(endpoint, overlay=True)], mode="live")
        self.thread = threading.Thread(target=self.pipeline.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.pipeline.request_stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def next_frame(ws) -> tuple[dict, bytes]:
    """The next frame on a page's WebSocket, state messages skipped: (meta, JPEG)."""
    while True:
        msg = ws.recv(timeout=10)
        if isinstance(msg, bytes):
            n = int.from_bytes(msg[:4], "big")
            return json.loads(msg[4:4 + n]), msg[4 + n:]


def first_frame(ws, pub: Publisher) -> tuple[dict, bytes, int]:
    """Publish frames 0, 1, ... until the page's WebSocket has one: (meta, JPEG, next index)."""
    got, index = [], 0
    reader = threading.Thread(target=lambda: got.append(next_frame(ws)))
    reader.start()
    while reader.is_alive():
        pub.write(result(index))
        index += 1
        time.sleep(0.02)
    assert got, "no frame reached the page"
    return (*got[0], index)


def text(browser: Chromium, element_id: str) -> str:
    return browser.evaluate(f"document.getElementById({element_id!r}).textContent")


@needs_chromium
def test_page_shows_the_live_overlay_counters_and_a_stopped_publisher(served, rt_endpoint, rt_tiny_segmenter,
                                                                     tmp_path):
    server = served()
    run = DemoRun(rt_endpoint, rt_tiny_segmenter)
    try:
        with Chromium() as browser:
            browser.navigate(server.base + "/")
            # Generous bounds, not timings: a loaded CI machine may run the tiny model at ~1 fps.
            browser.wait_for("window.syndiff && window.syndiff.shown >= 3", timeout=120)
            # the state comes with the publisher's heartbeat (every second), frames may come sooner
            browser.wait_for("document.getElementById('state').textContent === 'streaming'", timeout=60)
            assert text(browser, "source") == "demo:0"
            first = browser.evaluate("window.syndiff.shown")
            browser.wait_for(f"window.syndiff.shown > {first} + 2", timeout=120)  # the counters move
            browser.wait_for("parseFloat(document.getElementById('fps').textContent) > 0", timeout=60)
            assert text(browser, "latency").endswith(" ms") and text(browser, "age").endswith(" ms")
            assert int(text(browser, "polyps")) >= 1  # the tiny random model finds blobs everywhere
            assert browser.evaluate("document.querySelectorAll('#boxes li').length") >= 1

            # The canvas on screen holds overlay pixels: tint outlines (green) and the page's boxes (yellow).
            shot = browser.screenshot()
            cv2.imwrite(str(tmp_path / "page.png"), cv2.cvtColor(shot, cv2.COLOR_RGB2BGR))
            r = browser.evaluate("(() => { const r = document.getElementById('canvas').getBoundingClientRect();"
                                 " return [r.left, r.top, r.right, r.bottom]; })()")
            x0, y0, x1, y1 = (int(round(v)) for v in r)
            canvas = shot[y0:y1, x0:x1].astype(int)
            assert canvas.shape[0] > 100 and canvas.shape[1] > 100
            r_, g_, b_ = canvas[..., 0], canvas[..., 1], canvas[..., 2]
            # Outline (0, 255, 120) and boxes (255, 220, 0), after JPEG and scaling: nothing in the
            # red-pink demo scene or its black surround is either.
            green = ((g_ > 140) & (g_ - r_ > 60) & (g_ - b_ > 20)).sum()
            yellow = ((r_ > 170) & (g_ > 150) & (b_ < 90)).sum()
            assert green > 200, f"no overlay outline pixels on the canvas (see {tmp_path / 'page.png'})"
            assert yellow > 20, f"no box pixels on the canvas (see {tmp_path / 'page.png'})"

            run.stop()  # the publisher goes away: the page says so and stays live
            assert browser.wait_for("document.getElementById('state').textContent === 'reconnecting'", timeout=60)
            assert "reconnecting" in text(browser, "detail")
            assert browser.evaluate("!document.getElementById('banner').hidden")
            assert browser.evaluate("1 + 1") == 2
    finally:
        if run.thread.is_alive():
            run.stop()


@needs_chromium
def test_page_shows_the_publishers_reconnecting_source(served, rt_endpoint):
    server = served()
    pub = Publisher(rt_endpoint, overlay=True)
    try:
        with Chromium() as browser:
            browser.navigate(server.base + "/")
            deadline = time.monotonic() + 30
            while browser.evaluate("window.syndiff ? window.syndiff.shown : 0") < 1:
                pub.write(result(0))
                pub.status({"state": "streaming", "frames": 1, "dropped": 0})
                assert time.monotonic() < deadline, "no frame reached the page"
                time.sleep(0.2)
            for _ in range(40):  # a live source stalls: only heartbeats come
                pub.status({"state": "reconnecting", "frames": 1, "dropped": 0, "disconnected_s": 2.0})
                if text(browser, "state") == "reconnecting":
                    break
                time.sleep(0.25)
            assert text(browser, "state") == "reconnecting"
            assert "source is reconnecting" in text(browser, "detail")
    finally:
        pub.close(linger=0)


@contextmanager
def page_socket(served, endpoint: str, overlay: bool):
    """A publisher, serve on it, and a page's WebSocket (no browser): (server, publisher, ws)."""
    server = served()
    pub = Publisher(endpoint, overlay=overlay)
    try:
        with connect(f"ws://127.0.0.1:{server.port}/ws", max_size=None, open_timeout=10) as ws:
            yield server, pub, ws
    finally:
        pub.close(linger=0)


def test_a_slow_page_gets_the_newest_frame_not_a_backlog(served, rt_endpoint):
    with page_socket(served, rt_endpoint, overlay=True) as (server, pub, ws):
        meta, jpeg, index = first_frame(ws, pub)
        assert jpeg[:2] == b"\xff\xd8" and meta["header"]["polyps_total"] == 1
        # The page is busy (no "ready"): 30 more frames arrive meanwhile, then it asks again.
        for _ in range(30):
            pub.write(result(index))
            index += 1
            time.sleep(0.01)
        time.sleep(0.3)
        newest = server.state()["received"]
        ws.send("ready")
        meta2, _ = next_frame(ws)
        assert meta2["seq"] == newest, "the page got an old frame, not the newest"
        assert meta2["header"]["frame_index"] == index - 1
        assert meta2["skipped"] == meta2["seq"] - meta["seq"] - 1 >= 10
        # Nothing queued behind it: without another "ready", only state messages come.
        for _ in range(3):
            assert isinstance(ws.recv(timeout=10), str)


def test_masks_only_publishers_are_drawn_as_outlines(served, rt_endpoint):
    with page_socket(served, rt_endpoint, overlay=False) as (_, pub, ws):
        _, jpeg, _ = first_frame(ws, pub)
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (48, 64, 3)
    assert image[15:25, 25:35].max() > 0 and image[40:, :10].max() < 30  # tinted mask on black


def test_token_file_other_origins_and_other_host_names_are_refused(served, tmp_path):
    token = "s3cret-token-for-the-test"
    (tmp_path / "token").write_text(token + "\n")
    server = served("--token-file", str(tmp_path / "token"))
    assert get(server.base + "/")[0] == 403
    assert get(server.base + "/state")[0] == 403
    assert get(server.base + "/mjpeg")[0] == 403
    assert get(server.base + "/?token=wrong")[0] == 403
    status, headers, _ = get(server.base + f"/?token={token}")
    assert status == 303 and headers["location"] == "/"  # the token leaves the address bar...
    cookie = headers["set-cookie"].split(";")[0]
    assert "httponly" in headers["set-cookie"].lower()
    assert get(server.base + "/", {"Cookie": cookie})[0] == 200  # ...and stays in the cookie
    assert get(server.base + "/state", {"Cookie": cookie})[0] == 200
    with pytest.raises(InvalidStatus), connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10):
        pass
    with connect(f"ws://127.0.0.1:{server.port}/ws", additional_headers={"Cookie": cookie}, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "state"
    with pytest.raises(InvalidStatus), connect(  # another site's page in the same browser
            f"ws://127.0.0.1:{server.port}/ws", additional_headers={"Cookie": cookie}, origin="http://evil.example",
            open_timeout=10):
        pass
    # DNS rebinding: a loopback page answers only to loopback names.
    assert get(server.base + "/state", {"Cookie": cookie, "Host": f"evil.example:{server.port}"})[0] == 400


def test_binding_beyond_loopback_needs_a_token_and_warns(rt_endpoint, tmp_path):
    with pytest.warns(serve_mod.RemoteServeWarning, match="patient video"):
        page = serve_mod.prepare(rt_endpoint, "0.0.0.0:8080")  # prepared, never bound
    try:
        assert "?token=" in page.url and len(page.url.partition("?token=")[2]) >= 24
    finally:
        page.feed.close()
    (tmp_path / "short").write_text("abc")
    with pytest.raises(serve_mod.ServeError, match="at least 16"):
        serve_mod.prepare(rt_endpoint, "0.0.0.0:8080", token_file=tmp_path / "short")
    with pytest.raises(serve_mod.ServeError, match="HOST:PORT"):
        serve_mod.prepare(rt_endpoint, "8080")


def test_without_the_web_extra_serve_says_what_to_install(monkeypatch):
    from typer.testing import CliRunner

    from syndiff_stream.cli import app

    monkeypatch.setattr(serve_mod, "Starlette", None)
    out = CliRunner().invoke(app, ["serve"])
    assert out.exit_code == 2
    assert "pip install 'syndiff-stream[serve]'" in out.output


def test_feed_state_follows_heartbeats_and_silence(rt_endpoint):
    pub = Publisher(rt_endpoint, overlay=True)
    feed = serve_mod.Feed(rt_endpoint, silent_after=0.5).start()
    try:
        assert feed.state()["state"] == "connecting"
        deadline = time.monotonic() + 10
        while feed.latest() is None:
            pub.write(result(0))
            pub.status({"state": "streaming", "frames": 1, "dropped": 3})
            assert time.monotonic() < deadline
            time.sleep(0.05)
        state = feed.state()
        assert state["state"] == "streaming" and state["publisher"]["dropped"] == 3
        assert feed.latest().jpeg[:2] == b"\xff\xd8"  # passed through, never decoded here
        pub.status({"state": "lost", "frames": 1})
        pub.close(linger=0.5)
        deadline = time.monotonic() + 5
        while feed.state()["state"] != "lost":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.6)
        state = feed.state()
        assert state["state"] == "reconnecting" and "'lost'" in state["detail"]
    finally:
        feed.close()


def test_curve_publisher_is_watched_with_the_client_keys(served, rt_endpoint, tmp_path):
    from syndiff_stream.keys import make_keys

    make_keys(tmp_path / "keys", ("viewer",))
    keys = tmp_path / "keys"
    pub = Publisher(rt_endpoint, overlay=True, curve_secret=keys / "server.key_secret", curve_allow=keys / "authorized")
    try:
        server = served("--curve-secret", str(keys / "viewer.key_secret"), "--curve-server", str(keys / "server.key"))
        deadline = time.monotonic() + 30
        while server.state()["received"] == 0:
            pub.write(result(0))
            assert time.monotonic() < deadline, "nothing arrived over CURVE"
            time.sleep(0.1)
    finally:
        pub.close(linger=0)
    bad = subprocess.run([*CLI, "serve", rt_endpoint, "--curve-secret", str(keys / "server.key")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "secret" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_stops_serve_even_with_an_mjpeg_viewer_open(served, rt_endpoint):
    import signal

    server = served()
    stream = urllib.request.urlopen(server.base + "/mjpeg", timeout=10)
    try:
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(timeout=20)  # uvicorn gives open streams 2 s, then cuts them
    finally:
        stream.close()


def test_a_taken_port_is_one_clear_line(rt_endpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([*CLI, "serve", rt_endpoint, "--http", f"127.0.0.1:{port}"], capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
