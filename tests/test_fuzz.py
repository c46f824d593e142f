"""Bounded fuzzing (hypothesis) of the two places that take bytes from outside: the video input
path and the subscriber's message parser. Each may fail only with its documented error
(SourceError, ProtocolError), never crash otherwise or hang."""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import rt_write_video
from rt_faults import within
from syndiff_stream.protocol import ENCODINGS, ProtocolError, encode_mask
from syndiff_stream.sources import SourceError, open_source
from syndiff_stream.subscribe import decode

FUZZ = settings(max_examples=100, deadline=timedelta(seconds=10), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def seed_videos(tmp_path_factory):
    """Small valid files in three containers: mutations of them reach deep into the demuxers."""
    folder = tmp_path_factory.mktemp("fuzz_seeds")
    out = []
    for suffix in (".mp4", ".mkv", ".ts"):
        rt_write_video(folder / f"seed{suffix}", frames=4, size=(32, 48))
        out.append((suffix, (folder / f"seed{suffix}").read_bytes()))
    return out


@st.composite
def mutated(draw, seeds):
    suffix, data = draw(st.sampled_from(seeds))
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 12))):
        op, at = draw(st.sampled_from(["flip", "zero", "cut", "insert", "truncate"])), draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "zero":
            data[at:at + draw(st.integers(1, 256))] = bytes(min(256, len(data) - at))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 256))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "truncate":
            del data[at:]
    return suffix, bytes(data)


def read_all(path: Path) -> int:
    frames = 0
    for frame in open_source(str(path)):
        assert frame.image.ndim == 3 and frame.image.shape[2] == 3 and frame.image.dtype == np.uint8
        frames += 1
    return frames


def test_mutated_or_random_bytes_as_a_video_file(seed_videos):
    any_bytes = st.tuples(st.sampled_from([".mp4", ".mkv", ".ts", ".avi", ""]), st.binary(max_size=2048))

    @FUZZ
    @given(st.one_of(mutated(seed_videos), any_bytes))
    def check(case):
        suffix, data = case
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"input{suffix}"
            path.write_bytes(data)
            try:
                within(10, read_all, path)
            except SourceError as exc:
                assert "\n" not in str(exc)  # one line

    check()


def shapes():
    return st.one_of(st.lists(st.integers(-3, 70), min_size=2, max_size=2),
                     st.just([1 << 20, 1 << 20]), st.just([65535, 65535]),
                     st.lists(st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=3)), max_size=3),
                     st.none(), st.text(max_size=5))


@st.composite
def messages(draw):
    """Multipart messages from near-valid (right topic, schema and payload kind) to noise."""
    if draw(st.booleans()):
        return draw(st.lists(st.binary(max_size=64), max_size=5))
    topic = draw(st.sampled_from([b"mask", b"overlay", b"end", b"status", b"MASK", b""]))
    header = {"schema": draw(st.sampled_from([1, 1, 1, 2, "1", None])), "shape": draw(shapes()),
              "encoding": draw(st.sampled_from([*ENCODINGS, "jpeg", "", None, 7]))}
    raw_header = draw(st.one_of(st.just(json.dumps(header).encode()), st.binary(max_size=32),
                                st.just(b"[" * 100_000), st.just(b'{"schema": 1e999999}')))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    mask = np.asarray(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w)), bool).reshape(h, w)
    payload = draw(st.one_of(
        st.binary(max_size=256),
        st.sampled_from(ENCODINGS).map(lambda e: encode_mask(mask, e)),
        st.just(cv2.imencode(".jpg", np.zeros((h, w, 3), np.uint8))[1].tobytes()),
        st.just(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\xff\xff\x00\x00\xff\xff\x08\x00\x00\x00\x00"),
        st.just(np.array([1 << 31, 1 << 31], "<u4").tobytes()),
    ))
    return [topic, raw_header, payload]


@settings(max_examples=200, deadline=timedelta(seconds=5), derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages())
@example([b"mask", json.dumps({"schema": 1, "shape": [65536, 65536], "encoding": "rle"}).encode(),
          np.array([1 << 31, 1 << 31], "<u4").tobytes()])  # runs that add up to 2^32 pixels
@example([b"mask", json.dumps({"schema": 1, "shape": [8, 8], "encoding": "png"}).encode(),
          b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\xff\xff\x00\x00\xff\xff\x08\x00\x00\x00\x00"])  # a PNG bomb
@example([b"status", b"[" * 100_000, b""])  # nested past the recursion limit
def test_random_messages_raise_only_protocol_errors(parts):
    try:
        msg = decode(parts)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    assert msg.topic in ("mask", "overlay", "end", "status") and isinstance(msg.header, dict)
    if msg.topic == "mask":
        assert msg.mask.dtype == bool and list(msg.mask.shape) == msg.header["shape"]
