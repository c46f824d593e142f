"""A small Holoscan application: syndiff-stream source -> SyndiffSegOp -> overlay video writer.

    python plugins/holoscan/segmentation_app.py demo --frames 60 --out overlay.mp4 [--model DIR] [--profile P]

The source is any `syndiff-stream run` source (file, folder, demo, pseudo:FOLDER). Runs on the
CPU; on a GPU machine pass --device cuda.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from syndiff_holoscan import SyndiffSegOp  # noqa: E402  (preloads the CUDA runtime before holoscan)

from holoscan.conditions import CountCondition  # noqa: E402
from holoscan.core import Application, Operator, OperatorSpec  # noqa: E402


class FrameSourceOp(Operator):
    """Emits {"frame": RGB uint8 (H, W, 3)} per frame of an iterable of syndiff_stream Frames."""

    def __init__(self, fragment, *args, frames=(), **kwargs):
        self.frames = iter(frames)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("frame")

    def compute(self, op_input, op_output, context):
        frame = next(self.frames, None)
        if frame is not None:  # the CountCondition stops the graph at the source's length
            op_output.emit({"frame": frame.image}, "frame")


class OverlayWriterOp(Operator):
    """Writes overlays to a video and counts frames with a polyp."""

    def __init__(self, fragment, *args, out: Path, fps: float = 30.0, **kwargs):
        self.out, self.fps, self.writer, self.frames, self.with_polyp = Path(out), fps, None, 0, 0
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("mask")
        spec.input("overlay")

    def compute(self, op_input, op_output, context):
        import numpy as np

        from syndiff_stream.sinks import VideoWriter

        mask = np.asarray(op_input.receive("mask")["mask"])
        overlay = np.asarray(op_input.receive("overlay")["overlay"])
        if self.writer is None:
            self.writer = VideoWriter(self.out, self.fps)
        self.writer.write_image(overlay)
        self.frames += 1
        self.with_polyp += bool(mask.any())

    def stop(self):
        if self.writer is not None:
            self.writer.close()


class SegmentationApp(Application):
    def __init__(self, frames, count: int, out: Path, fps: float = 30.0, **seg_kwargs):
        self.frames, self.count, self.out, self.fps, self.seg_kwargs = frames, count, out, fps, seg_kwargs
        super().__init__()

    def compose(self):
        source = FrameSourceOp(self, CountCondition(self, self.count), frames=self.frames, name="source")
        segment = SyndiffSegOp(self, name="syndiff", **self.seg_kwargs)
        self.writer = OverlayWriterOp(self, out=self.out, fps=self.fps, name="writer")
        self.add_flow(source, segment, {("frame", "frame")})
        self.add_flow(segment, self.writer, {("mask", "mask"), ("overlay", "overlay")})


def main(argv=None) -> int:
    from syndiff_stream.sources import open_source

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="demo")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path("overlay.mp4"))
    p.add_argument("--model", default=None)
    p.add_argument("--profile", default=None)
    p.add_argument("--engine", default=None)
    p.add_argument("--backend", default="eager")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    source = open_source(args.source, realtime=False)
    app = SegmentationApp(iter(source), args.frames, args.out, source.fps or 30.0, model=args.model,
                          profile=args.profile, engine=args.engine, backend=args.backend, device=args.device)
    app.run()
    source.close()
    print(f"{app.writer.frames} frames, {app.writer.with_polyp} with a polyp -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
