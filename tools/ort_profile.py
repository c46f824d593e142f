"""Where the `onnx` CPU path spends its time: ONNX Runtime's own profiler, kernel time per operator
type (issue 25; docs/runtime.md). Shows what caps the model's share of the CPU's ceiling: the
convolutions run near the matmul probe's speed, the operators around them do not.

    python tools/ort_profile.py                      # the default checkpoint, one thread, batch 4
    python tools/ort_profile.py --model DIR --threads 2 --runs 30 --json profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from syndiff_stream.backends import OnnxBackend
from syndiff_stream.model import Segmenter


def profile(seg: Segmenter, threads: int = 1, batch: int = 4, runs: int = 15) -> dict:
    """Kernel time per operator type of `runs` calls of the onnx path's session (the same file and
    graph optimisations), as shares of the total."""
    import onnxruntime as ort

    path = OnnxBackend(seg, "cpu", threads=threads).path
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, seg.config.image_size, seg.config.image_size))
        for _ in range(runs):
            session.run(None, {name: x.astype(np.float32)})
        events = json.loads(Path(session.end_profiling()).read_text())
    time_us, nodes = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time_us[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    total = sum(time_us.values()) or 1
    return {"threads": threads, "batch": batch, "runs": runs, "ms_per_call": total / runs / 1000,
            "ops": [{"op": op, "share": t / total, "nodes": nodes[op] // runs} for op, t in time_us.most_common()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the shipped one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    report = profile(Segmenter.from_pretrained(args.model).eval(), args.threads, args.batch, args.runs)
    print(f"{report['ms_per_call']:.1f} ms of kernel time a call ({args.batch} frames, {args.threads} thread(s))")
    for row in report["ops"][:15]:
        print(f"{row['op']:28s} {100 * row['share']:5.1f} %  {row['nodes']} nodes")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
