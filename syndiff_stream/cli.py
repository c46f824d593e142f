"""`syndiff-stream`: segment polyps in images and video."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

MODEL_HELP = "checkpoint folder (config.json + model.safetensors); default: the shipped compact model"


def fail(message: str) -> None:
    """One clear line on stderr, exit status 2."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


TTA_HELP = "flip test-time augmentation: average the frame and its mirror image (about twice the model time)"


def load_model(path: Optional[Path], tta: bool = False):
    """`tta` turns flip TTA on for every backend (it is part of the model's forward pass, so an
    exported engine of a TTA model has it built in)."""
    from .model import CheckpointError, Segmenter

    try:
        seg = Segmenter.from_pretrained(path)
    except CheckpointError as exc:
        fail(str(exc))
    if tta:
        seg.config.tta_flip = True
    return seg


@app.callback()
def main() -> None:
    """Real-time polyp segmentation for colonoscopy video."""


@app.command()
def predict(
    images: List[Path] = typer.Argument(..., help="image files"),
    out: Path = typer.Option(..., help="folder for <stem>_mask.png and <stem>_overlay.png"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    timestep: Optional[int] = typer.Option(None, help="inference timestep (default: the model's)"),
    steps: int = typer.Option(1, help="U-Net passes: 1 = single step; more = DDIM, for comparison"),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP),
):
    """Segment still images: writes a mask PNG and an overlay PNG per image.

    An image that cannot be read is reported and skipped; the others are still done (exit 2 at
    the end, naming the ones skipped)."""
    from .backends import BackendError, EagerBackend
    from .stills import segment_stills

    seg = load_model(model, tta)
    try:
        backend = EagerBackend(seg, "cpu", timestep=timestep, steps=steps)
        out.mkdir(parents=True, exist_ok=True)
    except (BackendError, OSError) as exc:
        fail(str(exc))
    failed = []
    for path, result in segment_stills(images, backend, out):
        if isinstance(result, str):
            typer.secho(f"{path}: skipped: {result}", err=True, fg=typer.colors.YELLOW)  # unreadable or unwritable
            failed.append(str(path))
        else:
            flag = "" if result.valid else "  (model output had NaN/inf: no answer, mask left empty)"
            typer.echo(f"{path}: polyp area {result.mask.mean() * 100:.1f}% -> {out / (path.stem + '_mask.png')}{flag}")
    if failed:
        fail(f"{len(failed)} of {len(images)} images could not be read or written: {', '.join(failed)}")


# ---- streaming runtime: run, batch, bench, view -------------------------------------------------

BACKEND_HELP = ("eager | compile | onnx | tensorrt | a CPU path (onnx-int8, eager-bf16, ...: docs/runtime.md) | auto "
                "(on CPU the fastest parity-keeping path for this CPU, probed once and cached; tensorrt on CUDA "
                "when installed, else eager)")
CALIBRATION_HELP = "int8 CPU paths (onnx-int8...): frames to calibrate on (a folder, a video or a profile)"
MODE_HELP = ("recorded (lossless, backpressure) | live (bounded latency: drops frames too old or too many, counted); "
             "default by source kind")
ENGINE_HELP = "an engine file from `syndiff-stream export` (.onnx, or a TensorRT .ep); overrides --backend"
PROFILE_HELP = "calibration profile (.json/.yaml): field of view, threshold, smoothing, colour correction"
REMOTE_HELP = "allow --publish on an address other machines reach (warns; see --curve-secret)"
CURVE_SECRET_HELP = "encrypt with CURVE: the publisher's .key_secret file from `syndiff-stream keys`"
CURVE_ALLOW_HELP = "with --curve-secret: accept only clients whose .key files are in this folder"
GATE_PERSIST_HELP = ("alarm gating: report (draw, publish) a polyp from its Nth consecutive frame; 1: at once "
                     "(default: the profile's, else 3)")
GATE_HOLD_HELP = "alarm gating: keep a reported polyp M frames after it vanishes (default: the profile's, else 0)"
RELIABLE_HELP = ("also bind this ZeroMQ endpoint for ONE consumer that gets every frame exactly once, in "
                 "order (PUSH/PULL; Subscriber(reliable=True)); the run waits for it, up to 60 s without progress")
RECONNECT_HELP = ("network/device sources: after a disconnect, reconnect with backoff for up to this many "
                  "seconds, then stop; 0: stop at once")


def pick_device(device: str) -> str:
    from .backends import BackendError
    from .backends import pick_device as choose

    try:
        return choose(device)
    except BackendError as exc:
        fail(str(exc))


def build_backend(seg, backend: str, device: str, threads: Optional[int] = None, engine: Optional[Path] = None,
                  calibration: Optional[Path] = None):
    """Backend or CPU path by name, with `auto` resolved (on a CPU: the path chosen for this CPU,
    said in one line on stderr) and errors as one line; `engine`: an exported file."""
    from .backends import BackendError, make_backend, onnx_cache_path, resolve_backend

    if engine is not None:
        from .export import open_engine

        try:
            return open_engine(seg, engine, device, threads, backend)
        except BackendError as exc:
            fail(str(exc))

    choose = backend == "auto" and device == "cpu"
    backend = resolve_backend(backend, device)
    if backend.startswith("onnx") and not onnx_cache_path(seg).is_file():
        from .backends import cache_dir

        typer.secho(f"exporting the model to ONNX once for this checkpoint (cached in {cache_dir()})", err=True)
    try:
        if choose:
            from .cpu_paths import build_chosen, choose as choose_path

            choice = choose_path(seg, threads)
            typer.secho(choice.line(), err=True)
            return build_chosen(seg, threads, choice)
        return make_backend(backend, seg, device, threads=threads,
                            **({"calibration": calibration} if calibration is not None else {}))
    except BackendError as exc:
        fail(str(exc))


def open_input(spec: Optional[str], realtime: Optional[bool] = None, fps: Optional[float] = None, seed: int = 0,
               reconnect_timeout: float = 0.0):
    from .sources import SourceError, open_source

    try:
        return open_source(spec, realtime=realtime, fps=fps, seed=seed, reconnect_timeout=reconnect_timeout)
    except SourceError as exc:
        fail(str(exc))


def check_mode(mode: Optional[str]):
    from .frames import Mode

    if mode is None:
        return None
    try:
        return Mode(mode)
    except ValueError:
        fail(f"--mode {mode!r}: choose recorded or live")


BUDGET_HELP = ("live mode: drop a frame that waited longer than this since capture, in ms "
               "(default: 3 frame intervals of the source, 100 ms when its rate is unknown)")


def live_policy(latency_budget: Optional[float]):
    from .frames import LivePolicy

    if latency_budget is not None and not latency_budget > 0:
        fail(f"--latency-budget must be > 0 ms, got {latency_budget}")
    return LivePolicy(latency_budget_ms=latency_budget)


def stats_line(stats) -> str:
    d = stats.as_dict()
    lat = d["latency_ms"]
    faults = "".join(f"  {name.replace('_', ' ')} {d[name]}" for name in ("skipped", "invalid", "reconnects")
                     if d[name])
    return (f"frames {d['frames_out']}/{d['frames']}  e2e {d['e2e_fps']:.1f} fps  model {d['model_fps']:.1f} fps  "
            f"decode {d['decode_fps']:.1f} fps  latency p50 {lat['p50']:.0f} / p99 {lat['p99']:.0f} ms  "
            f"dropped {d['dropped']}"
            + (f" (late {d['dropped_late']}, capacity {d['dropped_capacity']})  arrival gap p95 "
               f"{d['inter_arrival_ms']['p95']:.0f} ms" if d["mode"] == "live" else "") + faults
            + (f"  source lost after {d['disconnected_s']:.0f} s disconnected" if d["source_lost"] else ""))


def live_drops_explained(stats) -> str:
    """Why live mode dropped frames, in the two words its stats use (docs/runtime.md, Modes)."""
    d = stats.as_dict()
    parts = []
    if d["dropped_capacity"]:
        parts.append(f"{d['dropped_capacity']} for capacity (frames came faster than the model, "
                     f"{d['model_fps']:.1f} fps, took them)")
    if d["dropped_late"]:
        parts.append(f"{d['dropped_late']} late (older than the {d['latency_budget_ms']:.0f} ms budget when a core "
                     "was free: the machine stalled; --latency-budget raises it)")
    return "live mode dropped " + " and ".join(parts) + "; --mode recorded processes every frame"


class StopOnSignal:
    """SIGINT and SIGTERM ask the running pipeline to stop cleanly (finish the frame in hand,
    flush and close every output) instead of dying mid-write; a second signal interrupts at once."""

    def __init__(self):
        self.pipeline, self.signum, self.previous = None, None, {}

    def __enter__(self) -> "StopOnSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None or self.pipeline is None:
            raise KeyboardInterrupt
        self.signum = signum
        self.pipeline.request_stop()

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 2)


def run_pipeline(pipeline, on_progress=None, stopper: Optional[StopOnSignal] = None):
    """Run to the end; a source that fails mid-stream or an output that cannot be written (full
    disk, no permission) is reported as one line; outputs already finished stay as they were."""
    from .publish import ConsumerStalled
    from .sources import SourceError

    if stopper is not None:
        stopper.pipeline = pipeline
    try:
        return pipeline.run(on_progress=on_progress, progress_every=0.25)
    except (SourceError, ConsumerStalled) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write output: {exc}")


def open_sinks(makers) -> list:
    """Sinks from (name, factory) pairs; one that cannot be created (unwritable folder, port in
    use) is one line naming it, after closing those already made."""
    sinks = []
    for name, make in makers:
        try:
            sinks.append(make())
        except (OSError, ValueError) as exc:
            for sink in sinks:
                getattr(sink, "abort", sink.close)()
            fail(f"{name}: {exc}")
    return sinks


@app.command()
def run(
    source: Optional[str] = typer.Argument(None, help="file, folder, URL, device (v4l2:/dev/video0), pseudo:FOLDER or demo (default)"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    publish: str = typer.Option("tcp://127.0.0.1:5556", help="ZeroMQ endpoint to bind; '' to not publish"),
    encoding: str = typer.Option("png", help="mask payload: raw | png | rle"),
    publish_overlay: bool = typer.Option(False, help="also publish JPEG overlays on the 'overlay' topic"),
    wait_subscribers: int = typer.Option(0, help="wait for this many subscribers before the first frame"),
    reliable: str = typer.Option("", help=RELIABLE_HELP),
    overlay: Optional[Path] = typer.Option(None, help="write an overlay video here (.mp4)"),
    masks: Optional[Path] = typer.Option(None, help="write one mask PNG per frame into this folder"),
    jsonl: Optional[Path] = typer.Option(None, help="write one JSON line per frame here"),
    mode: Optional[str] = typer.Option(None, help=MODE_HELP),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    batch: Optional[int] = typer.Option(None, help="frames per inference batch (default: 4 recorded, 1 live)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: all cores)"),
    smooth: bool = typer.Option(True, help="temporal smoothing (EMA warped along the optical flow, minimum area)"),
    gate_persist: Optional[int] = typer.Option(None, help=GATE_PERSIST_HELP),
    gate_hold: Optional[int] = typer.Option(None, help=GATE_HOLD_HELP),
    max_frames: Optional[int] = typer.Option(None, help="stop after this many source frames"),
    fps: Optional[float] = typer.Option(None, help="frame rate of demo / folder / pseudo sources"),
    quiet: bool = typer.Option(False, help="no live status line"),
    engine: Optional[Path] = typer.Option(None, help=ENGINE_HELP),
    profile: Optional[Path] = typer.Option(None, help=PROFILE_HELP),
    allow_remote: bool = typer.Option(False, help=REMOTE_HELP),
    curve_secret: Optional[Path] = typer.Option(None, help=CURVE_SECRET_HELP),
    curve_allow: Optional[Path] = typer.Option(None, help=CURVE_ALLOW_HELP),
    reconnect_timeout: float = typer.Option(30.0, help=RECONNECT_HELP),
    latency_budget: Optional[float] = typer.Option(None, help=BUDGET_HELP),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP),
    calibration: Optional[Path] = typer.Option(None, help=CALIBRATION_HELP),
):
    """Segment a live or recorded video stream; publish masks over ZeroMQ and/or write files.

    SIGINT/SIGTERM stop it cleanly: every output is flushed and closed, exit status 0."""
    import warnings

    from rich.console import Console
    from rich.live import Live

    from .pipeline import Pipeline
    from .publish import Publisher, ReliableSender
    from .stages import Stages
    from .sinks import JsonlSink, MaskFolderSink, OverlayVideoSink

    console = Console(stderr=True)
    mode_ = check_mode(mode)
    live = live_policy(latency_budget)
    profile_ = read_profile(profile)
    gating = gating_config(profile_, gate_persist, gate_hold)
    dev = pick_device(device)
    seg = load_model(model, tta)  # a bad checkpoint fails before the source is even opened
    # A stream or device is opened only once the backend is made and set up as the pipeline runs it
    # (sessions created): its frames would otherwise pile up meanwhile and arrive as one burst.
    # Anything else is opened first, so a wrong path fails at once.
    from .sources import is_stream

    backend_ = build_backend(seg, backend, dev, threads, engine, calibration) if is_stream(source) else None
    # Live mode on a file plays it at its own frame rate, as a scope would deliver it.
    src = open_input(source, fps=fps, realtime=True if mode_ == "live" else None, reconnect_timeout=reconnect_timeout)
    apply_profile_checks(profile_, src)
    backend_ = backend_ or build_backend(seg, backend, dev, threads, engine, calibration)
    backend_.configure(backend_.max_workers)
    makers = []
    if publish:
        makers.append(("--publish", lambda: Publisher(publish, encoding=encoding, overlay=publish_overlay,
                                                      allow_remote=allow_remote, curve_secret=curve_secret,
                                                      curve_allow=curve_allow)))
    if reliable:
        makers.append(("--reliable", lambda: ReliableSender(reliable, encoding=encoding, overlay=publish_overlay,
                                                            allow_remote=allow_remote, curve_secret=curve_secret,
                                                            curve_allow=curve_allow)))
    if overlay:
        makers.append(("--overlay", lambda: OverlayVideoSink(overlay, fps=src.fps or 30.0)))
    if masks:
        makers.append(("--masks", lambda: MaskFolderSink(masks)))
    if jsonl:
        makers.append(("--jsonl", lambda: JsonlSink(jsonl)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sinks = open_sinks(makers)
    for w in caught:
        typer.secho(f"warning: {w.message}", err=True, fg=typer.colors.YELLOW)
    if publish and wait_subscribers and not sinks[0].wait_for_subscribers(wait_subscribers, timeout=60):
        fail(f"--wait-subscribers {wait_subscribers}: not enough subscribers on {publish} within 60 s")
    pipeline = Pipeline(src, backend_, sinks, mode=mode_, batch_size=batch, max_frames=max_frames, live=live,
                        stages=Stages.for_profile(backend_, profile_, smooth, gating))
    console.print(pipeline.describe(), soft_wrap=True)
    with StopOnSignal() as stopper:
        if quiet or not console.is_terminal:  # piped: no redrawn status line, just the final one
            stats = run_pipeline(pipeline, stopper=stopper)
        else:
            with Live(console=console, refresh_per_second=4, transient=True) as live:
                stats = run_pipeline(pipeline, lambda st: live.update(stats_line(st)), stopper=stopper)
    console.print(stats_line(stats) + ("  (interrupted)" if stats.interrupted else ""), soft_wrap=True)
    if pipeline.mode.value == "live" and stats.dropped:
        console.print(live_drops_explained(stats), soft_wrap=True)


ENGINE_RAY_HELP = "local (this machine, one input at a time) | ray (a Ray cluster: docs/scale-out.md)"


@app.command()
def batch(
    inputs: List[Path] = typer.Argument(..., help="recorded procedures: video files or image folders"),
    out: Path = typer.Option(..., help="one output folder per input is created here"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: str = typer.Option("auto", help="cpu | cuda | auto (local engine; on Ray it follows --gpus-per-actor)"),
    overlay: bool = typer.Option(True, help="write overlay.mp4 per input"),
    smooth: bool = typer.Option(True, help="temporal smoothing (EMA warped along the optical flow, minimum area)"),
    engine: str = typer.Option("local", help=ENGINE_RAY_HELP),
    address: Optional[str] = typer.Option(None, help="ray: auto (this node's cluster), HOST:PORT or ray://HOST:PORT; "
                                          "default: $RAY_ADDRESS, else a new local cluster"),
    actors: Optional[int] = typer.Option(None, help="ray: model replicas (default: as many as the cluster's CPUs or GPUs hold)"),
    cpus_per_actor: float = typer.Option(1.0, help="ray: CPUs per replica (its inference threads)"),
    gpus_per_actor: float = typer.Option(0.0, help="ray: GPU per replica, e.g. 0.25 (0: CPU replicas with ONNX Runtime)"),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP),
):
    """Process recorded procedures losslessly, one output folder per input; resumable.

    Writes <out>/<name>/ with overlay.mp4, masks/, frames.jsonl and summary.json. Finished inputs
    (marked .done) are skipped on a rerun; a folder appears under its final name only when complete.
    An unreadable input is reported and skipped (exit 2 at the end); SIGINT/SIGTERM stop cleanly
    (exit 130/143) and a rerun resumes with the unfinished input. `--engine ray` spreads the inputs
    over a Ray cluster, one whole video per task, with the same folders.
    """
    import time

    from .batch import BatchError, failure_message, plan, summary_line
    from .stages import default_smoothing

    if engine not in ("local", "ray"):
        fail(f"--engine {engine!r}: choose local or ray")
    ray_opts = None
    if engine == "ray":
        ray_opts = ray_options(address, actors, cpus_per_actor, gpus_per_actor, device, backend)
    elif address is not None or actors is not None or cpus_per_actor != 1.0 or gpus_per_actor != 0.0:
        fail("--address, --actors, --cpus-per-actor and --gpus-per-actor need --engine ray")
    try:
        pairs = plan(inputs, out)
    except BatchError as exc:
        fail(str(exc))
    dev = pick_device(device) if ray_opts is None else None
    seg = load_model(model, tta)
    smoothing = default_smoothing(smooth, seg.config)
    local_backend = build_backend(seg, backend, dev) if ray_opts is None else None  # on Ray: built in each actor
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"--out {out}: {exc}")
    t0 = time.perf_counter()
    if ray_opts is None:
        outcomes = batch_local(pairs, local_backend, smoothing, overlay)
    else:
        outcomes = batch_ray(pairs, model, ray_opts, backend, smoothing, overlay, tta)
    typer.echo(summary_line(outcomes, time.perf_counter() - t0))
    if ray_opts is not None:
        for line in worker_lines(outcomes):
            typer.echo(line)
    message = failure_message(outcomes, len(inputs))
    if message:
        fail(message)


def batch_progress():
    """The bars both engines draw: name, bar, n of total, time left, status."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"))


def batch_local(pairs, engine, smoothing, overlay) -> list:
    """The local engine: one input after another on this machine, a progress row each."""
    from .batch import process_input

    outcomes = []
    with batch_progress() as progress, StopOnSignal() as stopper:
        for path, final in pairs:
            if stopper.signum:  # a signal between two inputs
                raise typer.Exit(stopper.exit_code)
            task = progress.add_task(final.name, total=None, status="")

            def started(pipeline, frames, task=task):
                stopper.pipeline = pipeline
                progress.update(task, total=frames or None)

            try:  # a missing or broken recording is reported and the batch goes on with the others
                outcome = process_input(path, final, engine, smoothing, overlay, on_start=started,
                                        on_progress=lambda st, task=task: progress.update(task, completed=st.frames_out))
            except OSError as exc:
                fail(f"cannot write output: {exc}")
            outcomes.append(outcome)
            if outcome.status == "skipped":
                progress.update(task, total=1, completed=1, status="done earlier, skipped")
            elif outcome.status == "failed":
                progress.update(task, status="failed, skipped")
            elif outcome.status == "interrupted":
                progress.update(task, status="interrupted: rerun to resume")
                raise typer.Exit(stopper.exit_code)
            else:
                progress.update(task, total=outcome.frames, completed=outcome.frames,
                                status=f"{outcome.stats['e2e_fps']:.1f} fps -> {final}")
    return outcomes


def ray_options(address, actors, cpus_per_actor, gpus_per_actor, device, backend):
    """The Ray engine's options, checked before anything starts; each problem one line."""
    from pydantic import ValidationError

    from .backends import BACKENDS
    from .batch import BatchError
    from .batch_ray import RayOptions, import_ray
    from .model import validation_message

    try:
        import_ray()
    except BatchError as exc:
        fail(str(exc))
    if device != "auto":
        fail(f"--device {device}: with --engine ray the device follows --gpus-per-actor (0: cpu, > 0: cuda)")
    if backend != "auto" and backend not in BACKENDS:  # each actor builds its backend: name it wrong here, not there
        fail(f"unknown backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}")
    try:
        return RayOptions(address=address, actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
    except ValidationError as exc:
        fail("--" + validation_message(exc).replace("_", "-"))


def batch_ray(pairs, model, opts, backend, smoothing, overlay, tta=False) -> list:
    """The Ray engine: bars over videos and frames, a line per failed video as it happens."""
    import time

    from .batch import BatchError
    from .batch_ray import run_ray_batch

    t0, first_ready = time.perf_counter(), []
    with batch_progress() as progress:
        videos = progress.add_task("videos", total=len(pairs), status="")
        frames = progress.add_task("frames", total=None, status="")

        def show(p):
            if p.actors_ready and not first_ready:
                first_ready.append(time.perf_counter() - t0)
            progress.update(videos, completed=p.videos_done, status=f"{p.actors_ready}/{p.actors} actors ready")
            progress.update(frames, completed=p.frames_done, total=p.frames_known or None)

        def settled(outcome):
            if outcome.status == "failed":
                progress.console.print(f"[yellow]{outcome.error}[/yellow]", soft_wrap=True, markup=True, highlight=False)

        try:
            outcomes = run_ray_batch(pairs, model, opts, backend, smoothing, overlay, tta=tta, on_progress=show, on_outcome=settled)
        except BatchError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            typer.secho("interrupted: the actors were stopped; rerun to resume (finished videos are kept)",
                        err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(130)
        progress.update(videos, completed=len(pairs))
        progress.update(frames, completed=sum(o.frames for o in outcomes if o.status == "done"),
                        total=sum(o.frames for o in outcomes if o.status == "done") or None)
    if first_ready:
        typer.echo(f"cluster joined and a first model replica ready after {first_ready[0]:.1f} s")
    return outcomes


def worker_lines(outcomes) -> list[str]:
    """Per Ray actor: videos, frames, fps over its busy time, and the decode and model rates that bound it."""
    def rate(done, key):  # frames over the seconds the stage took, summed over the actor's videos
        seconds = sum(o.stats["frames"] / o.stats[key] for o in done if o.stats[key])
        return sum(o.stats["frames"] for o in done) / seconds if seconds else 0.0

    by_worker: dict = {}
    for o in outcomes:
        if o.status == "done":
            by_worker.setdefault(o.worker, []).append(o)
    lines = []
    for worker, done in sorted(by_worker.items()):
        frames, seconds = sum(o.frames for o in done), sum(o.seconds for o in done)
        lines.append(f"  {worker}: {len(done)} videos, {frames} frames, {frames / max(seconds, 1e-9):.1f} fps "
                     f"(decode {rate(done, 'decode_fps'):.0f} fps, model {rate(done, 'model_fps'):.1f} fps; "
                     f"CPU {1000 * sum(o.cpu_s for o in done) / max(frames, 1):.0f} ms per frame)")
    return lines


@app.command()
def bench(
    source: Optional[str] = typer.Argument(None, help="as for run; default: the demo scene, unpaced"),
    frames: int = typer.Option(200, help="frames to time"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    mode: Optional[str] = typer.Option(None, help=MODE_HELP),
    batch: Optional[int] = typer.Option(None, help="frames per inference batch"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference"),
    source_fps: Optional[float] = typer.Option(None, help="pace the source at this rate, like a live scope "
                                               "(e.g. 100 with --mode live: fed faster than the model keeps up); "
                                               "default: unpaced"),
    compare_steps: int = typer.Option(0, help="also time T-step DDIM on the same frames (e.g. 50)"),
    compare_frames: int = typer.Option(3, help="frames for the T-step comparison"),
    compare_rounds: int = typer.Option(5, help="interleaved timing rounds of the comparison: the speedup is "
                                       "their median, `speedup_range` their spread"),
    compare_model: Optional[List[Path]] = typer.Option(None, help="also time this checkpoint's model per frame, "
                                                       "side by side with --model on the same frames and backend "
                                                       "(repeatable; `compare_models` in the report)"),
    smoothing: bool = typer.Option(False, help="also report Dice and flicker with and without smoothing (needs true masks)"),
    json_out: bool = typer.Option(False, "--json", help="print only one JSON object"),
    engine: Optional[Path] = typer.Option(None, help=ENGINE_HELP),
    latency_budget: Optional[float] = typer.Option(None, help=BUDGET_HELP),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP),
    calibration: Optional[Path] = typer.Option(None, help=CALIBRATION_HELP),
):
    """Measure the pipeline honestly: warm up, then time decode, model and end to end."""
    import json

    from .benchmark import run_benchmark
    from .stages import default_smoothing

    if frames < 1:
        fail("--frames must be >= 1")
    if source_fps is not None and source_fps <= 0:
        fail(f"--source-fps must be > 0, got {source_fps}")
    mode_ = check_mode(mode)
    live = live_policy(latency_budget)
    dev = pick_device(device)
    seg = load_model(model, tta)
    compare = {}
    for path in compare_model or []:  # every checkpoint loads before any work starts
        if str(path) in compare:
            fail(f"--compare-model {path}: given twice")
        compare[str(path)] = load_model(path)
    backend_ = build_backend(seg, backend, dev, threads, engine, calibration)
    same = backend_.cpu_path or backend_.name  # the compared checkpoints run the benchmarked path
    others = {name: build_backend(other, same, dev, threads, calibration=calibration) for name, other in compare.items()}
    try:
        report = run_benchmark(seg, backend_, lambda: open_input(source, realtime=source_fps is not None, fps=source_fps), frames=frames, mode=mode_, batch_size=batch, live=live,
                               compare_steps=compare_steps, compare_frames=compare_frames,
                               compare_rounds=compare_rounds, compare_backends=others,
                               smoothing=default_smoothing(True, seg.config) if smoothing else None)
    except ValueError as exc:
        fail(str(exc))
    if json_out:
        typer.echo(json.dumps(report))
    else:
        from rich.console import Console
        from rich.pretty import Pretty

        Console().print(Pretty(report))


@app.command()
def view(
    endpoint: str = typer.Argument(..., help="publisher endpoint, e.g. tcp://127.0.0.1:5556"),
    out: Optional[Path] = typer.Option(None, help="write the received overlays to this video instead of a window"),
    max_frames: Optional[int] = typer.Option(None, help="stop after this many frames"),
    timeout: float = typer.Option(10.0, help="give up after this many seconds without a message"),
    curve_secret: Optional[Path] = typer.Option(None, help="CURVE publisher: this client's .key_secret file"),
    curve_server: Optional[Path] = typer.Option(None, help="CURVE publisher: the server's public .key file"),
):
    """Show what a publisher sends: its overlays (or, if it sends none, the masks' outlines)."""
    from .viewer import ViewerError, view_stream

    try:
        n = view_stream(endpoint, out=out, max_frames=max_frames, timeout=timeout,
                        curve_secret=curve_secret, curve_server=curve_server)
    except (ViewerError, ValueError) as exc:
        fail(str(exc))
    if n == 0:
        fail(f"nothing received from {endpoint} in {timeout:g} s: is a publisher running there?"
             + (f" ({out} not written)" if out else ""))
    typer.echo(f"{n} frames" + (f" -> {out}" if out else ""))


@app.command()
def serve(
    endpoint: str = typer.Argument("tcp://127.0.0.1:5556", help="publisher endpoint (run ... --publish-overlay sends the video)"),
    http: str = typer.Option("127.0.0.1:8080", help="HOST:PORT of the page; beyond loopback it needs a token"),
    token_file: Optional[Path] = typer.Option(None, help="read the page's access token from this file (default: a new one, printed)"),
    curve_secret: Optional[Path] = typer.Option(None, help="CURVE publisher: this client's .key_secret file"),
    curve_server: Optional[Path] = typer.Option(None, help="CURVE publisher: the server's public .key file"),
):
    """Watch a publisher in a browser: live overlay, polyp boxes, fps, latency, drops, source state."""
    import warnings

    from .serve import ServeError, prepare

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            page = prepare(endpoint, http, token_file=token_file, curve_secret=curve_secret, curve_server=curve_server)
        page.listen()
    except (ServeError, ValueError) as exc:
        fail(str(exc))
    for w in caught:
        typer.secho(f"warning: {w.message}", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"serving {endpoint} on {page.url}")
    page.run()


@app.command()
def keys(
    out: Path = typer.Option(..., help="folder for the certificate files"),
    client: List[str] = typer.Option(["client"], help="a client name (repeat for several)"),
    force: bool = typer.Option(False, help="replace existing keys (every client must then get new ones)"),
):
    """Make CURVE key pairs (ZeroMQ certificate files) for an encrypted, authenticated publisher."""
    from .keys import make_keys

    try:
        make_keys(out, tuple(client), force=force)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"publisher: run ... --curve-secret {out / 'server.key_secret'} --curve-allow {out / 'authorized'}")
    for name in client:
        typer.echo(f"client {name}: view ... --curve-secret {out / (name + '.key_secret')} "
                   f"--curve-server {out / 'server.key'}   (give {name}.key_secret to that client only)")


@app.command()
def soak(
    source: Optional[str] = typer.Argument(None, help="a live source; default: the demo scene at its own frame rate"),
    minutes: float = typer.Option(30.0, help="how long to run"),
    sample_every: float = typer.Option(10.0, help="seconds between samples"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    fps: Optional[float] = typer.Option(None, help="frame rate of the demo source"),
    out: Optional[Path] = typer.Option(None, help="also write the JSON report here"),
):
    """Soak test: a long live run sampling memory, fps and latency; prints one JSON object."""
    import json

    from .soak import run_soak
    from .stages import default_smoothing

    if minutes <= 0 or sample_every <= 0:
        fail("--minutes and --sample-every must be > 0")
    dev = pick_device(device)
    seg = load_model(model)
    backend_ = build_backend(seg, backend, dev)
    src = open_input(source, fps=fps, realtime=True, reconnect_timeout=30.0)
    with StopOnSignal() as stopper:  # Ctrl-C ends the soak early, with its report
        report = run_soak(src, backend_, minutes, sample_every, default_smoothing(True, seg.config),
                          on_sample=lambda s: typer.secho(json.dumps(s), err=True),
                          on_start=lambda pipeline: setattr(stopper, "pipeline", pipeline))
    text = json.dumps(report)
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(text)



# ---- deployment: calibration profiles and exported engines ---------------------------------------

def read_profile(path: Optional[Path]):
    """The profile, validated before any source is opened; None without --profile."""
    from .calibration import ProfileError, load_profile

    if path is None:
        return None
    try:
        return load_profile(path)
    except ProfileError as exc:
        fail(str(exc))


def apply_profile_checks(profile, source) -> None:
    from .calibration import ProfileError, check_source

    if profile is not None:
        try:
            check_source(profile, source)
        except ProfileError as exc:
            source.close()
            fail(str(exc))


def gating_config(profile=None, persist: Optional[int] = None, hold: Optional[int] = None):
    """Alarm gating: the command line's values over the profile's over the defaults."""
    from .gating import GateConfig

    base = profile.gating.config() if profile is not None else GateConfig()
    try:
        return GateConfig(persist=base.persist if persist is None else persist, hold=base.hold if hold is None else hold)
    except ValueError as exc:
        fail(f"--gate-persist/--gate-hold: {exc}")


@app.command()
def export(
    out: Path = typer.Option(..., help="engine file to write (.onnx for onnx, .ep for tensorrt); metadata goes to <out>.json"),
    backend: str = typer.Option("onnx", help="onnx | tensorrt"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | int8"),
    calibration: Optional[Path] = typer.Option(None, help="int8 calibration set: a folder of frames, a video, or a profile with an int8 manifest"),
    max_batch: int = typer.Option(8, help="largest batch the engine accepts (tensorrt)"),
    exporter: str = typer.Option("auto", help="onnx: auto (dynamo, TorchScript if it fails) | dynamo | torchscript"),
    tta: bool = typer.Option(False, "--tta", help=TTA_HELP + "; built into the engine, so run it with --tta too"),
):
    """Export the model to an engine file that `run --engine` and `bench --engine` load."""
    import warnings

    from .backends import BackendError
    from .export import export_engine

    seg = load_model(model, tta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            info = export_engine(seg, backend, out, precision, calibration, max_batch, exporter)
        except BackendError as exc:
            fail(str(exc))
    for w in caught:
        if "TorchScript exporter" in str(w.message):
            typer.secho(f"warning: {w.message}", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"{out}: {info.backend} {info.precision} ({info.exporter}), exported in {info.export_s:.1f} s"
               + (f", calibrated on {len(info.calibration)} frames" if info.calibration else ""))


@app.command()
def calibrate(
    frames: Path = typer.Option(..., help="this scope's frames: a folder of images (or a dataset layout with masks) or a video"),
    out: Path = typer.Option(..., help="profile to write (.json or .yaml)"),
    masks: Optional[Path] = typer.Option(None, help="true masks: same stems as the images, or frame numbers for a video"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    name: str = typer.Option("site", help="profile name"),
    scope: str = typer.Option("", help="endoscope / video processor model, recorded in the profile"),
    site: str = typer.Option("", help="site, recorded in the profile"),
    max_frames: int = typer.Option(200, help="use at most this many frames, evenly spaced"),
    int8_frames: int = typer.Option(16, help="frames kept as the INT8 calibration set manifest (0: none)"),
    flicker_weight: float = typer.Option(0.5, help="Dice points traded per unit of flicker beyond the true masks'"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
):
    """Measure a calibration profile for one scope/site; `run --profile` applies it."""
    import torch

    from .calibration import ProfileError, calibrate_profile, read_frames, save_profile

    if out.suffix not in (".json", ".yaml", ".yml"):
        fail(f"--out {out}: a profile is .json or .yaml")
    dev = pick_device(device)
    seg = load_model(model)
    engine = build_backend(seg, backend, dev)
    try:
        frames_, manifest = read_frames(frames, masks, limit=max_frames)
        profile = calibrate_profile(
            frames_, lambda x: engine.infer_numpy(torch.from_numpy(x)),
            seg.config.image_size, name=name, scope=scope, site=site, manifest=manifest if int8_frames else (),
            int8_frames=int8_frames, flicker_weight=flicker_weight, default_threshold=seg.config.threshold)
    except ProfileError as exc:
        fail(str(exc))
    save_profile(profile, out)
    c = profile.calibrated
    scores = ("  (no masks: threshold and smoothing kept from the default)" if not c["labelled"] else
              f"  Dice {c['dice_raw']:.3f}" + (f" raw -> {c['dice_smoothed']:.3f} smoothed, flicker "
                                               f"{c['flicker_raw']:.3f} -> {c['flicker_smoothed']:.3f}" if "dice_smoothed" in c else ""))
    typer.echo(f"{out}: {c['frames']} frames, field of view {profile.fov.mode}, threshold {profile.threshold}, "
               f"colour {profile.color.method}" + scores)


if __name__ == "__main__":
    app()
