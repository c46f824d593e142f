"""`syndiff-stream batch --engine ray`: recorded procedures spread over a Ray cluster, a whole video per task.

Ray core actors, not Ray Data: the unit of work is a whole recording. Its frames must pass in
order through one smoother (temporal state), and its folder is committed once (`.partial` ->
`.done` -> rename, batch.py), so a retried video starts again from nothing and a finished one is
never redone. Ray Data moves blocks of rows between actors and has no per-video commit; "one video,
in order, on one actor, atomically" there is a one-row-per-video dataset whose `map_batches` does
all the work: Ray core with more machinery and less control over retries.

So: a pool of actors, each holding one model replica (ONNX Runtime on a CPU node; `--gpus-per-actor`
F: a fraction of a GPU, CUDA backends), each taking whole videos. The actor opens and decodes the
file itself, on the node that reads it (never through the driver), and writes the folder with
the local engine's own code (`batch.process_input`), so outputs are the local engine's.

Exactly once per video: the driver skips finished folders and each actor checks again; an actor
process that dies mid-video (OOM, lost node, crash) is restarted by Ray and the video retried in a
fresh `.partial` folder (`max_restarts` / `max_task_retries` = `retries`), whose half-written
files never look finished; a video that fails in the pipeline (unreadable, corrupt) comes back as a
failed Outcome and the others go on; one whose actor dies more than `retries` times is reported
with that error and the actor replaced.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .batch import BatchError, Outcome, is_done, process_input, recorded_frames
from .smoothing import SmoothingConfig

KILL_ONCE_ENV = "SYNDIFF_BATCH_KILL_ONCE"  # fault injection for the tests, see `_kill_once`


class RayOptions(BaseModel):
    """Where and how wide `batch --engine ray` runs."""

    model_config = ConfigDict(extra="forbid")

    # None: RAY_ADDRESS if set, else a new local cluster; "auto": the cluster this node belongs
    # to; HOST:PORT its head (GCS); ray://HOST:PORT through Ray Client.
    address: str | None = None
    actors: int | None = Field(None, ge=1)  # default: as many as the cluster's CPUs (GPUs) hold
    cpus_per_actor: float = Field(1.0, gt=0)  # also the actor's inference threads
    gpus_per_actor: float = Field(0.0, ge=0)  # > 0: CUDA, a fraction shares a GPU between replicas
    retries: int = Field(3, ge=0)  # restarts of an actor that died, retries of its video

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value == "auto" or re.fullmatch(r"(ray://)?[\w.\-]+:\d{1,5}", value):
            return value
        raise ValueError("choose auto, HOST:PORT or ray://HOST:PORT")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"


def import_ray():
    """Ray, or the one-line error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise BatchError("--engine ray needs Ray: pip install 'syndiff-stream[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that answers, or a one-line error: Ray itself retries an unreachable head forever."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BatchError(f"--address {address}: no Ray head answers there ({exc.strerror or exc})") from None


def connect(opts: RayOptions):
    """Join (or start) the cluster; a session already open in this process (tests) is used as is."""
    import logging

    ray = import_ray()
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        check_reachable(address)
    if not ray.is_initialized():
        try:
            if opts.address is None and not os.environ.get("RAY_ADDRESS"):
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=opts.address, logging_level=logging.WARNING)
        except ImportError as exc:  # ray:// without the client extra
            raise BatchError(f"--address {opts.address}: {exc}; pip install 'syndiff-stream[ray]'") from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BatchError(f"--address {opts.address or os.environ.get('RAY_ADDRESS')}: cannot join the Ray "
                             f"cluster: {str(exc).splitlines()[0]}") from None
    return ray


def pool_size(cluster: dict, opts: RayOptions, videos: int) -> int:
    """--actors, or as many replicas as the cluster's CPUs (or GPUs) hold; never more than videos."""
    if opts.actors is not None:
        return max(1, min(opts.actors, videos))
    if opts.gpus_per_actor > 0:
        fit = int(cluster.get("GPU", 0) / opts.gpus_per_actor + 1e-9)
    else:
        fit = int(cluster.get("CPU", 1) / opts.cpus_per_actor + 1e-9)
    return max(1, min(fit, videos))


# ---- what runs in the cluster ---------------------------------------------------------------------

class ProgressBoard:
    """Frames done per video in flight, written by the actors, read by the driver's progress bar."""

    def __init__(self):
        self.videos: dict[str, tuple[int, int]] = {}

    def start(self, name: str, total: int) -> None:
        self.videos[name] = (0, total)

    def update(self, name: str, frames: int) -> None:
        self.videos[name] = (frames, self.videos.get(name, (0, 0))[1])

    def forget(self, name: str) -> None:
        self.videos.pop(name, None)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return dict(self.videos)


class VideoWorker:
    """One model replica in a Ray actor: whole videos through the local engine's chain."""

    def __init__(self, model: str | None, backend: str, device: str, threads: int,
                 smoothing: SmoothingConfig | None, overlay: bool, tta: bool = False):
        """`model`: a checkpoint folder this node sees, like the videos (None: the shipped model).
        Read from disk, not sent through the object store, so that a restarted actor never
        depends on an object that may have been lost with its node."""
        import socket

        import ray

        from .backends import BackendError, make_backend, resolve_backend
        from .model import CheckpointError, Segmenter

        self.smoothing, self.overlay = smoothing, overlay
        self.error = ""
        try:  # kept, not raised: `ready` turns it into the batch's one-line error
            seg = Segmenter.from_pretrained(model)
            seg.config.tta_flip = seg.config.tta_flip or tta
            self.backend = make_backend(resolve_backend(backend, device), seg, device, threads=threads)
            actor = ray.get_runtime_context().get_actor_id()[:8]
            self.where = f"actor {actor}: {self.backend.name} on {device} at {socket.gethostname()}"
        except (BackendError, CheckpointError) as exc:
            self.error = str(exc)

    def ready(self) -> str:
        """The setup error, if any: the first call on each actor, so that it stops the batch early."""
        return self.error

    def process(self, path: str, final: str, board) -> Outcome:
        """One video into its folder; `board` (the ProgressBoard) hears its frame counts."""
        name = Path(final).name

        def started(pipeline, frames):
            board.start.remote(name, frames)
            _kill_once(pipeline)

        try:
            outcome = process_input(Path(path), Path(final), self.backend, self.smoothing, self.overlay,
                                    on_start=started,
                                    on_progress=lambda stats: board.update.remote(name, stats.frames_out))
        except OSError as exc:
            outcome = Outcome(name, path, "failed", error=f"{name}: cannot write output: {exc}")
        outcome.worker = self.where
        return outcome


class _Exit:
    """A sink that ends the actor's process after `after` frames: a worker dying mid-video."""

    def __init__(self, after: int):
        self.after, self.seen = after, 0

    def write(self, result) -> None:
        self.seen += 1
        if self.seen >= self.after:
            os._exit(1)

    def close(self) -> None:
        pass


def _kill_once(pipeline) -> None:
    """Fault injection for the tests: when $SYNDIFF_BATCH_KILL_ONCE names a file, the first actor to
    delete it dies two frames into its video (a partial folder on disk), as an OOM kill would."""
    arm = os.environ.get(KILL_ONCE_ENV)
    if arm:
        try:
            os.unlink(arm)
        except FileNotFoundError:
            return
        pipeline.sinks.append(_Exit(after=2))


# ---- the driver ---------------------------------------------------------------------------------------

@dataclass
class BatchProgress:
    """What the driver's bars show: videos settled of all, frames done of those known so far."""

    videos_done: int
    videos: int
    frames_done: int
    frames_known: int
    actors: int
    actors_ready: int


def run_ray_batch(pairs: Sequence[tuple[Path, Path]], model: str | Path | None, opts: RayOptions, backend: str = "auto",
                  smoothing: SmoothingConfig | None = None, overlay: bool = True, tta: bool = False,
                  on_progress: Callable[[BatchProgress], None] | None = None,
                  on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every (input, folder) pair through a pool of actors; one Outcome per pair, in input order.
    `model`: the checkpoint folder (None: the shipped one), read by each actor.

    Raises BatchError when the cluster cannot be joined or a replica cannot be built there (a
    missing backend): that would fail every video alike. On Ctrl-C the actors are killed; their
    `.partial` folders are redone by the next run."""
    outcomes: dict[int, Outcome] = {}

    def settle(i: int, outcome: Outcome) -> None:
        outcomes[i] = outcome
        if on_outcome:
            on_outcome(outcome)

    todo = deque()
    for i, (path, final) in enumerate(pairs):
        if is_done(final):
            settle(i, Outcome(final.name, str(path), "skipped", frames=recorded_frames(final)))
        else:
            todo.append(i)
    if not todo:  # a rerun of a finished batch needs no cluster
        return [outcomes[i] for i in range(len(pairs))]
    ray = connect(opts)
    from ray.exceptions import RayActorError, RayTaskError

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    worker_cls = ray.remote(VideoWorker).options(
        num_cpus=opts.cpus_per_actor, num_gpus=opts.gpus_per_actor,
        max_restarts=opts.retries, max_task_retries=opts.retries)
    model = None if model is None else str(Path(model).resolve())
    threads = max(1, int(opts.cpus_per_actor))
    checks: dict = {}  # ready() refs -> actor
    running: dict = {}  # process() refs -> (actor, index)
    up = 0  # actors that answered ready()

    def new_actor():
        actor = worker_cls.remote(model, backend, opts.device, threads, smoothing, overlay, tta)
        checks[actor.ready.remote()] = actor
        return actor

    idle = [new_actor() for _ in range(pool_size(ray.cluster_resources(), opts, len(todo)))]
    n_actors = len(idle)
    try:
        while todo or running:
            while idle and todo:
                actor, i = idle.pop(), todo.popleft()
                path, final = (str(Path(p).resolve()) for p in pairs[i])  # the actors' working folder is not ours
                running[actor.process.remote(path, final, board)] = (actor, i)
            ready, _ = ray.wait([*checks, *running], num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in checks:
                    checks.pop(ref)
                    try:
                        error = ray.get(ref)
                    except RayActorError:
                        continue  # died while starting: its process() call reports it
                    if error:
                        raise BatchError(f"a Ray worker cannot run the model: {error}")
                    up += 1
                    continue
                actor, i = running.pop(ref)
                path, final = pairs[i]
                try:
                    outcome = ray.get(ref)
                except RayActorError as exc:  # died more than `retries` times on this video
                    outcome = Outcome(final.name, str(path), "failed", error=f"{final.name}: the Ray worker died "
                                      f"{opts.retries + 1} times on it ({_last_line(exc)})")
                    ray.kill(actor, no_restart=True)
                    actor = new_actor()
                except RayTaskError as exc:  # an error in the pipeline itself: not retried
                    outcome = Outcome(final.name, str(path), "failed", error=f"{final.name}: {_last_line(exc.cause)}")
                board.forget.remote(final.name)
                idle.append(actor)
                settle(i, outcome)
            if on_progress:
                on_progress(_progress(ray.get(board.snapshot.remote()), outcomes, len(pairs),
                                      [pairs[i][1].name for _, i in running.values()], n_actors, up))
    finally:
        for actor in [*idle, *(a for a, _ in running.values())]:
            ray.kill(actor, no_restart=True)
        ray.kill(board)
    return [outcomes[i] for i in range(len(pairs))]


def _progress(live: dict, outcomes: dict, total: int, in_flight: list[str], actors: int, up: int) -> BatchProgress:
    done = sum(o.frames for o in outcomes.values() if o.status == "done")
    now = [live[name] for name in in_flight if name in live]
    return BatchProgress(len(outcomes), total, done + sum(f for f, _ in now), done + sum(max(f, t) for f, t in now),
                         actors, min(up, actors))


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__
