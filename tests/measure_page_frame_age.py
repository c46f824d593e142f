"""Frame age at the browser: the WebSocket page vs MJPEG, measured the same way (docs/serve.md).

    python tests/measure_page_frame_age.py [--seconds 15] [--fps 30] [--conditions cpu=1 cpu=8 reader=5]

A publisher in this process sends demo-scene overlays (720x576 JPEG, as `run --publish-overlay`)
with the frame index stamped as a 16-bit barcode in the top-left corner; `syndiff-stream serve`
runs as its own process; headless Chromium shows either the page (WebSocket frames drawn on a
canvas) or an <img> on /mjpeg. A requestAnimationFrame probe in the page reads the barcode off
what is on screen and notes when each index first appears. Frame age = that moment minus the
frame's capture time (one clock: everything runs on this machine), so it includes the publisher,
serve, the transport, decoding and drawing, to within one display frame (~17 ms). `--conditions`
stand for a slow browser: cpu=N slows the page's main thread N times (Emulation.setCPUThrottlingRate;
Chrome's image decoding threads are not slowed); reader=F replaces the browser with a Python client
that takes F frames per second off the same WebSocket (answering "ready" after each) or MJPEG
stream, and reads the barcode from each JPEG: a viewer slower than the stream, without the
browser's own scheduling in the way. (Chrome's network throttling leaves WebSockets alone, so it
cannot stand for a slow link here.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from browser import Chromium  # noqa: E402
from syndiff_stream.frames import Frame, Result  # noqa: E402
from syndiff_stream.postprocess import find_polyps  # noqa: E402
from syndiff_stream.preprocess import FieldOfView  # noqa: E402
from syndiff_stream.publish import Publisher  # noqa: E402
from syndiff_stream.sources import open_source  # noqa: E402

BITS, BLOCK = 16, 24

# Reads the barcode off what is on screen, once per display frame. `grab()` returns an ImageBitmap-
# like source: the page's canvas, or the MJPEG <img>.
PROBE = """
(() => {
  const seen = (window.seen = {});
  const probe = document.createElement("canvas");
  probe.width = %(bits)d * %(block)d; probe.height = %(block)d;
  const pc = probe.getContext("2d", { willReadFrequently: true });
  const grab = %(grab)s;
  function tick() {
    const src = grab();
    if (src && (src.naturalWidth || src.width) >= probe.width) {
      pc.drawImage(src, 0, 0, probe.width, probe.height, 0, 0, probe.width, probe.height);
      const px = pc.getImageData(0, 0, probe.width, probe.height).data;
      let index = 0;
      for (let b = 0; b < %(bits)d; b++) {
        const i = 4 * ((%(block)d >> 1) * probe.width + b * %(block)d + (%(block)d >> 1));
        if (px[i] + px[i + 1] + px[i + 2] > 384) index |= 1 << b;
      }
      if (!(index in seen)) seen[index] = Date.now();
    }
    requestAnimationFrame(tick);
  }
  requestAnimationFrame(tick);
  return true;
})()
"""
GRAB = {"ws": "() => document.getElementById('canvas')",
        "mjpeg": "() => document.getElementById('m')"}


def stamp(image: np.ndarray, index: int) -> np.ndarray:
    image = image.copy()
    for b in range(BITS):
        image[:BLOCK, b * BLOCK:(b + 1) * BLOCK] = 255 if index >> b & 1 else 0
    return image


def publish(endpoint: str, fps: float, seconds: float, captured: dict, sent: dict, stop: threading.Event) -> None:
    scene = [f for _, f in zip(range(60), open_source("demo", size=(576, 720), realtime=False))]  # decoded up front
    pub = Publisher(endpoint, overlay=True)
    start = time.monotonic()
    try:
        for i in range(int(seconds * fps)):
            if stop.is_set():
                break
            time.sleep(max(0.0, start + i / fps - time.monotonic()))
            src = scene[i % len(scene)]
            frame = Frame(stamp(src.image, i), "bench", i, i / fps)
            captured[i] = frame.capture_time
            mask = src.truth.copy()
            mask[:BLOCK] = False
            prob = mask.astype(np.float32)
            pub.write(Result(frame, prob, mask, find_polyps(mask, prob), FieldOfView.full(576, 720),
                             time.time() - frame.capture_time))
            sent[i] = time.time()  # overlay rendered, JPEG-encoded and handed to ZeroMQ
    finally:
        pub.close(linger=0)


def wait_until_up(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def barcode(jpeg: bytes) -> int:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    return sum(1 << b for b in range(BITS) if image[BLOCK // 2, b * BLOCK + BLOCK // 2] > 128)


def read_slowly(transport: str, base: str, fps: float, until: threading.Event) -> dict:
    """{index: wall ms when taken} for frames a client taking `fps` frames a second gets."""
    seen = {}
    if transport == "ws":
        from websockets.sync.client import connect

        with connect(base.replace("http", "ws") + "/ws", max_size=None) as ws:
            while not until.is_set():
                msg = ws.recv(timeout=10)
                if isinstance(msg, bytes):
                    n = int.from_bytes(msg[:4], "big")
                    seen.setdefault(barcode(msg[4 + n:]), time.time() * 1000)
                    time.sleep(1 / fps)
                    ws.send("ready")
        return seen
    with urllib.request.urlopen(base + "/mjpeg", timeout=10) as stream:
        while not until.is_set():
            length = None
            while (line := stream.readline().strip()) or length is None:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            seen.setdefault(barcode(stream.read(length)), time.time() * 1000)
            stream.readline()
            time.sleep(1 / fps)
    return seen


def measure(transport: str, condition: str, args) -> dict:
    from conftest import rt_free_endpoint

    endpoint = rt_free_endpoint()
    port = int(rt_free_endpoint().rpartition(":")[2])
    serve = subprocess.Popen([sys.executable, "-c", "from syndiff_stream.cli import app; app()", "serve", endpoint,
                              "--http", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    captured, sent, stop = {}, {}, threading.Event()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base + "/state")
        kind, _, value = condition.partition("=")
        publisher = threading.Thread(target=publish, args=(endpoint, args.fps, args.seconds, captured, sent, stop))
        if kind == "reader":
            reading, done = {}, threading.Event()
            reader = threading.Thread(target=lambda: reading.update(read_slowly(transport, base, float(value), done)))
            reader.start()
            time.sleep(0.5)
            publisher.start()
            publisher.join()
            done.set()
            reader.join(timeout=30)
            seen = reading
        else:
            with Chromium() as browser:
                if transport == "ws":
                    browser.navigate(base + "/")
                else:
                    browser.navigate(base + "/state")  # a same-origin document, so the <img> can be read
                    browser.wait_for("document.readyState === 'complete'")
                    browser.evaluate("document.body.innerHTML = '<img id=m src=\"/mjpeg\">', true")
                browser.wait_for("document.readyState === 'complete'")
                if kind == "cpu" and float(value) > 1:
                    browser.send("Emulation.setCPUThrottlingRate", rate=float(value))
                browser.evaluate(PROBE % {"bits": BITS, "block": BLOCK, "grab": GRAB[transport]})
                publisher.start()
                publisher.join()
                time.sleep(1.0)
                seen = browser.evaluate("window.seen")
    finally:
        stop.set()
        serve.terminate()
        serve.wait(timeout=10)
    ages = sorted(t - captured[int(i)] * 1000 for i, t in seen.items() if int(i) in captured)
    warm = ages if len(ages) < 20 else sorted(
        t - captured[int(i)] * 1000 for i, t in seen.items() if int(i) in captured and int(i) >= args.fps)
    pct = lambda q: round(warm[min(len(warm) - 1, int(q * len(warm)))], 1)  # noqa: E731
    at_publisher = statistics.median((sent[i] - captured[i]) * 1000 for i in sent)
    return {"transport": transport, "condition": condition, "sent": len(captured), "shown": len(ages),
            "publisher_age_ms_median": round(at_publisher, 1),
            "age_ms_median": round(statistics.median(warm), 1) if warm else None, "age_ms_p95": pct(0.95) if warm else None,
            "age_ms_max": round(warm[-1], 1) if warm else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--conditions", nargs="+", default=["cpu=1", "cpu=8", "reader=5"],
                        help="cpu=N: page CPU N times slower; reader=F: a client taking F frames/s instead of a browser")
    args = parser.parse_args()
    for condition in args.conditions:
        for transport in ("ws", "mjpeg"):
            print(json.dumps(measure(transport, condition, args)), flush=True)


if __name__ == "__main__":
    main()
