"""Writes that publish a whole file or nothing: write beside the target, fsync, rename.

A crash, a full disk or Ctrl-C mid-write leaves the previous file (or none), never a torn one;
every writer in the package (checkpoints, training state, logs' companions, masks, videos) goes
through here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A hidden sibling of `path`, unique per process, keeping the suffix (writers pick formats by it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")


def discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def fsync(path: Path) -> None:
    """Data on disk before the rename that publishes it, so a crash cannot expose an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync(tmp)
        tmp.replace(path)
    finally:
        discard(tmp)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
