"""Helpers for the reliability tests: a hang guard, a CLI subprocess, and video readers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import av

REPO = Path(__file__).resolve().parents[1]


def within(seconds: float, fn, *args, **kwargs):
    """fn(*args) in a thread; fail the test (instead of hanging it) if it takes longer."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"{getattr(fn, '__name__', fn)} did not finish within {seconds} s (hang)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def start_cli(*args, **kwargs) -> subprocess.Popen:
    """`syndiff-stream ARGS` in a child process (one thread per library, like the tests)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "syndiff_stream.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.01):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def video_frames(path) -> int:
    """Frames a video file decodes to (raises if it is not a complete, readable video)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def partial_files(folder: Path) -> list[Path]:
    """Temporary files and folders a finished or cleanly stopped run must not leave behind."""
    return [p for p in Path(folder).rglob("*") if ".partial" in p.name]
