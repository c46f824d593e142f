"""How fast this architecture could run on this CPU if its normalisation folded into the
convolutions (issue 25). The shipped checkpoint, and its export before the time-embedding fold,
against copies with every GroupNorm replaced by an identity (what a norm folded into the next
convolution costs at inference, as BatchNorm or weight standardisation would), the same weights with
BatchNorm (the graph a `norm = "batch"` checkpoint exports), with ORT's QuickGelu
fusion off (SiLU then stays Sigmoid + Mul, which the NCHWc layout keeps blocked) and with SiLU
replaced by ReLU (which ORT's NCHWc convolutions fuse).

The copies compute something else: their weights are the checkpoint's, their output is not a
model's. What they measure is speed only, to decide whether retraining with another norm is worth
it before doing so. Speed is taken as `tools/speed_paths.py` takes it (`benchmark.throughput`: one
single-threaded ORT call per core, a batch of --batch frames), the variants taking turns for --rounds
rounds; the share is against the machine's ceiling (`machine.matmul_probes` before and after: the
best of torch's and ONNX Runtime's GEMMs; the shipped model's FLOPs). The ORT-optimised graph of
each is counted by operator (reorders, norms).

    python tools/norm_headroom.py --out norm-headroom          # a quiet machine, about 3 minutes
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from syndiff_stream.atomic import write_text
from syndiff_stream.backends import (OnnxBackend, OrtOptions, drop_unit_reductions, export_onnx, fold_stem,
                                     ort_graph_ops)
from syndiff_stream.benchmark import throughput
from syndiff_stream.machine import cpu_facts, matmul_probes, model_flops
from syndiff_stream.model import Segmenter, batch_norms, default_checkpoint_path, replace_modules

UNFUSED_SILU = ("QuickGeluFusion",)


def replaced(seg: Segmenter, kind, make) -> Segmenter:
    """A copy with every `kind` module (a type or a tuple of types) replaced by `make()`."""
    seg = copy.deepcopy(seg)
    replace_modules(seg, kind, lambda _: make())
    return seg


def variants(seg: Segmenter) -> dict[str, tuple[Segmenter, str, tuple[str, ...]]]:
    """name -> (model, export graph, ORT optimisers disabled). The first row is the export before
    the time-embedding fold (`backends.fold_time_embedding`): the stem folded, the embedding per frame."""
    norm = "BatchNorm" if seg.config.norm == "batch" else "GroupNorm"
    no_norm = replaced(seg, (torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm), torch.nn.Identity)
    rows = {"shipped, time embedding per frame": (fold_stem(seg), "plain", ()),
            f"shipped ({norm} + SiLU)": (seg, "fused", ()),
            "norms removed, SiLU": (no_norm, "fused", ()),
            "norms removed, SiLU unfused": (no_norm, "fused", UNFUSED_SILU),
            "norms removed, ReLU": (replaced(no_norm, torch.nn.SiLU, torch.nn.ReLU), "fused", ()),
            f"{norm} + ReLU (SiLU -> ReLU, retrained)": (replaced(seg, torch.nn.SiLU, torch.nn.ReLU), "fused", ())}
    if seg.config.norm != "batch":
        rows["BatchNorm (norm = batch)"] = (with_batch_norm(seg), "fused", ())
    return rows


def with_batch_norm(seg: Segmenter) -> Segmenter:
    """The same weights in the `norm = "batch"` architecture, its running statistics drawn away from
    their (0, 1) start so that no optimiser may drop a norm as an identity: the graph a checkpoint
    trained with BatchNorm exports, where some norms fold into the convolution before them and the
    rest (those on a residual sum) stay a per-channel scale and shift."""
    bn = Segmenter(seg.config.model_copy(update={"norm": "batch"}))
    bn.load_state_dict(seg.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in batch_norms(bn):
            norm.running_mean.copy_(torch.rand(norm.num_features, generator=gen) * 0.2 - 0.1)
            norm.running_var.copy_(torch.rand(norm.num_features, generator=gen) * 1.5 + 0.5)
    return bn.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--out", type=Path, required=True, help="folder for norm-headroom.json and .md")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per variant per round")
    args = parser.parse_args(argv)

    seg = Segmenter.from_pretrained(args.model).eval()
    threads = args.threads or max(1, os.cpu_count() or 1)
    torch.manual_seed(0)
    size = seg.config.image_size
    x = torch.rand(args.batch, 3, size, size) * 2 - 1
    backends, ops = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (model, graph, disabled)) in enumerate(variants(seg).items()):
            path = export_onnx(model, Path(tmp) / f"v{i}.onnx", graph=graph)
            if graph == "plain":
                drop_unit_reductions(path)
            backends[name] = OnnxBackend(model, onnx_path=path, threads=threads,
                                         options=OrtOptions(disabled_optimizers=disabled))
            backends[name].configure(backends[name].max_workers)
            ops[name] = dict(ort_graph_ops(path, OrtOptions(disabled_optimizers=disabled)).most_common())
        probes = [matmul_probes(threads)]
        fps = {name: [] for name in backends}
        for _ in range(args.rounds):
            for name, backend in backends.items():
                fps[name].append(throughput(backend, x, seconds=args.seconds))
        probes.append(matmul_probes(threads))
    flop = model_flops(seg) / 1e9
    gflops = [max(p.values()) for p in probes]
    best = max(probes, key=lambda p: max(p.values()))
    library = max(best, key=best.get)
    ceiling = max(gflops) / flop
    facts = cpu_facts()
    rows = {name: {"fps": round(float(np.median(v)), 1), "range": [round(min(v), 1), round(max(v), 1)],
                   "share": round(float(np.median(v)) / ceiling, 2),
                   "reorders": ops[name].get("ReorderInput", 0) + ops[name].get("ReorderOutput", 0),
                   "norm_ops": ops[name].get("InstanceNormalization", 0) + ops[name].get("BatchNormalization", 0),
                   "silu_ops": ops[name].get("QuickGelu", 0) + ops[name].get("Sigmoid", 0), "ops": ops[name]}
            for name, v in fps.items()}
    report = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "cpu": facts, "threads": threads,
              "batch": args.batch, "rounds": args.rounds, "matmul_gflops": [round(g, 1) for g in gflops],
              "matmul_probes": [{k: round(v, 1) for k, v in p.items()} for p in probes],
              "model_gflop_per_frame": round(flop, 4), "ceiling_fps": round(ceiling, 1),
              "load_average": os.getloadavg()[0], "variants": rows}
    head = (f"{report['date']}, {facts.get('model')}, {threads} threads, batch {args.batch}, ceiling "
            f"{ceiling:.1f} fps ({max(gflops):.1f} GFLOP/s, {library}'s GEMM / {flop:.4f} GFLOP a frame), median of {args.rounds} "
            f"alternating rounds")
    lines = [head, "", "| variant | model fps | share of ceiling | reorders | norm ops | SiLU ops |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['fps']} ({r['range'][0]:.0f}-{r['range'][1]:.0f}) | {r['share']:.2f} | {r['reorders']} | "
              f"{r['norm_ops']} | {r['silu_ops']} |" for n, r in rows.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "norm-headroom.json", json.dumps(report, indent=1) + "\n")
    write_text(args.out / "norm-headroom.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
