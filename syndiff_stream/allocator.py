"""Keep freed frame buffers for the next frame instead of handing them back to the kernel.

At 1920x1080 a probability map at source resolution is 8 MB, and so is a connected-components
label image. glibc's malloc serves blocks that large with fresh `mmap` pages and unmaps them on
free, so every frame first-touches tens of megabytes again: page faults that cost more than the
arithmetic (a 256 -> 1920x1080 bilinear resize: 1.9 ms into fresh pages, 0.15 ms into reused ones,
on the 2-core Zen 5 of docs/runtime.md). Raising the mmap and trim thresholds makes such blocks come
from the heap and stay there when freed, so the next frame's buffers are already mapped. The cost:
the process keeps its peak heap instead of returning it (a few frames' buffers).

glibc only, once per process, and never over a choice the user made: with MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or a malloc tunable in GLIBC_TUNABLES set, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 << 20  # larger than any frame-sized buffer up to 4K float32 (33 MB)
MMAP_THRESHOLD_FALLBACK = 32 << 20  # the most older glibc versions accept
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_chose() -> bool:
    return any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


@functools.cache
def retain_freed_memory() -> str:
    """Set the thresholds (see the module docstring); returns what was done, for logs and tests."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: unchanged"
    if user_chose():
        return "the environment sets malloc: unchanged"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK)
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    if mmap_ok and trim_ok:
        return "retained"
    return f"mallopt refused the {'trim' if mmap_ok else 'mmap'} threshold"
