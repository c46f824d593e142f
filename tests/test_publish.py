import threading
import time

import cv2
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from syndiff_stream.frames import Frame, Result
from syndiff_stream.postprocess import find_polyps
from syndiff_stream.preprocess import FieldOfView
from syndiff_stream.protocol import (ENCODINGS, SCHEMA_VERSION, ProtocolError, decode_mask, dumps, encode_mask,
                                     loads)
from syndiff_stream.publish import ConsumerStalled, Publisher, ReliableSender
from syndiff_stream.subscribe import Message, Subscriber, decode


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


def test_png_masks_stay_8_bit_grey_0_and_255_for_any_decoder():
    """docs/protocol.md promises an 8-bit grey PNG with 0 and 255, whatever options make it fast."""
    mask = np.zeros((576, 720), bool)
    mask[100:300, 200:420] = True
    for given in (mask, mask.astype(np.uint8), mask[:, ::-1]):  # bool, 0/1 and a non-contiguous view
        grey = cv2.imdecode(np.frombuffer(encode_mask(given, "png"), np.uint8), cv2.IMREAD_UNCHANGED)
        assert grey.dtype == np.uint8 and grey.shape == mask.shape and set(np.unique(grey)) == {0, 255}
        assert np.array_equal(grey == 255, given.astype(bool))


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


def test_absent_subscriber_never_blocks(rt_endpoint):
    pub = Publisher(rt_endpoint, encoding="raw", hwm=4)
    for _ in range(50):
        pub.write(result(h=400, w=400))  # nobody listening: NOBLOCK sends, ZeroMQ discards
    assert pub.sent == 50 and pub.frames == 50
    pub.close(linger=0)


def stalled_subscriber(endpoint):
    """A SUB that connects, subscribes like a Subscriber, and never reads."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 4)
    sock.setsockopt(zmq.LINGER, 0)
    for topic in (b"mask", b"end"):
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    return sock


def test_a_stalled_subscriber_loses_only_its_own_messages(rt_endpoint):
    """600 raw 240x320 masks (46 MB): far more than any queue or socket buffer of the stalled
    subscriber holds. The healthy one must get all 600, in order. The publisher keeps at most 8
    frames ahead of the healthy reader, so what is tested is the stall, not this machine's speed.
    With XPUB_NODROP (before) the stalled queue made every send fail and this got ~30."""
    frames, window = 600, 8
    pub = Publisher(rt_endpoint, encoding="raw")
    stalled = stalled_subscriber(rt_endpoint)
    got, done = [], threading.Event()
    with Subscriber(rt_endpoint) as healthy:
        assert pub.wait_for_subscribers(2, timeout=10)

        def read():
            for msg in healthy.messages(timeout=10):
                got.append(msg.header["frame_index"])
            done.set()

        reader = threading.Thread(target=read)
        reader.start()
        for i in range(frames):
            wait_until(lambda: len(got) >= i - window or done.is_set(), 30)
            pub.write(result(i, h=240, w=320))
        pub.close(linger=5)
        reader.join(timeout=30)
        missed = healthy.missed
    stalled.close()
    assert got == list(range(frames)) and missed == 0


def test_subscriber_counts_what_it_missed():
    sub = Subscriber.__new__(Subscriber)  # counting only: no socket
    sub.wanted, sub.received, sub.missed, sub._next_seq = {b"mask", b"end"}, 0, 0, None
    for seq in (3, 4, 7, 8):  # joined at 3 (not missed), lost 5 and 6
        sub._count(Message("mask", {"seq": seq}))
    sub._count(Message("end", {"frames": 12}))  # and the last three
    assert sub.received == 4 and sub.missed == 2 + 3


def test_reliable_consumer_gets_every_frame_once_in_order_and_the_sender_waits(rt_endpoint):
    sender = ReliableSender(rt_endpoint, encoding="rle", hwm=2, stall_timeout=30)
    frames, got = 200, []
    consumer = Subscriber(rt_endpoint, reliable=True, hwm=2)

    def read_slowly():  # a consumer far behind the sender: the sender must wait, not drop
        for msg in consumer.messages(timeout=30):
            got.append((msg.header["seq"], msg.header["frame_index"]))
            if len(got) < 20:
                time.sleep(0.05)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    for i in range(frames):
        sender.write(result(i))
    sender.close()
    reader.join(timeout=60)
    consumer.close()
    assert got == [(i, i) for i in range(frames)] and consumer.missed == 0


def test_reliable_sender_gives_up_on_a_consumer_that_never_comes(rt_endpoint):
    sender = ReliableSender(rt_endpoint, stall_timeout=0.3)
    with pytest.raises(ConsumerStalled, match="took nothing"):
        sender.write(result())
    sender._release(0)


@pytest.mark.parametrize("endpoint, says", [
    ("tcp://127.0.0.1:99999", "port '99999'"), ("foo", "not a ZeroMQ endpoint"),
    ("tcp://999.1.1.1:5556", "not an IP address"), ("tcp://127.0.0.1", "tcp://HOST:PORT"),
])
def test_bad_endpoints_are_refused_with_the_reason(endpoint, says):
    with pytest.raises(ValueError, match=says):
        Publisher(endpoint)
    with pytest.raises(ValueError, match=says):
        Subscriber(endpoint)


def wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting (a hang, not a timing check)"
        time.sleep(0.001)


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


def test_a_failed_run_aborts_the_reliable_sender_without_waiting(rt_endpoint, rt_tiny_segmenter):
    """The consumer never reads: the run stops with ConsumerStalled, and shutting down does not
    wait a second stall timeout for `end` (abort, not close)."""
    from syndiff_stream.backends import make_backend
    from syndiff_stream.pipeline import Pipeline
    from syndiff_stream.sources import DemoSource

    sender, attempted = ReliableSender(rt_endpoint, stall_timeout=0.5), []
    send = sender._send
    sender._send = lambda parts: (attempted.append(bytes(parts[0])), send(parts))
    with pytest.raises(ConsumerStalled):
        Pipeline(DemoSource(size=(48, 60), realtime=False, frames=20), make_backend("eager", rt_tiny_segmenter),
                 [sender]).run()
    assert sender.socket.closed and sender.stalled and b"end" not in attempted  # no `end` waited for


def test_subscriptions_are_drained_while_publishing(rt_endpoint):
    """Subscribers that come and go are seen by writes alone (no wait_for_subscribers call):
    subscription messages are read on every send, for the publisher's whole life."""
    pub = Publisher(rt_endpoint)
    first, second = Subscriber(rt_endpoint), Subscriber(rt_endpoint)
    wait_until(lambda: pub.write(result()) or pub.subscribers == 2, 30)
    first.close()
    wait_until(lambda: pub.write(result()) or pub.subscribers == 1, 30)
    second.close()
    wait_until(lambda: pub.write(result()) or pub.subscribers == 0, 30)
    assert not pub.socket.poll(0, zmq.POLLIN)  # nothing left waiting to be read
    pub.close(linger=0)
