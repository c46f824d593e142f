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


def load_model(path: Optional[Path]):
    from .model import CheckpointError, Segmenter

    try:
        return Segmenter.from_pretrained(path)
    except CheckpointError as exc:
        fail(str(exc))


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
):
    """Segment still images: writes a mask PNG and an overlay PNG per image."""
    import cv2
    import torch

    from .datasets import DatasetError, read_image
    from .overlay import render_overlay
    from .preprocess import prepare, to_source

    seg = load_model(model)
    out.mkdir(parents=True, exist_ok=True)
    size = seg.config.image_size
    for path in images:
        try:
            frame = read_image(path)
        except DatasetError as exc:
            fail(str(exc))
        x, fov = prepare(frame, size)
        x = torch.from_numpy(x)[None]
        prob = seg.predict_proba(x, timestep) if steps == 1 else seg.predict_proba_multistep(x, steps)
        mask = to_source(prob[0, 0].numpy(), fov, *frame.shape[:2]) >= seg.config.threshold
        cv2.imwrite(str(out / f"{path.stem}_mask.png"), mask.astype("uint8") * 255)
        overlay = render_overlay(frame, mask)
        cv2.imwrite(str(out / f"{path.stem}_overlay.png"), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        typer.echo(f"{path}: polyp area {mask.mean() * 100:.1f}% -> {out / (path.stem + '_mask.png')}")



# ---- streaming runtime: run, batch, bench, view -------------------------------------------------

BACKEND_HELP = "eager | compile | onnx | tensorrt | auto (onnx on CPU, tensorrt on CUDA when installed, else eager)"
MODE_HELP = "recorded (lossless, backpressure) | live (latest frame wins, drops counted); default by source kind"


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        fail(f"--device {device!r}: choose cpu, cuda or auto")
    return device


def build_backend(seg, backend: str, device: str, threads: Optional[int] = None):
    """Backend by name, with `auto` resolved and errors as one line."""
    import importlib.util

    from .backends import BackendError, make_backend

    if backend == "auto":
        if device == "cuda":
            backend = "tensorrt" if importlib.util.find_spec("torch_tensorrt") else "eager"
        else:
            backend = "onnx" if importlib.util.find_spec("onnxruntime") else "eager"
    try:
        return make_backend(backend, seg, device, threads=threads)
    except BackendError as exc:
        fail(str(exc))


def open_input(spec: Optional[str], realtime: Optional[bool] = None, fps: Optional[float] = None, seed: int = 0):
    from .sources import SourceError, open_source

    try:
        return open_source(spec, realtime=realtime, fps=fps, seed=seed)
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


def smoothing_config(smooth: bool, threshold: float):
    from .smoothing import SmoothingConfig

    return SmoothingConfig(high=threshold, low=max(threshold - 0.15, 0.0)) if smooth else None


def stats_line(stats) -> str:
    d = stats.as_dict()
    lat = d["latency_ms"]
    return (f"frames {d['frames_out']}/{d['frames']}  e2e {d['e2e_fps']:.1f} fps  model {d['model_fps']:.1f} fps  "
            f"decode {d['decode_fps']:.1f} fps  latency p50 {lat['p50']:.0f} / p99 {lat['p99']:.0f} ms  "
            f"dropped {d['dropped']}  publish dropped {d['publish_dropped']}")


def run_pipeline(pipeline, on_progress=None):
    """Run to the end; a source that fails mid-stream is reported as one line."""
    from .sources import SourceError

    try:
        return pipeline.run(on_progress=on_progress, progress_every=0.25)
    except SourceError as exc:
        fail(str(exc))


@app.command()
def run(
    source: Optional[str] = typer.Argument(None, help="file, folder, URL, device (v4l2:/dev/video0), pseudo:FOLDER or demo (default)"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    publish: str = typer.Option("tcp://127.0.0.1:5556", help="ZeroMQ endpoint to bind; '' to not publish"),
    encoding: str = typer.Option("png", help="mask payload: raw | png | rle"),
    publish_overlay: bool = typer.Option(False, help="also publish JPEG overlays on the 'overlay' topic"),
    wait_subscribers: int = typer.Option(0, help="wait for this many subscribers before the first frame"),
    overlay: Optional[Path] = typer.Option(None, help="write an overlay video here (.mp4)"),
    masks: Optional[Path] = typer.Option(None, help="write one mask PNG per frame into this folder"),
    jsonl: Optional[Path] = typer.Option(None, help="write one JSON line per frame here"),
    mode: Optional[str] = typer.Option(None, help=MODE_HELP),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    batch: Optional[int] = typer.Option(None, help="frames per inference batch (default: 4 recorded, 1 live)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for inference (default: all cores)"),
    smooth: bool = typer.Option(True, help="temporal smoothing (EMA, hysteresis, minimum area)"),
    max_frames: Optional[int] = typer.Option(None, help="stop after this many source frames"),
    fps: Optional[float] = typer.Option(None, help="frame rate of demo / folder / pseudo sources"),
    quiet: bool = typer.Option(False, help="no live status line"),
):
    """Segment a live or recorded video stream; publish masks over ZeroMQ and/or write files."""
    from rich.console import Console
    from rich.live import Live

    from .pipeline import Pipeline
    from .publish import Publisher
    from .sinks import JsonlSink, MaskFolderSink, OverlayVideoSink

    console = Console(stderr=True)
    mode_ = check_mode(mode)
    seg = load_model(model)
    dev = pick_device(device)
    engine = build_backend(seg, backend, dev, threads)
    src = open_input(source)
    sinks = []
    if publish:
        try:
            sinks.append(Publisher(publish, encoding=encoding, overlay=publish_overlay))
        except ValueError as exc:
            fail(str(exc))
        if wait_subscribers and not sinks[-1].wait_for_subscribers(wait_subscribers, timeout=60):
            fail(f"--wait-subscribers {wait_subscribers}: not enough subscribers on {publish} within 60 s")
    if overlay:
        sinks.append(OverlayVideoSink(overlay, fps=src.fps or 30.0))
    if masks:
        sinks.append(MaskFolderSink(masks))
    if jsonl:
        sinks.append(JsonlSink(jsonl))
    pipeline = Pipeline(src, engine, sinks, mode=mode_, smoothing=smoothing_config(smooth, seg.config.threshold),
                        batch_size=batch, max_frames=max_frames)
    console.print(pipeline.describe())
    if quiet:
        stats = run_pipeline(pipeline)
    else:
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            stats = run_pipeline(pipeline, lambda st: live.update(stats_line(st)))
    console.print(stats_line(stats) + ("  (interrupted)" if stats.interrupted else ""))


@app.command()
def batch(
    inputs: List[Path] = typer.Argument(..., help="recorded procedures: video files or image folders"),
    out: Path = typer.Option(..., help="one output folder per input is created here"),
    model: Optional[Path] = typer.Option(None, help=MODEL_HELP),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    overlay: bool = typer.Option(True, help="write overlay.mp4 per input"),
    smooth: bool = typer.Option(True, help="temporal smoothing (EMA, hysteresis, minimum area)"),
):
    """Process recorded procedures losslessly, one output folder per input; resumable.

    Writes <out>/<name>/ with overlay.mp4, masks/, frames.jsonl and summary.json. Finished inputs
    (marked .done) are skipped on a rerun; a folder appears under its final name only when complete.
    """
    import json
    import shutil

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .frames import Mode
    from .pipeline import Pipeline
    from .sinks import JsonlSink, MaskFolderSink, OverlayVideoSink

    for path in inputs:
        if not path.exists():
            fail(f"input {path} does not exist")
    names = [p.stem if p.is_file() else p.name for p in inputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        fail(f"two inputs would write to the same folder {out / dup}; rename one")
    seg = load_model(model)
    engine = build_backend(seg, backend, pick_device(device))
    out.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[status]}")) as progress:
        for path, name in zip(inputs, names):
            final, work = out / name, out / f".{name}.partial"
            if (final / ".done").is_file():
                progress.add_task(name, total=1, completed=1, status="done earlier, skipped")
                continue
            src = open_input(str(path))
            task = progress.add_task(name, total=len(src) or None, status="")
            shutil.rmtree(work, ignore_errors=True)
            sinks = [MaskFolderSink(work / "masks"), JsonlSink(work / "frames.jsonl")]
            if overlay:
                sinks.append(OverlayVideoSink(work / "overlay.mp4", fps=src.fps or 30.0))
            pipeline = Pipeline(src, engine, sinks, mode=Mode.RECORDED,
                                smoothing=smoothing_config(smooth, seg.config.threshold))
            stats = run_pipeline(pipeline, lambda st: progress.update(task, completed=st.frames_out))
            if stats.interrupted:
                progress.update(task, status="interrupted")
                raise typer.Exit(130)
            (work / "summary.json").write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
            (work / ".done").write_text("")
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
            progress.update(task, total=stats.frames_out, completed=stats.frames_out,
                            status=f"{stats.as_dict()['e2e_fps']:.1f} fps -> {final}")


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
    compare_steps: int = typer.Option(0, help="also time T-step DDIM on the same frames (e.g. 50)"),
    compare_frames: int = typer.Option(3, help="frames for the T-step comparison"),
    smoothing: bool = typer.Option(False, help="also report Dice and flicker with and without smoothing (needs true masks)"),
    json_out: bool = typer.Option(False, "--json", help="print only one JSON object"),
):
    """Measure the pipeline honestly: warm up, then time decode, model and end to end."""
    import json

    from .benchmark import run_benchmark

    seg = load_model(model)
    dev = pick_device(device)
    engine = build_backend(seg, backend, dev, threads)
    if frames < 1:
        fail("--frames must be >= 1")
    try:
        report = run_benchmark(seg, engine, lambda: open_input(source, realtime=False), frames=frames, mode=check_mode(mode), batch_size=batch,
                               compare_steps=compare_steps, compare_frames=compare_frames,
                               smoothing=smoothing_config(True, seg.config.threshold) if smoothing else None)
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
):
    """Show what a publisher sends: its overlays (or, if it sends none, the masks' outlines)."""
    from .viewer import ViewerError, view_stream

    try:
        n = view_stream(endpoint, out=out, max_frames=max_frames, timeout=timeout)
    except ViewerError as exc:
        fail(str(exc))
    typer.echo(f"{n} frames" + (f" -> {out}" if out else ""))


if __name__ == "__main__":
    app()
