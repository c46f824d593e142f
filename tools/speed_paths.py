"""Every CPU path side by side on this machine: speed as a share of its ceiling, parity with fp32,
alarms on polyp-free frames (issue 25; the paths are syndiff_stream/cpu_paths.py).

    python tools/speed_paths.py --out speed-paths --record            # a quiet machine: the table, ~25 min
    python tools/speed_paths.py --frames 8 --rounds 1 --val-limit 4 --free-limit 4 --paths onnx,eager   # seconds

speed     model frames/s of each path run as the pipeline runs it (`benchmark.throughput`: on CPU one
          single-threaded ONNX Runtime call per core, batches of --batch validation frames), the paths
          taking turns for --rounds rounds (A B C A B C ...: load that comes and goes hits all alike), the
          median per path and its range; the share of the ceiling (machine.py: the model's FLOPs per frame
          against the best dense fp32 GEMM probe, torch's or ONNX Runtime's, on the same threads, before and
          after the rounds)
parity    per-frame Dice of each path's mask against eager fp32 (model resolution, the checkpoint's
          threshold) on the validation images of the checkpoint's split (split.json `val`, found under
          --data NAME=DIR), min and mean; passes at min >= 0.99
alarms    polyp-free frames (--polyp-free) where a component survives the checkpoint's threshold and
          min_area (the stage chain with smoothing and gating off), and how many of them eager fp32 did
          not raise (`extra`); passes at 0 extra
Writes speed-paths.json and speed-paths.md (the table for docs/runtime.md) into --out and prints the
table. --record keeps each path's parity in the cache and makes the fastest passing path (compile
excluded: it builds for minutes at start-up) the cached choice of `--backend auto` on this machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from syndiff_stream.atomic import write_text
from syndiff_stream.backends import BackendError, cache_dir, make_backend, model_hash
from syndiff_stream.benchmark import throughput
from syndiff_stream.cpu_paths import PATHS, Choice, build_path, cache_key, choice_file, pick, record_parity, unavailable
from syndiff_stream.datasets import read_image
from syndiff_stream.frames import Frame
from syndiff_stream.machine import cpu_facts, matmul_probes, model_flops
from syndiff_stream.metrics import dice
from syndiff_stream.model import Segmenter, default_checkpoint_path
from syndiff_stream.preprocess import prepare
from syndiff_stream.smoothing import SmoothingConfig
from syndiff_stream.stages import Stages

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PARITY_MIN = 0.99
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def evenly(items: list, limit: int | None) -> list:
    if not limit or len(items) <= limit:
        return items
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else items[:1]


def images_in(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def validation_images(split: Path, data: dict[str, Path], limit: int | None) -> list[Path]:
    """The split's `val` entries (`name/stem`) found under the named data folders' images/."""
    entries = json.loads(split.read_text()).get("val", [])
    found = {name: images_in(root / "images") for name, root in data.items() if (root / "images").is_dir()}
    paths = [found[name][stem] for name, stem in (e.split("/", 1) for e in entries)
             if name in found and stem in found[name]]
    if not paths:
        raise SystemExit(f"error: none of {split}'s {len(entries)} validation images found under "
                         f"{', '.join(f'{k}={v}' for k, v in data.items())}")
    return evenly(paths, limit)


def training_frames(split: Path, data: dict[str, Path], folder: Path, limit: int = 64) -> Path:
    """A folder of links to `limit` of the split's training images (evenly spaced): the int8 paths
    calibrate on frames the model trained on, never on the validation images parity is scored on.
    Kept (in the cache) so that `--backend auto` can rebuild an int8 path that passed."""
    entries = json.loads(split.read_text()).get("train", [])
    found = {name: images_in(root / "images") for name, root in data.items() if (root / "images").is_dir()}
    paths = evenly([found[n][s] for n, s in (e.split("/", 1) for e in entries) if n in found and s in found[n]], limit)
    if not paths:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        link = folder / f"{p.parent.parent.name}-{p.name}"
        if not link.exists():
            link.symlink_to(p.resolve())
    return folder


def masks(backend, x: torch.Tensor, threshold: float, batch: int) -> np.ndarray:
    return np.concatenate([backend.infer_numpy(x[i:i + batch]) for i in range(0, len(x), batch)]) >= threshold


def alarm_frames(backend, images: list[np.ndarray]) -> set[int]:
    """Indices of frames with a component over the checkpoint's threshold and min_area."""
    cfg = backend.seg.config
    stages = Stages(backend, smoothing=SmoothingConfig.off(cfg.threshold, cfg.min_area))
    try:
        return {i for i, image in enumerate(images) if stages(Frame(image, "polyp-free", i, None)).polyps}
    finally:
        stages.close()


def measure(args) -> dict:
    seg = Segmenter.from_pretrained(args.model).eval()
    cfg, threads = seg.config, args.threads or max(1, os.cpu_count() or 1)
    facts = cpu_facts()
    split = args.split or (args.model or default_checkpoint_path()) / "split.json"
    data = dict(spec.split("=", 1) for spec in args.data)
    roots = {k: Path(v) for k, v in data.items()}
    val = [read_image(p) for p in validation_images(split, roots, args.val_limit)]
    if args.calibration is None:
        args.calibration = training_frames(split, roots, cache_dir() / "paths" / f"calibration-{model_hash(seg)}",
                                           args.calibration_frames)
    free = [read_image(p) for p in evenly(list(images_in(args.polyp_free).values()), args.free_limit)]
    x = torch.from_numpy(np.stack([prepare(im, cfg.image_size)[0] for im in val]))
    timing = x[:args.batch] if len(x) >= args.batch else x.repeat(math.ceil(args.batch / len(x)), 1, 1, 1)[:args.batch]

    reference = make_backend("eager", seg, "cpu", threads=threads)
    ref_masks = masks(reference, x, cfg.threshold, args.batch)
    ref_alarms = alarm_frames(reference, free)

    names = args.paths.split(",") if args.paths else list(PATHS)
    rows, skipped, backends = {}, {}, {}
    for name in names:
        if name not in PATHS:
            raise SystemExit(f"error: unknown path {name!r}: choose from {', '.join(PATHS)}")
        why = unavailable(PATHS[name], facts, args.calibration)
        if why:
            skipped[name] = why
            continue
        try:
            started = time.perf_counter()
            backend = build_path(name, seg, "cpu", threads, calibration=args.calibration)
            backend.configure(1 if args.one_call else backend.max_workers)
            build_s = time.perf_counter() - started
            got = masks(backend, x, cfg.threshold, args.batch)
            per_frame = [dice(a, b) for a, b in zip(got, ref_masks)]
            alarms = alarm_frames(backend, free)
        except BackendError as exc:
            skipped[name] = str(exc)
            continue
        backends[name] = backend
        rows[name] = {"path": name, "what": PATHS[name].what, "precision": PATHS[name].precision,
                      "exact": PATHS[name].exact, "workers": backend.workers, "build_s": round(build_s, 1),
                      "parity_min": round(min(per_frame), 4), "parity_mean": round(float(np.mean(per_frame)), 4),
                      "alarms": len(alarms), "extra_alarms": len(alarms - ref_alarms), "fps_rounds": []}
        rows[name]["ok"] = rows[name]["parity_min"] >= PARITY_MIN and rows[name]["extra_alarms"] == 0

    flops = model_flops(seg)
    probes = [matmul_probes(threads)]
    calls = max(1, math.ceil(args.frames / len(timing)))
    for _ in range(args.rounds):
        for name, backend in backends.items():
            fps = throughput(backend, timing, seconds=0.0, min_calls=max(1, calls // max(1, backend.workers)))
            rows[name]["fps_rounds"].append(round(fps, 2))
    probes.append(matmul_probes(threads))
    gflops = [max(p.values()) for p in probes]
    ceiling_fps = max(gflops) * 1e9 / flops
    for row in rows.values():
        fps = row["fps_rounds"]
        row["model_fps"] = round(float(np.median(fps)), 2)
        row["fps_range"] = [min(fps), max(fps)]
        row["share"] = round(row["model_fps"] / ceiling_fps, 3)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": facts, "threads": threads,
            "model": str(args.model or default_checkpoint_path()), "model_hash": model_hash(seg),
            "model_gflop_per_frame": round(flops / 1e9, 4), "matmul_gflops": [round(g, 1) for g in gflops],
            "matmul_probes": [{k: round(v, 1) for k, v in p.items()} for p in probes],
            "ceiling_fps": round(ceiling_fps, 1), "batch": len(timing), "one_call": args.one_call,
            "frames_per_round": calls * len(timing), "rounds": args.rounds,
            "parity": {"reference": "eager fp32", "validation_images": len(val), "split": str(split),
                       "data": data, "polyp_free": str(args.polyp_free), "polyp_free_frames": len(free),
                       "reference_alarms": len(ref_alarms), "min_dice": PARITY_MIN},
            "calibration": str(args.calibration) if args.calibration else None, "load_average": os.getloadavg(),
            "rows": sorted(rows.values(), key=lambda r: -r["model_fps"]), "skipped": skipped}


def table(report: dict) -> str:
    cpu = report["cpu"]
    machine = f"{cpu['model']} ({' '.join(cpu['vector_extensions'])})"
    lines = [f"{report['date'][:10]}, {report['threads']} threads, batch {report['batch']}, ceiling "
             f"{report['ceiling_fps']} fps ({max(report['matmul_gflops'])} GFLOP/s / "
             f"{report['model_gflop_per_frame']} GFLOP a frame), median of {report['rounds']} alternating rounds; "
             f"parity against eager fp32 on {report['parity']['validation_images']} validation images, alarms on "
             f"{report['parity']['polyp_free_frames']} polyp-free frames (eager fp32: "
             f"{report['parity']['reference_alarms']}); load average {report['load_average'][0]:.2f}", "",
             "| path | model fps | share of ceiling | parity min / mean Dice | polyp-free alarms (extra) | CPU |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        flag = "" if r["ok"] else " (fails parity)"
        lines.append(f"| `{r['path']}`{flag} | {r['model_fps']:.1f} ({r['fps_range'][0]:.0f}-{r['fps_range'][1]:.0f}) "
                     f"| {r['share']:.2f} | {r['parity_min']:.4f} / {r['parity_mean']:.4f} | {r['alarms']} "
                     f"({r['extra_alarms']}) | {machine} |")
    lines += [f"| `{name}` | not run: {why.split(': ', 1)[-1]} | | | | {machine} |" for name, why in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def record(report: dict) -> str | None:
    """Parity per path into the cache; the fastest passing path (not compile) as `auto`'s choice,
    by `cpu_paths.pick`'s rule: the default unless another beats it by more than the margin (a
    median of a few rounds is noisy too: 82 against 84 fps is not a reason to change numerics)."""
    record_parity(report["model_hash"], {r["path"]: {"ok": r["ok"], "parity_min": r["parity_min"],
                                                     "extra_alarms": r["extra_alarms"], "calibration": report["calibration"]}
                                         for r in report["rows"]}, report["cpu"])
    passing = [r for r in report["rows"] if r["ok"] and PATHS[r["path"]].kind != "compile"]
    if not passing:
        return None
    best = next(r for r in passing if r["path"] == pick({r["path"]: r["model_fps"] for r in passing}))
    key = cache_key(report["cpu"], report["model_hash"], report["threads"])
    choice = Choice(path=best["path"], source="speed_paths", fps={r["path"]: r["model_fps"] for r in passing},
                    skipped={}, cpu=report["cpu"]["model"], vector_extensions=report["cpu"]["vector_extensions"],
                    threads=report["threads"], model_hash=report["model_hash"], key=key)
    write_text(choice_file(key), choice.model_dump_json(indent=1) + "\n")
    return best["path"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the shipped one)")
    ap.add_argument("--paths", default="", help="comma-separated CPU paths (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    ap.add_argument("--one-call", action="store_true", help="one call at a time with every thread (as predict and "
                    "the plugins run), instead of the pipeline's call per core")
    ap.add_argument("--batch", type=int, default=4, help="frames per call (the recorded pipeline's default)")
    ap.add_argument("--frames", type=int, default=200, help="frames timed per path per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    ap.add_argument("--data", action="append", default=None,
                    help="NAME=DIR of a split source (default: the three training centres under ../shared/data)")
    ap.add_argument("--split", type=Path, default=None, help="split.json (default: the checkpoint's)")
    ap.add_argument("--val-limit", type=int, default=None, help="validation images for parity (default: all)")
    ap.add_argument("--polyp-free", type=Path, default=DATA / "polyp-free-val" / "images")
    ap.add_argument("--free-limit", type=int, default=None, help="polyp-free frames (default: all)")
    ap.add_argument("--calibration", type=Path, default=None, help="int8 paths: frames to calibrate on (default: "
                    "--calibration-frames of the split's training images)")
    ap.add_argument("--calibration-frames", type=int, default=64, help="training images for the default calibration")
    ap.add_argument("--out", type=Path, default=None, help="folder for speed-paths.json and speed-paths.md")
    ap.add_argument("--record", action="store_true", help="keep parity and the fastest passing path in the cache "
                    "for --backend auto on this machine")
    args = ap.parse_args(argv)
    args.data = args.data or [f"kvasir={DATA / 'kvasir-seg-train'}", f"clinicdb={DATA / 'cvc-clinicdb-train'}",
                              f"neopolyp={DATA / 'neopolyp-train'}"]
    if args.frames < 1 or args.rounds < 1 or args.batch < 1:
        raise SystemExit("error: --frames, --rounds and --batch must be >= 1")
    report = measure(args)
    text = table(report)
    if args.record:
        report["recorded_choice"] = record(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed-paths.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "speed-paths.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
