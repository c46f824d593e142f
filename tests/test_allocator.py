"""allocator.py: freed frame-sized buffers stay mapped for the next frame (glibc), unless the user
set malloc's own environment."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")

FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "retain":
    from syndiff_stream.allocator import retain_freed_memory
    assert retain_freed_memory() == "retained"
np.ones(48 << 18, np.float32)  # 48 MB: above glibc's largest dynamic mmap threshold (32 MB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(48 << 18, np.float32)  # allocated, first-touched, freed: a frame's buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **env) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_freed_buffers_are_reused_without_new_page_faults():
    assert page_faults("retain") * 4 < page_faults("default")


def test_the_users_malloc_environment_is_left_alone():
    code = "from syndiff_stream.allocator import retain_freed_memory; print(retain_freed_memory())"
    for env in ({"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})
        assert done.stdout.strip() == "the environment sets malloc: unchanged", done.stderr
