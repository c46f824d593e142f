"""Does OpenVINO's bf16 path pass mask parity if the end of the graph stays fp32? (issue 25)

    python tools/bf16_tail.py                    # the shipped checkpoint, its validation images, ~2 minutes

Compiles the checkpoint's ONNX export three times with `INFERENCE_PRECISION_HINT` bf16: as it is,
with every node downstream of the mask decoder's first convolution kept fp32, and with every node
downstream of the U-Net's last convolution kept fp32 (OpenVINO keeps a node marked with the
`disable_fp16_compression` runtime attribute in its original precision under bf16 too). For each:
Then, since that marking does not survive OpenVINO 2026.4's compilation (the runtime model still
runs every convolution in bf16), the model split in two ONNX files instead: the front
(`single_step`: encoder and U-Net, image -> z_c, z0) and the tail (`_gated`: mask decoder and
presence head -> probability), each compiled at its own precision, every combination scored.
Both parts: per-frame Dice of the thresholded masks against OpenVINO fp32 on the checkpoint's validation
images (split.json `val`), how many frames fall below 0.99, how many convolutions the compiled
model runs in bf16 (its runtime model: whether the marking took effect), and model frames a second
on --threads threads (batch 4, one infer request, one window per row: a rough figure, not the
alternating rounds of tools/speed_paths.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_paths import DATA, validation_images  # noqa: E402

from syndiff_stream.backends import export_onnx, onnx_cache_path  # noqa: E402
from syndiff_stream.datasets import read_image  # noqa: E402
from syndiff_stream.metrics import dice  # noqa: E402
from syndiff_stream.model import Segmenter, default_checkpoint_path  # noqa: E402
from syndiff_stream.preprocess import prepare  # noqa: E402

# name -> the constant whose consumers start the fp32 part (None: all bf16)
TAILS = {"bf16": None, "bf16, mask decoder fp32": "seg.mask_vae.decoder.conv_in.weight",
         "bf16, after the U-Net fp32": "seg.unet.conv_out.weight"}


def downstream(model, start: str) -> set[str]:
    """Friendly names of `start` and every node fed by it, directly or not (ops are in topological order)."""
    marked = {start}
    for op in model.get_ordered_ops():
        if any(i.get_source_output().get_node().get_friendly_name() in marked for i in op.inputs()):
            marked.add(op.get_friendly_name())
    return marked - {start}


class Front(torch.nn.Module):
    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, image):
        return self.seg.single_step(image)


class Tail(torch.nn.Module):
    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, z_c, z0):
        return self.seg._gated(z_c, z0)


def split_rows(seg, x: np.ndarray, ref: np.ndarray, core, threads: int, folder: Path) -> dict:
    """Front and tail as two models, each at f32 or bf16: which part's bf16 moves the masks."""
    image = torch.zeros(4, 3, seg.config.image_size, seg.config.image_size)
    with torch.no_grad():
        z_c, z0 = seg.single_step(image)
        torch.onnx.export(Front(seg), (image,), str(folder / "front.onnx"), input_names=["image"],
                          output_names=["z_c", "z0"], dynamic_axes={"image": {0: "b"}}, dynamo=False, opset_version=17)
        torch.onnx.export(Tail(seg), (z_c, z0), str(folder / "tail.onnx"), input_names=["z_c", "z0"],
                          output_names=["prob"], dynamic_axes={"z_c": {0: "b"}, "z0": {0: "b"}}, dynamo=False,
                          opset_version=17)
    compiled = {(part, prec): core.compile_model(core.read_model(str(folder / f"{part}.onnx")), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": prec})
        for part in ("front", "tail") for prec in ("f32", "bf16")}
    out = {}
    for front, tail in (("f32", "f32"), ("bf16", "f32"), ("f32", "bf16"), ("bf16", "bf16")):
        f, t = compiled["front", front], compiled["tail", tail]
        probs = []
        for i in range(0, len(x), 4):
            r = f({"image": x[i:i + 4]})
            # by position: a model without a presence head never reads z_c, and its export keeps z0 alone
            feed = [r[f.output("z_c")], r[f.output("z0")]][-len(t.inputs):]
            probs.append(t(feed)[t.output(0)])
        scores = np.array([dice(a[0], b[0]) for a, b in zip(np.concatenate(probs) >= seg.config.threshold, ref)])
        out[f"front {front}, tail {tail}"] = {"dice_min": round(float(scores.min()), 4),
                                              "dice_mean": round(float(scores.mean()), 4),
                                              "frames_below_0.99": int((scores < 0.99).sum())}
    return out


def main(argv=None) -> int:
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per row")
    parser.add_argument("--data", action="append", default=[f"{n}={DATA / d}" for n, d in (
        ("kvasir", "kvasir-seg-train"), ("clinicdb", "cvc-clinicdb-train"), ("neopolyp", "neopolyp-train"))])
    args = parser.parse_args(argv)
    seg = Segmenter.from_pretrained(args.model).eval()
    cfg = seg.config
    roots = {k: Path(v) for k, v in (d.split("=", 1) for d in args.data)}
    val = validation_images((args.model or default_checkpoint_path()) / "split.json", roots, None)
    x = np.stack([prepare(read_image(p), cfg.image_size)[0] for p in val]).astype(np.float32)
    path = onnx_cache_path(seg, "fused")
    if not path.is_file():
        export_onnx(seg, path, graph="fused")
    core = ov.Core()

    def build(precision: str, start: str | None):
        model = core.read_model(str(path))
        names = downstream(model, start) if start else set()
        for op in model.get_ordered_ops():
            if op.get_friendly_name() in names:
                op.get_rt_info()["disable_fp16_compression_0"] = ""
        return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_PRECISION_HINT": precision}), len(names)

    def masks(compiled) -> np.ndarray:
        request = compiled.create_infer_request()
        out = [np.array(request.infer({0: x[i:i + 4]})[compiled.output(0)], copy=True) for i in range(0, len(x), 4)]
        return np.concatenate(out) >= cfg.threshold

    def bf16_convolutions(compiled) -> int:
        return sum(1 for op in compiled.get_runtime_model().get_ordered_ops()
                   if op.get_rt_info()["layerType"].astype(str) == "Convolution"
                   and op.get_rt_info()["runtimePrecision"].astype(str) == "bf16")

    def fps(compiled) -> float:
        request, n = compiled.create_infer_request(), 0
        request.infer({0: x[:4]})
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            request.infer({0: x[:4]})
            n += 4
        return n / (time.perf_counter() - start)

    reference, _ = build("f32", None)
    ref = masks(reference)
    rows = {"f32": {"fp32_nodes": "all", "fps": round(fps(reference), 1)}}
    for name, start in TAILS.items():
        compiled, kept = build("bf16", start)
        scores = np.array([dice(a[0], b[0]) for a, b in zip(masks(compiled), ref)])
        rows[name] = {"fp32_nodes": kept, "dice_min": round(float(scores.min()), 4),
                      "dice_mean": round(float(scores.mean()), 4), "frames_below_0.99": int((scores < 0.99).sum()),
                      "bf16_convolutions": bf16_convolutions(compiled), "fps": round(fps(compiled), 1)}
    split = split_rows(seg, x, ref, core, args.threads, Path(path).parent)
    print(json.dumps({"validation_images": len(val), "threads": args.threads, "rows": rows, "split": split}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
