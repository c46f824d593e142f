import threading
import time

import numpy as np
import pytest

from syndiff_stream.frames import Closed, Frame, FrameBuffer, Mode


def frame(i):
    return Frame(np.zeros((2, 2, 3), np.uint8), "t", i, i / 30)


def test_frame_is_frozen_record():
    f = frame(3)
    assert (f.source_id, f.index, f.shape) == ("t", 3, (2, 2))
    assert f.capture_time > 0
    with pytest.raises(AttributeError):
        f.index = 4


def test_recorded_blocks_producer_and_loses_nothing():
    buf = FrameBuffer(2, Mode.RECORDED)
    done = threading.Event()

    def produce():
        for i in range(6):
            buf.put(i)
        buf.close()
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.1)
    assert not done.is_set() and len(buf) == 2  # backpressure: the producer waits at capacity
    got = []
    while True:
        try:
            got += buf.get_batch(4, timeout=1)
        except Closed:
            break
    assert got == list(range(6)) and buf.dropped == 0


def test_live_drops_one_oldest_at_a_time():
    buf = FrameBuffer(3, Mode.LIVE)
    for i in range(5):
        buf.put(i)  # never blocks
    assert buf.dropped == 2
    assert buf.get_batch(10) == [2, 3, 4]  # only the oldest went, in order


def test_get_batch_takes_only_what_is_there():
    buf = FrameBuffer(8, Mode.RECORDED)
    buf.put("a")
    assert buf.get_batch(4, timeout=1) == ["a"]
    assert buf.get_batch(4, timeout=0.05) == []
    buf.close()
    with pytest.raises(Closed):
        buf.get_batch(1)
