import threading
import time

import numpy as np
import pytest

from syndiff_stream.frames import Closed, Frame, FrameBuffer, LivePolicy, Mode


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
    assert buf.dropped == buf.dropped_capacity == 2 and buf.dropped_late == 0
    assert buf.get_batch(10) == [2, 3, 4]  # only the oldest went, in order


def test_get_batch_takes_only_what_is_there():
    buf = FrameBuffer(8, Mode.RECORDED)
    buf.put("a")
    assert buf.get_batch(4, timeout=1) == ["a"]
    assert buf.get_batch(4, timeout=0.05) == []
    buf.close()
    with pytest.raises(Closed):
        buf.get_batch(1)


# ---- live policy on scripted arrivals: a fake clock, no threads, no timing ----------------------

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def simulate(arrivals, service, policy=LivePolicy(), fps=25.0, workers=1, standing=None):
    """Feed a live buffer frames at the scripted `arrivals` (seconds) while `workers` consumers each
    take a frame whenever they are free and spend `service(i)` seconds on frame i. Returns the
    buffer and {frame: start time} in the order the frames were started."""
    clock = FakeClock()
    buf = FrameBuffer(policy.capacity_for(fps), Mode.LIVE, max_age=policy.budget_s(fps), clock=clock,
                      standing=standing)
    free, started, i = [0.0] * workers, {}, 0
    while True:
        next_arrival = arrivals[i] if i < len(arrivals) else float("inf")
        w = min(range(workers), key=free.__getitem__)
        if next_arrival <= free[w]:
            clock.t = next_arrival
            buf.put(i, next_arrival)
            i += 1
            continue
        clock.t = free[w]
        got = buf.get_batch(1, timeout=0)
        if got:
            started[got[0]] = clock.t
            free[w] = clock.t + service(got[0])
        elif i < len(arrivals):
            free[w] = next_arrival  # idle until the next frame comes
        else:
            return buf, started


def bursts(n, period=0.12, size=3, spread=0.001):
    """`n` frames at 25 fps on average, arriving `size` at a time (pacing by presentation time)."""
    return [(k // size) * period + (k % size) * spread for k in range(n)]


def test_policy_budget_is_a_few_frame_intervals_or_stated():
    assert LivePolicy().budget_s(25) == pytest.approx(0.12)
    assert LivePolicy().budget_s(50) == pytest.approx(0.06)
    assert LivePolicy().budget_s(None) == pytest.approx(0.1)
    assert LivePolicy(latency_budget_ms=80).budget_s(25) == pytest.approx(0.08)
    assert LivePolicy().capacity_for(25) == LivePolicy().capacity_for(None) == 3  # a whole burst waits
    assert LivePolicy(latency_budget_ms=200).capacity_for(50) == 10 and LivePolicy(capacity=1).capacity_for(50) == 1
    with pytest.raises(ValueError, match="capacity"):
        LivePolicy(capacity=0)
    with pytest.raises(ValueError, match="max_age"):
        FrameBuffer(2, Mode.LIVE, max_age=0)


def test_steady_arrival_keeps_every_frame_and_starts_it_on_arrival():
    arrivals = [k * 0.04 for k in range(50)]
    buf, started = simulate(arrivals, lambda i: 0.024)
    assert list(started) == list(range(50)) and buf.dropped == 0
    assert all(started[i] == arrivals[i] for i in started)


def test_bursts_within_capacity_lose_nothing_where_latest_wins_lost_a_third():
    arrivals = bursts(60)
    buf, started = simulate(arrivals, lambda i: 0.024)
    assert list(started) == list(range(60)) and buf.dropped == 0
    assert max(started[i] - arrivals[i] for i in started) <= 0.05  # third of a burst waits two calls
    # the old policy: one slot, the newer frame replaces the waiting one
    old = LivePolicy(capacity=1, latency_budget_ms=float("inf"))
    buf, started = simulate(arrivals, lambda i: 0.024, old)
    assert buf.dropped_capacity == 20 and len(started) == 40  # the middle frame of every burst
    # arrival jitter is measured: bursts show as near-zero gaps and a p95 of a whole burst period
    gaps = np.asarray(buf.arrivals())
    assert np.percentile(gaps, 50) == pytest.approx(0.001) and np.percentile(gaps, 95) == pytest.approx(0.118)


def test_overload_drops_for_capacity_keeps_order_and_the_newest_frame():
    arrivals = [k * 0.01 for k in range(200)]  # 100 fps into two workers of 24 ms each (83 fps)
    policy = LivePolicy()
    buf, started = simulate(arrivals, lambda i: 0.024, policy, fps=100, workers=2)
    kept = list(started)
    assert kept == sorted(kept) and kept[-1] == 199  # in order, and the latest frame still gets out
    assert buf.dropped_capacity > 0 and len(kept) + buf.dropped == 200
    assert max(started[i] - arrivals[i] for i in kept) <= policy.budget_s(100)  # latency stays bounded
    assert len(buf) == 0


def test_a_stall_drops_only_the_frames_that_grew_too_old():
    arrivals = [k * 0.04 for k in range(20)]
    policy = LivePolicy(latency_budget_ms=50, capacity=4)
    buf, started = simulate(arrivals, lambda i: 0.15 if i == 0 else 0.024, policy)
    # frames 1 (40 ms) and 2 (80 ms) waited through the 150 ms call: older than 50 ms, dropped late;
    # frame 3 (120 ms) is 30 ms old when the model is free again, and everything after flows
    assert buf.dropped_late == 2 and buf.dropped_capacity == 0
    assert list(started) == [0] + list(range(3, 20))
    assert all(started[i] - arrivals[i] <= 0.05 for i in started)


def test_recorded_mode_never_drops_late():
    clock = FakeClock()
    buf = FrameBuffer(4, Mode.RECORDED, max_age=0.01, clock=clock)
    buf.put("a", 0.0)
    clock.t = 10.0
    assert buf.get_batch(4, timeout=0) == ["a"] and buf.dropped == 0


def test_a_standing_queue_is_cut_to_the_newest_frame_so_overload_does_not_add_the_whole_budget():
    arrivals = [k * 0.1 for k in range(300)]  # 10 fps into two workers of 210 ms (9.5 fps): slightly too slow
    policy = LivePolicy()  # budget 300 ms: a queue standing 150 ms is cut

    def waits(buf_standing):
        buf, started = simulate(arrivals, lambda i: 0.21, policy, fps=10, workers=2, standing=buf_standing)
        return buf, np.array([started[i] - arrivals[i] for i in started])

    cut, cut_waits = waits(None)
    fifo, fifo_waits = waits(float("inf"))
    # about as many frames dropped either way (the excess must go), all counted as capacity ...
    assert cut.dropped_late == fifo.dropped_late == 0 and abs(cut.dropped_capacity - fifo.dropped_capacity) <= 3
    # ... but a queue left standing makes every frame wait nearly the whole budget
    assert fifo_waits.mean() > 0.2 and cut_waits.mean() < 0.06 and cut_waits.max() <= 0.15
