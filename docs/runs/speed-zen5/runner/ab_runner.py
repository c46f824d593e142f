"""The host runner and benchmark.throughput of commit 138ac91 (copied below: the submitting thread
stacks the batch, the worker calls infer_numpy, calls run in rounds that wait for every call in
flight) against the current ones (825e542: the worker stacks into its bound ORT buffers, the next
call goes in as soon as the oldest is collected), in one process, alternating rounds, and both against the bare session (two threads calling it
with nothing else to do); the default
checkpoint's onnx path, two single-threaded workers, batch 4 of Kvasir-SEG frames.

    python docs/runs/speed-zen5/runner/ab_runner.py ROUNDS CALLS_PER_WORKER    # at 825e542 or later
"""
import sys, time, glob
from pathlib import Path
import numpy as np, torch
from types import SimpleNamespace
from concurrent.futures import ThreadPoolExecutor
from syndiff_stream.model import Segmenter, default_checkpoint_path
from syndiff_stream.backends import make_backend
from syndiff_stream.benchmark import throughput
from syndiff_stream.datasets import read_image
from syndiff_stream.preprocess import prepare
from syndiff_stream.allocator import retain_freed_memory
retain_freed_memory()

class OldRunner:
    def __init__(self, backend):
        self.backend = backend; self.depth = max(1, backend.workers)
        self.pool = ThreadPoolExecutor(self.depth)
    def submit(self, items):
        x = torch.from_numpy(np.stack([i.x for i in items]))
        return self.pool.submit(self.backend.infer_numpy, x)
    def close(self): self.pool.shutdown()

def old_throughput(backend, x, seconds=0.0, min_calls=2):
    runner = OldRunner(backend); depth = runner.depth
    items = [SimpleNamespace(x=row) for row in x.numpy()]
    try:
        for h in [runner.submit(items) for _ in range(depth)]: h.result()
        calls, start = 0, time.perf_counter(); deadline = start + seconds
        while calls < min_calls * depth or time.perf_counter() < deadline:
            for h in [runner.submit(items) for _ in range(depth)]: h.result()
            calls += depth
        return calls * len(x) / (time.perf_counter() - start)
    finally: runner.close()

seg = Segmenter.from_pretrained(default_checkpoint_path()).eval()
b = make_backend("onnx", seg, threads=2); b.configure(2)
paths = sorted(glob.glob(str(Path(__file__).resolve().parents[4].parent / "shared/data/kvasir-seg-train/images/*")))[:4]
x = torch.from_numpy(np.stack([prepare(read_image(p), b.input_size)[0] for p in paths]))


def free(backend, x, calls):
    """The session alone: two threads each calling it `calls` times on a ready batch, nothing else."""
    import threading
    xn = x.numpy()
    def loop():
        for _ in range(calls):
            backend.session.run(None, {backend.input_name: xn})
    threads = [threading.Thread(target=loop) for _ in range(backend.workers)]
    start = time.perf_counter()
    [t.start() for t in threads]; [t.join() for t in threads]
    return calls * backend.workers * len(x) / (time.perf_counter() - start)


rounds = int(sys.argv[1]); calls = int(sys.argv[2])  # per worker
old, new, ref = [], [], []
old_throughput(b, x, 0, calls); throughput(b, x, 0, calls); free(b, x, calls)
for _ in range(rounds):
    old.append(old_throughput(b, x, 0, calls)); new.append(throughput(b, x, 0, calls)); ref.append(free(b, x, calls))
for name, v in (("old", old), ("new", new), ("free-running sessions", ref)):
    print("%s median %.1f [%.0f-%.0f]" % (name, np.median(v), min(v), max(v)))
for name, a, c in (("new/old", new, old), ("old/free", old, ref), ("new/free", new, ref)):
    r = np.array(a) / np.array(c)
    print("%s per round: median %.3f [%.3f-%.3f]" % (name, np.median(r), r.min(), r.max()))
