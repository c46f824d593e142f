"""Faults and bad input: broken files, live sources that drop, odd frames, bad checkpoints, NaN
from the model, misbehaving subscribers, full disks and signals. Each ends in one clear line or a
counted, reported skip; none may hang (calls that could are run under `within`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest
import torch
import zmq
from typer.testing import CliRunner

from conftest import RT_TINY_CONFIG, rt_write_video
from rt_faults import partial_files, start_cli, video_frames, wait_for, within
from syndiff_stream import sinks as sinks_module
from syndiff_stream import sources as sources_module
from syndiff_stream.backends import EagerBackend, make_backend
from syndiff_stream.calibration import FovSpec, Profile, save_profile
from syndiff_stream.cli import app
from syndiff_stream.frames import Frame, Mode
from syndiff_stream.model import Segmenter, preset_config
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.publish import Publisher
from syndiff_stream.sinks import JsonlSink, MaskFolderSink
from syndiff_stream.smoothing import SmoothingConfig
from syndiff_stream.soak import rss_mb
from syndiff_stream.sources import AVSource, ReconnectingSource, Source, SourceError, open_source
from syndiff_stream.subscribe import Subscriber
from test_publish import result as make_result

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> str:
    """The run ended with exit 2 and one `error:` line, last (after at most the graph's description)."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[-1]


def write_clip(path, size, pix_fmt="yuv420p", codec="ffv1", frames=4, fps=25, fmt=None):
    """A few frames of a moving disc in any codec / pixel format / size PyAV can encode."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            img = np.full((h, w, 3), (150, 80, 70), np.uint8)
            img[np.hypot(yy - h / 2, xx - w / 3 - 3 * i) < h / 5] = (230, 120, 110)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))


# ---- broken files ---------------------------------------------------------------------------------

def broken_file(folder, kind: str):
    rt_write_video(folder / "good.mkv", frames=6, size=(60, 80))
    rt_write_video(folder / "good.mp4", frames=6, size=(60, 80))
    mkv, mp4 = (folder / "good.mkv").read_bytes(), (folder / "good.mp4").read_bytes()
    path = folder / {"audio": "sound.wav", "codec": "x.mkv", "headers": "x.mkv"}.get(kind, "x.mp4")
    if kind == "audio":
        with av.open(str(path), "w") as container:
            stream = container.add_stream("pcm_s16le", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate = 8000
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        return path
    path.write_bytes({
        "empty": b"",
        "text": b"referral letter, not a video\n" * 40,
        "truncated": mp4[: len(mp4) // 2],  # the index (moov) is at the end: nothing to open
        "codec": mkv.replace(b"V_MPEG4/ISO/ASP", b"V_ZZZZZ/ISO/ZZZ"),  # a codec FFmpeg does not know
        "headers": mkv[: len(mkv) // 3],  # container headers, but not one whole frame
    }[kind])
    return path


BROKEN = {"empty": "cannot open", "text": "cannot open", "truncated": "cannot open", "audio": "no video stream",
          "codec": "not supported", "headers": "no decodable video frames"}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_video_is_a_source_error_never_a_hang(tmp_path, kind):
    path = broken_file(tmp_path, kind)
    with pytest.raises(SourceError, match=BROKEN[kind]):
        within(10, lambda: list(open_source(str(path))))


@pytest.mark.parametrize("kind", ["text", "codec", "headers"])
def test_broken_video_on_the_command_line_is_one_line_and_no_output(tmp_path, rt_tiny_model_dir, kind):
    path = broken_file(tmp_path, kind)
    result = invoke("run", path, "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", "",
                    "--jsonl", tmp_path / "f.jsonl", "--quiet")
    assert path.name in one_line_error(result)
    assert not (tmp_path / "f.jsonl").exists() and partial_files(tmp_path) == []


def test_damaged_frames_are_skipped_counted_and_reported(tmp_path, rt_tiny_model_dir):
    rt_write_video(tmp_path / "v.mp4", frames=20, size=(60, 80))
    data = bytearray((tmp_path / "v.mp4").read_bytes())
    a, b = len(data) // 3, len(data) // 3 + len(data) // 5
    data[a:b] = bytes(b - a)  # a stretch of the file zeroed: some frames no longer decode
    (tmp_path / "v.mp4").write_bytes(bytes(data))
    result = invoke("run", tmp_path / "v.mp4", "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", "",
                    "--jsonl", tmp_path / "f.jsonl", "--quiet")
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "f.jsonl").read_text().splitlines()
    skipped = int(result.output.split("skipped ")[1].split()[0])
    assert skipped > 0 and len(rows) + skipped == 20


def test_truncated_stream_gives_its_decodable_frames(tmp_path):
    rt_write_video(tmp_path / "v.ts", frames=20, size=(60, 80))
    data = (tmp_path / "v.ts").read_bytes()
    (tmp_path / "cut.ts").write_bytes(data[: len(data) * 6 // 10])
    frames = within(10, lambda: list(open_source(str(tmp_path / "cut.ts"))))
    assert 0 < len(frames) < 20 and [f.index for f in frames] == list(range(len(frames)))


# ---- live sources that drop -----------------------------------------------------------------------

class Scripted(Source):
    """A network source stand-in: `n` frames, then the stream ends (or fails)."""

    kind, default_mode = "network", Mode.LIVE

    def __init__(self, n: int, fail: bool = False):
        self.n, self.fail, self.source_id = n, fail, "rtsp://scope"

    def __iter__(self):
        for i in range(self.n):
            yield Frame(np.zeros((8, 8, 3), np.uint8), self.source_id, i, None)
        if self.fail:
            raise SourceError("connection reset by peer")


class FakeClock:
    """The source's clock and stop event in one: waiting advances time at once, so backoff is
    checked exactly, whatever the machine's load."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False

    def is_set(self) -> bool:
        return False

    def set(self) -> None:
        pass


def test_reconnects_with_exponential_backoff_then_gives_up(monkeypatch):
    clock, attempts, plan = FakeClock(), [], ["refused", "refused", Scripted(2)]
    monkeypatch.setattr(sources_module, "time", SimpleNamespace(monotonic=clock.monotonic))

    def connect():
        attempts.append(clock.now)
        step = plan.pop(0) if plan else "refused"
        if step == "refused":
            raise SourceError("connection refused")
        return step

    source = ReconnectingSource(connect, timeout=0.6, backoff=0.05, max_backoff=0.2, first=Scripted(3, fail=True))
    source._stop = clock
    frames = within(10, list, source)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]  # indices continue across connections
    assert [f.gap_s > 0 for f in frames] == [False, False, False, True, False]
    assert source.reconnects == 1 and source.lost and source.state == "lost"
    assert frames[3].gap_s == pytest.approx(0.05 + 0.1 + 0.2) == pytest.approx(source.disconnected_s)
    # the final outage: 0.05 s, then 0.1, 0.2, capped at 0.2, and the last wait cut at the 0.6 s timeout
    assert np.diff(attempts[2:]) == pytest.approx([0.05, 0.1, 0.2, 0.2, 0.05])
    assert clock.now == pytest.approx(0.35 + 0.6)  # gave up exactly at its timeout


def test_interrupt_stops_a_reconnect_wait_at_once():
    def refuse():
        raise SourceError("connection refused")

    source = ReconnectingSource(refuse, timeout=3600, first=Scripted(1))
    threading.Timer(0.3, source.interrupt).start()
    assert len(within(60, list, source)) == 1  # returns long before the hour is up: a hang fails here
    assert not source.lost and source.state == "ended"


def serve_stream(data: bytes, connections: int) -> int:
    """A loopback TCP server that sends `data` to each of `connections` clients, then goes away."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        with server:
            for _ in range(connections):
                conn, _ = server.accept()
                with conn:
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def test_dropped_live_stream_reconnects_reports_the_gap_and_keeps_publishing(
        tmp_path, rt_tiny_model_dir, rt_endpoint):
    rt_write_video(tmp_path / "s.ts", frames=10, size=(60, 80))
    port = serve_stream((tmp_path / "s.ts").read_bytes(), connections=2)
    got = []
    with Subscriber(rt_endpoint, status=True) as sub:
        reader = threading.Thread(target=lambda: got.extend(sub.messages(timeout=30)))
        reader.start()
        result = within(60, invoke, "run", f"tcp://127.0.0.1:{port}", "--model", rt_tiny_model_dir, "--backend",
                        "eager", "--mode", "recorded", "--publish", rt_endpoint, "--wait-subscribers", 1,
                        "--reconnect-timeout", 2, "--jsonl", tmp_path / "f.jsonl", "--quiet")
        reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert "reconnects 1" in result.output and "source lost" in result.output
    rows = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [r["frame_index"] for r in rows] == list(range(len(rows))) and len(rows) >= 16
    gaps = [i for i, r in enumerate(rows) if r["gap_ms"] > 0]
    assert len(gaps) == 1 and 5 <= gaps[0] <= 10 and rows[gaps[0]]["gap_ms"] >= 250
    states = [m.header["state"] for m in got if m.topic == "status"]
    assert "reconnecting" in states and states[-1] == "lost"  # heartbeats kept coming while no frame did
    assert sum(m.topic == "mask" for m in got) == len(rows)


# ---- frames of every shape ------------------------------------------------------------------------

def run_to_masks(source, segmenter, tmp_path, **kwargs):
    """Run the graph over `source`; the masks, JSONL rows and stats it wrote."""
    sinks = [MaskFolderSink(tmp_path / "m"), JsonlSink(tmp_path / "f.jsonl"),
             sinks_module.OverlayVideoSink(tmp_path / "o.mp4", fps=25)]
    stats = within(60, Pipeline(source, make_backend("eager", segmenter), sinks, **kwargs).run)
    rows = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    masks = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((tmp_path / "m").glob("*.png"))]
    return masks, rows, stats


def test_size_pixel_format_and_rate_change_mid_stream(tmp_path, rt_tiny_segmenter):
    """One MPEG-TS stream whose size, pixel format (8 -> 10 bit) and frame rate change twice."""
    parts = [((120, 160), "yuv420p", 25), ((90, 120), "gray", 30), ((120, 160), "yuv420p10le", 15)]
    data = b""
    for i, (size, pix_fmt, fps) in enumerate(parts):
        write_clip(tmp_path / f"{i}.ts", size, pix_fmt, codec="libx264", fps=fps)
        data += (tmp_path / f"{i}.ts").read_bytes()
    (tmp_path / "changing.ts").write_bytes(data)
    masks, rows, stats = run_to_masks(open_source(str(tmp_path / "changing.ts")), rt_tiny_segmenter, tmp_path,
                                      smoothing=SmoothingConfig())
    shapes = [(120, 160)] * 4 + [(90, 120)] * 4 + [(120, 160)] * 4
    assert [r["frame_index"] for r in rows] == list(range(12)) and stats.frames_out == 12
    assert [tuple(r["shape"]) for r in rows] == shapes and [m.shape for m in masks] == shapes
    assert video_frames(tmp_path / "o.mp4") == 12  # one video size: other sizes are scaled to it


@pytest.mark.parametrize("pix_fmt", ["gray", "yuv420p10le", "yuv444p"])
def test_grey_ten_bit_and_odd_sized_video(tmp_path, rt_tiny_segmenter, pix_fmt):
    write_clip(tmp_path / "odd.mkv", (121, 161), pix_fmt)
    frames = list(open_source(str(tmp_path / "odd.mkv")))
    assert all(f.image.shape == (121, 161, 3) and f.image.dtype == np.uint8 for f in frames)
    if pix_fmt == "gray":
        assert all((f.image[..., 0] == f.image[..., 1]).all() for f in frames)
    masks, rows, _ = run_to_masks(open_source(str(tmp_path / "odd.mkv")), rt_tiny_segmenter, tmp_path)
    assert len(masks) == 4 and all(m.shape == (121, 161) for m in masks)
    assert video_frames(tmp_path / "o.mp4") == 4


def test_grey_16_bit_and_rgba_images(tmp_path, rt_tiny_segmenter):
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((33, 47), 120, np.uint8))
    cv2.imwrite(str(folder / "b.png"), np.full((20, 30, 3), 40000, np.uint16))
    cv2.imwrite(str(folder / "c.png"), np.full((15, 9, 4), 200, np.uint8))
    masks, rows, _ = run_to_masks(open_source(str(folder)), rt_tiny_segmenter, tmp_path)
    assert [m.shape for m in masks] == [(33, 47), (20, 30), (15, 9)]


# ---- checkpoints and profiles: checked before any frame -------------------------------------------

@pytest.fixture
def source_spy(monkeypatch):
    """Records every source opened and every frame iteration started."""
    opened, decoded = [], []
    real_open, real_iter = sources_module._open_source, AVSource.__iter__
    monkeypatch.setattr(sources_module, "_open_source", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    monkeypatch.setattr(AVSource, "__iter__", lambda self: decoded.append(self.url) or real_iter(self))
    return opened, decoded


def bad_checkpoint(folder, good, kind: str):
    if kind == "missing":
        return folder / "no-such-model"
    bad = folder / kind
    shutil.copytree(good, bad)
    if kind == "no-weights":
        (bad / "model.safetensors").unlink()
    elif kind == "corrupt-weights":
        (bad / "model.safetensors").write_bytes(os.urandom(300))
    elif kind == "corrupt-config":
        (bad / "config.json").write_text("{not json")
    elif kind == "mismatched":  # weights of a model with other channel counts
        Segmenter(preset_config("compact", **{**RT_TINY_CONFIG, "cond_channels": 8})).save_pretrained(folder / "o")
        shutil.copy(folder / "o" / "model.safetensors", bad / "model.safetensors")
    return bad


@pytest.mark.parametrize("kind", ["missing", "no-weights", "corrupt-weights", "corrupt-config", "mismatched"])
def test_bad_checkpoint_fails_before_the_source_is_opened(tmp_path, rt_tiny_model_dir, rt_video, source_spy, kind):
    model = bad_checkpoint(tmp_path, rt_tiny_model_dir, kind)
    run = invoke("run", rt_video, "--model", model, "--backend", "eager", "--publish", "",
                 "--jsonl", tmp_path / "f.jsonl")
    assert str(model.name) in one_line_error(run)
    batch = invoke("batch", rt_video, "--out", tmp_path / "out", "--model", model, "--backend", "eager")
    one_line_error(batch)
    assert source_spy == ([], []) and not (tmp_path / "f.jsonl").exists() and not (tmp_path / "out").exists()


def test_mismatched_profile_fails_before_any_frame(tmp_path, rt_tiny_model_dir, rt_video, source_spy):
    save_profile(Profile(fov=FovSpec(mode="fixed", box=(0, 0, 700, 500), frame_size=(576, 720))), tmp_path / "p.json")
    result = invoke("run", rt_video, "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", "",
                    "--profile", tmp_path / "p.json", "--jsonl", tmp_path / "f.jsonl")
    assert "720x576" in one_line_error(result)
    assert source_spy[1] == [] and not (tmp_path / "f.jsonl").exists()


# ---- NaN / inf from the model ---------------------------------------------------------------------

class Poisoned(EagerBackend):
    """A model that is confident everywhere (p = 0.9) except on the calls listed, where it
    returns NaN or inf, as an overflowing FP16 engine would."""

    def __init__(self, seg, bad: dict):
        super().__init__(seg)
        self.bad, self.calls = bad, 0

    def infer(self, batch):
        prob = torch.full((len(batch), 1, self.input_size, self.input_size), 0.9)
        if not batch.any():  # the pipeline's warm-up call (zeros), not a frame
            return prob
        if self.calls in self.bad:
            prob[:, :, :3, :3] = self.bad[self.calls]
        self.calls += 1
        return prob


class Capture:
    def __init__(self):
        self.results = []

    def write(self, result):
        self.results.append(result)

    def close(self):
        pass


def test_nan_or_inf_from_the_model_publishes_an_empty_invalid_mask(rt_tiny_segmenter, rt_video, rt_endpoint):
    capture, pub = Capture(), Publisher(rt_endpoint)
    with Subscriber(rt_endpoint) as sub:
        assert pub.wait_for_subscribers(1, timeout=5)
        pipeline = Pipeline(open_source(str(rt_video)), Poisoned(rt_tiny_segmenter, {2: float("nan"), 5: float("inf")}),
                            [capture, pub], batch_size=1, smoothing=SmoothingConfig())
        stats = within(60, pipeline.run)
        got = list(sub.messages(timeout=5))
    assert stats.invalid == 2 and stats.as_dict()["invalid"] == 2
    invalid = [r.frame.index for r in capture.results if not r.valid]
    assert invalid == [2, 5]
    for r in capture.results:
        assert np.isfinite(r.prob).all()  # NaN never reached the smoother's memory
        assert r.mask.any() == r.valid and (r.polyps == []) == (not r.valid)
    assert [m.header["valid"] for m in got] == [i not in (2, 5) for i in range(12)]
    assert not got[2].mask.any() and got[3].mask.any()


# ---- subscribers that are slow, absent or crash ---------------------------------------------------

def test_subscriber_that_never_reads_costs_drops_not_memory(rt_endpoint):
    pub = Publisher(rt_endpoint, encoding="raw")
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 4)
    for topic in (b"mask", b"end"):
        stalled.setsockopt(zmq.SUBSCRIBE, topic)
    stalled.connect(rt_endpoint)
    assert pub.wait_for_subscribers(1, timeout=5)
    big = make_result(h=480, w=640)  # 300 kB per raw mask
    for _ in range(100):  # queues fill up to their high-water marks
        pub.write(big)
    before = rss_mb()
    for _ in range(1500):  # 450 MB, were any of it kept; every send returns (NOBLOCK), none raises
        pub.write(big)
    assert rss_mb() - before < 40 and pub.sent == 1600
    stalled.close(linger=0)
    pub.close(linger=0)


def test_slow_and_crashing_subscribers_never_block_the_publisher(rt_endpoint):
    """Every write returns while one subscriber crashes and another reads slowly; the slow one
    gets messages in order and counts the ones it lost. No clock is read: a blocked write hangs
    the loop, and `within` turns the hang into a failure."""
    pub = Publisher(rt_endpoint, encoding="raw")
    crashing = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from syndiff_stream.subscribe import Subscriber\n"
        "sub = Subscriber(sys.argv[1])\n"
        "for _ in range(3): sub.recv()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"), rt_endpoint])
    slow_got, counts = [], {}

    def slow():
        with Subscriber(rt_endpoint, hwm=4) as sub:
            for msg in sub.messages(timeout=5):
                slow_got.append(msg.header["frame_index"])
                time.sleep(0.02)
            counts.update(received=sub.received, missed=sub.missed)

    reader = threading.Thread(target=slow)
    reader.start()
    assert pub.wait_for_subscribers(2, timeout=30)

    def publish():
        i = 0
        while crashing.poll() is None or i < 600:
            pub.write(make_result(i, h=240, w=320))
            i += 1
            time.sleep(0.001)
            assert i < 20000, "the crashing subscriber never crashed"
        return i

    sent = within(120, publish)
    assert crashing.returncode == -signal.SIGKILL
    pub.close(linger=1)
    reader.join(timeout=30)
    assert slow_got and slow_got == sorted(set(slow_got))
    # the slow queue may be full when `end` is sent (it is best effort), so the tail may go uncounted
    assert counts["received"] == len(slow_got) and counts["received"] + counts["missed"] <= sent - slow_got[0]


# ---- full disk, unwritable outputs ----------------------------------------------------------------

def test_full_disk_is_one_line_and_what_was_written_stays(tmp_path, rt_tiny_model_dir, rt_video, monkeypatch):
    (tmp_path / "f.jsonl").write_text("previous run\n")
    (tmp_path / "o.mp4").write_bytes(b"previous video")
    real_write, calls = JsonlSink.write, []

    def disk_fills_up(self, result):
        calls.append(result.frame.index)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.tmp))
        real_write(self, result)

    monkeypatch.setattr(JsonlSink, "write", disk_fills_up)
    result = invoke("run", rt_video, "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", "",
                    "--overlay", tmp_path / "o.mp4", "--masks", tmp_path / "m", "--jsonl", tmp_path / "f.jsonl")
    assert "No space left on device" in one_line_error(result)
    assert (tmp_path / "f.jsonl").read_text() == "previous run\n"  # earlier outputs intact
    assert (tmp_path / "o.mp4").read_bytes() == b"previous video"
    masks = sorted((tmp_path / "m").glob("*.png"))
    assert [p.name for p in masks] == [f"{i:06d}.png" for i in range(5)]  # written before the failure
    assert all(cv2.imread(str(p)).shape[:2] == (120, 160) for p in masks)
    assert partial_files(tmp_path) == []


@pytest.mark.parametrize("option, name", [("--masks", "m"), ("--jsonl", "f.jsonl"), ("--overlay", "o.mp4")])
def test_unwritable_output_is_one_line(tmp_path, rt_tiny_model_dir, rt_video, option, name):
    (tmp_path / "a-file").write_text("")
    result = invoke("run", rt_video, "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", "",
                    option, tmp_path / "a-file" / name)
    assert option in one_line_error(result)
    batch = invoke("batch", rt_video, "--out", tmp_path / "a-file", "--model", rt_tiny_model_dir, "--backend", "eager")
    assert "--out" in one_line_error(batch)


def test_a_mask_opencv_could_not_write_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sinks_module.cv2, "imwrite", lambda *a, **k: False)
    sink = MaskFolderSink(tmp_path)
    with pytest.raises(OSError, match="could not write"):
        sink.write(make_result())
    assert list(tmp_path.iterdir()) == []


# ---- SIGINT / SIGTERM -----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_closes_every_output(tmp_path, rt_tiny_model_dir, rt_endpoint, sig):
    video = tmp_path / "long.mp4"
    rt_write_video(video, frames=250, size=(60, 80), fps=25)  # 10 s played live
    masks, jsonl, overlay = tmp_path / "m", tmp_path / "f.jsonl", tmp_path / "o.mp4"
    with Subscriber(rt_endpoint) as sub:
        proc = start_cli("run", video, "--mode", "live", "--model", rt_tiny_model_dir, "--backend", "eager",
                         "--publish", rt_endpoint, "--overlay", overlay, "--masks", masks, "--jsonl", jsonl, "--quiet")
        try:
            wait_for(lambda: len(list(masks.glob("*.png"))) >= 5, 90, "five frames", proc)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        topics = []
        while (msg := sub.recv(timeout=3)) is not None:
            topics.append(msg.topic)
    assert proc.returncode == 0, err
    assert "(interrupted)" in err and topics[-1] == "end"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]  # every line whole
    pngs = sorted(int(p.stem) for p in masks.glob("*.png"))
    assert 5 <= len(rows) < 250 and [r["frame_index"] for r in rows] == pngs
    assert video_frames(overlay) == len(rows)
    assert partial_files(tmp_path) == []
