"""Recorded procedures, one output folder each, resumable: the library behind `syndiff-stream batch`.

Each input's folder is built as `<out>/.<name>.partial/` (overlay.mp4, masks/, frames.jsonl) and
renamed to `<out>/<name>/` only after `summary.json` and `.done` are written, so a batch killed at
any point and run again skips finished inputs and redoes the unfinished one from its start.

    for path, final in plan(inputs, out):
        outcome = process_input(path, final, backend)   # done, skipped (done earlier) or failed

Both engines of `syndiff-stream batch` run this chain per input: `local` in a loop on this
machine, `ray` (batch_ray.py) in actors across a cluster; both report `Outcome`s and one
`summary_line`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .backends import Backend
from .frames import Mode
from .pipeline import Pipeline, Stats
from .sinks import JsonlSink, MaskFolderSink, OverlayVideoSink
from .smoothing import SmoothingConfig
from .sources import SourceError, open_source


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


@dataclass
class Outcome:
    """What became of one input, as either engine reports it. `status`: done (now), skipped (done
    by an earlier run), failed (`error` says why) or interrupted; `worker` names the Ray actor."""

    name: str
    path: str
    status: str
    frames: int = 0
    seconds: float = 0.0  # wall time of its pipeline
    cpu_s: float = 0.0  # CPU time of the process meanwhile, all threads: the cost, whatever else runs
    error: str = ""
    stats: dict = field(default_factory=dict)  # Stats.as_dict() of this run (decode, model, e2e fps)
    worker: str = ""


def recorded_frames(final: Path) -> int:
    """Frames of a finished folder, from its summary.json (0 when unreadable)."""
    try:
        return int(json.loads((final / "summary.json").read_text())["frames_out"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def process_input(path: Path, final: Path, backend: Backend, smoothing: SmoothingConfig | None = None,
                  overlay: bool = True, on_start: Callable[[Pipeline, int], None] | None = None,
                  on_progress: Callable[[Stats], None] | None = None) -> Outcome:
    """`process_recording` with the batch's rules, shared by both engines: a finished folder is
    skipped, an unreadable input is a failed Outcome (nothing left behind) so the others go on;
    OSError (an output that cannot be written) propagates."""
    path, final = Path(path), Path(final)
    if is_done(final):
        return Outcome(final.name, str(path), "skipped", frames=recorded_frames(final))
    cpu0 = time.process_time()
    try:
        stats = process_recording(path, final, backend, smoothing, overlay, on_start, on_progress)
    except SourceError as exc:
        return Outcome(final.name, str(path), "failed", error=str(exc))
    return Outcome(final.name, str(path), "interrupted" if stats.interrupted else "done", stats.frames_out,
                   stats.wall_s, time.process_time() - cpu0, stats=stats.as_dict())


def summary_line(outcomes: Sequence[Outcome], wall_s: float) -> str:
    """`4 inputs: 2 done, 1 done earlier, 1 failed; 720 frames in 12.0 s = 60.0 fps, CPU 31 ms per
    frame`: frames and fps count the inputs processed by this run, over its whole wall time; CPU is
    what processing them cost (all threads), which does not depend on what else ran meanwhile."""
    count = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed", "interrupted")}
    done = [o for o in outcomes if o.status == "done"]
    frames = sum(o.frames for o in done)
    fps = frames / wall_s if wall_s > 0 else 0.0
    parts = [f"{count['done']} done", f"{count['skipped']} done earlier", f"{count['failed']} failed"]
    if count["interrupted"]:
        parts.append(f"{count['interrupted']} interrupted")
    cpu = f", CPU {1000 * sum(o.cpu_s for o in done) / frames:.0f} ms per frame" if frames else ""
    return f"{len(outcomes)} inputs: {', '.join(parts)}; {frames} frames in {wall_s:.1f} s = {fps:.1f} fps{cpu}"


def failure_message(outcomes: Sequence[Outcome], total: int) -> str | None:
    """The batch's one-line error when inputs failed (the others finished), else None."""
    failed = [o for o in outcomes if o.status == "failed"]
    if not failed:
        return None
    return f"{len(failed)} of {total} inputs failed and were skipped: " + "; ".join(o.error for o in failed)
