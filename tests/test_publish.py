import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from syndiff_stream.frames import Frame, Result
from syndiff_stream.postprocess import find_polyps
from syndiff_stream.preprocess import FieldOfView
from syndiff_stream.protocol import (ENCODINGS, SCHEMA_VERSION, ProtocolError, decode_mask, dumps, encode_mask,
                                     loads)
from syndiff_stream.publish import Publisher
from syndiff_stream.subscribe import Subscriber, decode


def result(index=0, h=30, w=40):
    mask = np.zeros((h, w), bool)
    mask[5:15, 10:20] = True
    image = np.full((h, w, 3), 90, np.uint8)
    frame = Frame(image, "cam", index, index / 30)
    return Result(frame, mask.astype(np.float32), mask, find_polyps(mask, mask.astype(np.float32)),
                  FieldOfView.full(h, w), 0.012)


@settings(max_examples=40, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 20), st.integers(1, 20))), st.sampled_from(ENCODINGS))
def test_every_encoding_round_trips(mask, encoding):
    assert np.array_equal(decode_mask(encode_mask(mask, encoding), encoding, mask.shape), mask)


def test_decoding_checks_the_header_shape():
    payload = encode_mask(np.ones((4, 4), bool), "rle")
    with pytest.raises(ProtocolError, match="4x5"):
        decode_mask(payload, "rle", (4, 5))
    with pytest.raises(ProtocolError, match="schema"):
        loads(dumps({"schema": SCHEMA_VERSION + 1}))


def test_subscriber_gets_masks_headers_and_end(rt_endpoint):
    pub = Publisher(rt_endpoint, encoding="rle")
    with Subscriber(rt_endpoint, overlay=True) as sub:
        assert pub.wait_for_subscribers(1, timeout=5)
        for i in range(3):
            pub.write(result(i))
        pub.close()  # sends end-of-stream
        got = list(sub.messages(timeout=5))
    assert [m.topic for m in got] == ["mask"] * 3  # overlays are off by default
    h = got[1].header
    assert h["schema"] == SCHEMA_VERSION and h["source_id"] == "cam" and h["frame_index"] == 1
    assert h["shape"] == [30, 40] and h["encoding"] == "rle" and h["latency_ms"] == 12.0
    assert h["polyps"] == [{"box": [10, 5, 20, 15], "area": 100, "score": 1.0}]
    assert np.array_equal(got[0].mask, result().mask)


def test_overlay_topic_when_enabled(rt_endpoint):
    pub = Publisher(rt_endpoint, overlay=True)
    with Subscriber(rt_endpoint, masks=False, overlay=True) as sub:
        assert pub.wait_for_subscribers(1, timeout=5)
        pub.write(result())
        msg = sub.recv(timeout=5)
    pub.close()
    assert msg.topic == "overlay" and msg.image.shape == (30, 40, 3) and msg.header["encoding"] == "jpeg"


def test_absent_or_stalled_subscriber_never_blocks_and_drops_are_counted(rt_endpoint):
    pub = Publisher(rt_endpoint, encoding="raw", hwm=4)
    big = result(h=400, w=400)
    start = time.perf_counter()
    for _ in range(50):
        pub.write(big)  # nobody listening
    stalled = Subscriber(rt_endpoint, hwm=4)  # connected, never reads
    assert pub.wait_for_subscribers(1, timeout=5)
    for _ in range(500):
        pub.write(big)
    assert time.perf_counter() - start < 5
    assert pub.dropped > 0 and pub.sent + pub.dropped == 550
    stalled.close()
    pub.close(linger=0)


def test_decode_rejects_malformed_messages():
    with pytest.raises(ProtocolError):
        decode([b"mask", b"{}"])
    with pytest.raises(ProtocolError):
        decode([b"mask", b"not json", b""])


def test_bind_failure_names_the_endpoint(rt_endpoint):
    first = Publisher(rt_endpoint)
    with pytest.raises(ValueError, match=rt_endpoint):
        Publisher(rt_endpoint)
    first.close()


def test_wait_for_subscribers_counts_subscribers_not_topics(rt_endpoint):
    pub = Publisher(rt_endpoint)
    first = Subscriber(rt_endpoint, overlay=True)
    assert pub.wait_for_subscribers(1, timeout=5)
    assert not pub.wait_for_subscribers(2, timeout=0.3)
    second = Subscriber(rt_endpoint)
    assert pub.wait_for_subscribers(2, timeout=5)
    first.close()
    second.close()
    pub.close(linger=0)
