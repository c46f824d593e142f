"""Recorded procedures, one output folder each, resumable: the library behind `syndiff-stream batch`.

Each input's folder is built as `<out>/.<name>.partial/` (overlay.mp4, masks/, frames.jsonl) and
renamed to `<out>/<name>/` only after `summary.json` and `.done` are written, so a batch killed at
any point and run again skips finished inputs and redoes the unfinished one from its start.

    for path, final in plan(inputs, out):
        if not is_done(final):
            process_recording(path, final, backend)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from .backends import Backend
from .frames import Mode
from .pipeline import Pipeline, Stats
from .sinks import JsonlSink, MaskFolderSink, OverlayVideoSink
from .smoothing import SmoothingConfig
from .sources import open_source


class BatchError(ValueError):
    """Inputs that cannot be planned (two would write the same folder)."""


def plan(inputs: Sequence[Path], out: Path) -> list[tuple[Path, Path]]:
    """(input, final output folder) pairs: a file's stem or a folder's name, under `out`."""
    pairs = [(Path(p), out / (Path(p).stem if Path(p).is_file() else Path(p).name)) for p in inputs]
    finals = [final for _, final in pairs]
    for final in finals:
        if finals.count(final) > 1:
            raise BatchError(f"two inputs would write to the same folder {final}; rename one")
    return pairs


def is_done(final: Path) -> bool:
    return (final / ".done").is_file()


def partial_folder(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def process_recording(path: Path, final: Path, backend: Backend, smoothing: SmoothingConfig | None = None,
                      overlay: bool = True, on_start: Callable[[Pipeline, int], None] | None = None,
                      on_progress: Callable[[Stats], None] | None = None) -> Stats:
    """One recording, losslessly, into `final` (complete or not at all). `on_start(pipeline,
    frames)` sees the pipeline before it runs (frames: the source's length, 0 if unknown), e.g. to
    stop it on a signal. Raises SourceError for an unreadable input (nothing is left behind) and
    OSError when an output cannot be written; an interrupted run returns its stats with
    `interrupted` set and leaves only the partial folder, which the next run replaces."""
    work = partial_folder(final)
    source = open_source(str(path))
    shutil.rmtree(work, ignore_errors=True)
    sinks = []
    try:
        sinks.append(MaskFolderSink(work / "masks"))
        sinks.append(JsonlSink(work / "frames.jsonl"))
        if overlay:
            sinks.append(OverlayVideoSink(work / "overlay.mp4", fps=source.fps or 30.0))
    except OSError:
        for sink in sinks:
            getattr(sink, "abort", sink.close)()
        source.close()
        raise
    pipeline = Pipeline(source, backend, sinks, mode=Mode.RECORDED, smoothing=smoothing)
    if on_start:
        on_start(pipeline, len(source))
    try:
        stats = pipeline.run(on_progress, progress_every=0.25)
    except Exception:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if stats.interrupted:
        return stats
    # Finished files first, then .done, then one rename: the folder appears complete or not at all.
    (work / "summary.json").write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
    (work / ".done").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return stats
