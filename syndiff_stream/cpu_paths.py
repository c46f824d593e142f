"""CPU inference paths: named ways to run the model on a CPU, what each needs, and the one chosen
for the CPU at hand.

Which path is fastest depends on the CPU (AVX2 or AVX-512, AMX with bf16, how many cores) and the
library versions, and the machines change from day to day, so no path is the default everywhere.
`--backend auto` on a CPU asks `choose`: it times the cheap candidates the way the pipeline runs
them (`benchmark.throughput`, about half a second each) and keeps the fastest, cached per CPU
model and extensions, checkpoint hash, threads and library versions under `cache_dir()/paths`,
so the probe runs once per machine. A candidate must keep mask parity with fp32: the fp32 paths
(`exact`) do by construction; a lower-precision one (bf16, int8, flush-to-zero) only once
tools/speed_paths.py has measured it on real frames here and recorded the pass
(`record_parity`). A path that fails parity stays selectable by name, never chosen.
An explicit `--backend NAME` (any path below) always wins; docs/runtime.md, CPU paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .atomic import write_text
from .backends import (Backend, BackendError, CompileBackend, EagerBackend, OnnxBackend, OpenVinoBackend, OrtOptions,
                       cache_dir, model_hash)
from .export import Int8Options
from .machine import cpu_facts
from .model import Segmenter

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products (oneDNN); AVX2 only emulates them
PROBE_SECONDS = 0.25  # per candidate and round
PROBE_ROUNDS = 2  # candidates take turns; each keeps its best round (load that comes and goes hits all alike)
PROBE_BATCH = 4  # the recorded pipeline's default batch
MARGIN = 0.05  # another path replaces the default only when this much faster: a short probe is noisy
DEFAULT_PATH = "onnx"


class CpuPath(BaseModel):
    """One way to run the model on a CPU: a backend kind and its settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["onnx", "openvino", "eager", "compile"]
    what: str  # one line for the docs and the CLI's help
    precision: Literal["fp32", "int8", "bf16"] = "fp32"
    exact: bool = True  # fp32 arithmetic, as the model's: parity by construction
    ort: OrtOptions = OrtOptions()
    graph: Literal["fused", "plain"] = "fused"
    int8: Int8Options | None = None
    channels_last: bool = False
    freezing: bool = False  # compile: weights as constants, prepacked once (inductor's freezing)
    needs: tuple[str, ...] = ()  # CPU flags, any one of which the path needs
    probe: bool = True  # cheap enough to time at start-up (compile and int8 take minutes to build)


def _paths(*paths: CpuPath) -> dict[str, CpuPath]:
    return {p.name: p for p in paths}


PATHS = _paths(
    CpuPath(name="onnx", kind="onnx", what="ONNX Runtime fp32, every graph optimisation (NCHWc layout), "
            "the encoder stem folded into its first convolution, idle threads sleep"),
    CpuPath(name="onnx-plain", kind="onnx", graph="plain", probe=False,
            what="onnx with the model exported as trained (stem as a 6-D transpose): the graph fix's baseline"),
    CpuPath(name="onnx-extended", kind="onnx", ort=OrtOptions(level="extended"), probe=False,
            what="onnx without the layout optimisations (no NCHWc): what the layout transformer is worth"),
    CpuPath(name="onnx-layout", kind="onnx", ort=OrtOptions(level="layout"),
            what="onnx at ORT's layout level (ORT_ENABLE_LAYOUT): layout transforms without the last level"),
    CpuPath(name="onnx-spin", kind="onnx", ort=OrtOptions(spinning=True),
            what="onnx with spinning pool threads (matters with more than one thread per session)"),
    CpuPath(name="onnx-noarena", kind="onnx", ort=OrtOptions(memory_pattern=False, cpu_arena=False),
            what="onnx without ORT's memory pattern and arena (plain malloc per run)"),
    CpuPath(name="onnx-daz", kind="onnx", ort=OrtOptions(denormal_as_zero=True), exact=False,
            what="onnx with denormals flushed to zero (session.set_denormal_as_zero)"),
    CpuPath(name="onnx-int8", kind="onnx", precision="int8", exact=False, probe=False, int8=Int8Options(),
            what="ORT static int8, QDQ, per-channel weights, convolutions only (export --precision int8)"),
    CpuPath(name="onnx-int8-tensor", kind="onnx", precision="int8", exact=False, probe=False,
            int8=Int8Options(per_channel=False), what="onnx-int8 with one weight scale per tensor"),
    CpuPath(name="onnx-int8-qop", kind="onnx", precision="int8", exact=False, probe=False,
            int8=Int8Options(format="qoperator"), what="onnx-int8 as QLinearConv operators instead of QDQ pairs"),
    CpuPath(name="onnx-int8-edges", kind="onnx", precision="int8", exact=False, probe=False,
            int8=Int8Options(keep_edges=True), what="onnx-int8 with the first and last convolutions kept fp32"),
    CpuPath(name="openvino", kind="openvino",
            what="OpenVINO's CPU runtime, fp32, on the onnx path's file (its own GroupNorm and conv kernels)"),
    CpuPath(name="openvino-bf16", kind="openvino", precision="bf16", exact=False, needs=BF16_FLAGS,
            what="openvino with bf16 inference precision (AMX or AVX512_BF16 kernels), fp32 in and out"),
    CpuPath(name="eager", kind="eager", what="PyTorch eager fp32 (oneDNN convolutions), torch's threads"),
    CpuPath(name="eager-cl", kind="eager", channels_last=True, what="eager in channels-last (NHWC) memory"),
    CpuPath(name="eager-bf16", kind="eager", precision="bf16", exact=False, needs=BF16_FLAGS, channels_last=True,
            what="eager under bf16 autocast, channels-last: for CPUs with AVX512_BF16 or AMX"),
    CpuPath(name="compile", kind="compile", probe=False,
            what="torch.compile (inductor, C++ kernels built by the host compiler), fp32"),
    CpuPath(name="compile-cl", kind="compile", channels_last=True, probe=False,
            what="compile in channels-last memory (inductor's oneDNN convolutions prefer NHWC)"),
    CpuPath(name="compile-frozen", kind="compile", freezing=True, probe=False,
            what="compile with inductor's freezing: weights folded and prepacked for oneDNN once, fp32"),
    CpuPath(name="compile-frozen-cl", kind="compile", freezing=True, channels_last=True, probe=False,
            what="compile-frozen in channels-last memory"),
    CpuPath(name="compile-bf16", kind="compile", precision="bf16", exact=False, needs=BF16_FLAGS, probe=False,
            channels_last=True, what="compile under bf16 autocast, channels-last: for CPUs with AVX512_BF16 or AMX"),
)


def unavailable(path: CpuPath, facts: dict | None = None, calibration=None) -> str | None:
    """Why `path` cannot run on this machine, as one line; None when it can."""
    import importlib.util

    facts = facts or cpu_facts()
    if path.needs and not set(path.needs) & set(facts["vector_extensions"]):
        have = ", ".join(facts["vector_extensions"]) or "none of the kernel-choosing extensions"
        return (f"{path.name}: not available here: needs a CPU with {' or '.join(path.needs)} "
                f"({facts['model']} has {have})")
    if path.kind == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return f"{path.name}: needs ONNX Runtime: pip install 'syndiff-stream[onnx]'"
    if path.kind == "openvino" and importlib.util.find_spec("openvino") is None:
        return f"{path.name}: needs OpenVINO: pip install 'syndiff-stream[openvino]'"
    if path.kind == "compile" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        return f"{path.name}: not available here: inductor needs a C++ compiler (g++ or clang++)"
    if path.int8 is not None and calibration is None:
        return f"{path.name}: needs calibration frames: --calibration FOLDER|VIDEO|PROFILE (training frames)"
    return None


def int8_cache_path(seg: Segmenter, path: CpuPath, calibration) -> Path:
    """One quantised file per checkpoint, int8 settings and calibration set (its manifest's hashes)."""
    from .export import calibration_set

    _, manifest = calibration_set(calibration)
    digest = hashlib.sha256(json.dumps([path.int8.model_dump(), manifest], sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "onnx" / f"{model_hash(seg)}-{path.name}-{digest}.onnx"


def build_path(name: str, seg: Segmenter, device: str = "cpu", threads: int | None = None,
               calibration=None, **kwargs) -> Backend:
    """The backend of CPU path `name`, or a BackendError naming what it lacks."""
    if name not in PATHS:
        raise BackendError(f"unknown CPU path {name!r}: choose one of {', '.join(PATHS)}")
    path = PATHS[name]
    why = unavailable(path, calibration=calibration)
    if why:
        raise BackendError(why)
    if threads:
        torch.set_num_threads(threads)
    if path.kind == "onnx":
        onnx_path = None
        if path.int8 is not None:
            from .export import export_engine

            onnx_path = int8_cache_path(seg, path, calibration)
            if not onnx_path.is_file():
                export_engine(seg, "onnx", onnx_path, "int8", calibration, exporter="dynamo", int8=path.int8)
        backend = OnnxBackend(seg, device, onnx_path=onnx_path, threads=threads, options=path.ort,
                              graph=path.graph, **kwargs)
    elif path.kind == "openvino":
        backend = OpenVinoBackend(seg, device, threads=threads, graph=path.graph,
                                  precision="bf16" if path.precision == "bf16" else "f32", **kwargs)
    elif path.kind == "eager":
        backend = EagerBackend(seg, device, bf16=path.precision == "bf16", channels_last=path.channels_last, **kwargs)
    else:
        backend = CompileBackend(seg, device, bf16=path.precision == "bf16", channels_last=path.channels_last,
                                 freezing=path.freezing, **kwargs)
    backend.cpu_path = name
    return backend


# ---- parity records (written by tools/speed_paths.py) --------------------------------------------

def parity_file(seg_hash: str, facts: dict | None = None) -> Path:
    """Per checkpoint and CPU (bf16 and int8 kernels differ between CPUs; a cache folder may be shared)."""
    facts = facts or cpu_facts()
    cpu = hashlib.sha256(json.dumps([facts["model"], facts["vector_extensions"]]).encode()).hexdigest()[:8]
    return cache_dir() / "paths" / f"parity-{seg_hash}-{cpu}.json"


def record_parity(seg_hash: str, results: dict[str, dict], facts: dict | None = None) -> Path:
    """Keep each path's measured parity on this CPU ({path: {"ok": bool, ...}}), merged with
    earlier records, so that `choose` may take a lower-precision path that passed."""
    merged = read_parity(seg_hash, facts)
    merged.update(results)
    return write_text(parity_file(seg_hash, facts), json.dumps(merged, indent=1, sort_keys=True) + "\n")


def read_parity(seg_hash: str, facts: dict | None = None) -> dict[str, dict]:
    try:
        data = json.loads(parity_file(seg_hash, facts).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- the choice ---------------------------------------------------------------------------------

class Choice(BaseModel):
    """The CPU path `--backend auto` takes here, and how it got there."""

    model_config = ConfigDict(extra="forbid")

    path: str
    source: Literal["probe", "cache", "speed_paths"]  # timed now, read from the cache, or a full measurement's
    fps: dict[str, float]  # model frames/s of each candidate timed, the pipeline's way
    skipped: dict[str, str]  # paths not timed, and why
    cpu: str
    vector_extensions: list[str]
    threads: int
    model_hash: str
    key: str

    def line(self) -> str:
        """The one line `run` and `bench` print on stderr."""
        how = {"probe": "probed now", "cache": "cached probe", "speed_paths": "measured by tools/speed_paths.py"}
        timed = ", ".join(f"{name} {fps:.0f}" for name, fps in sorted(self.fps.items(), key=lambda kv: -kv[1]))
        return (f"cpu path: {self.path} ({how[self.source]}, {self.threads} threads on {self.cpu} "
                f"[{' '.join(self.vector_extensions)}]; fps {timed})")


def cache_key(facts: dict, seg_hash: str, threads: int) -> str:
    """What makes a choice valid: the CPU (model and kernel-choosing extensions), the checkpoint,
    the threads, and the libraries that run the paths."""
    import importlib.metadata as md

    versions = {}
    for dist in ("onnxruntime", "openvino", "torch"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    fields = {"cpu": facts["model"], "ext": facts["vector_extensions"], "model": seg_hash, "threads": threads,
              **versions}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def choice_file(key: str) -> Path:
    return cache_dir() / "paths" / f"choice-{key}.json"


def candidates(seg_hash: str, facts: dict) -> tuple[list[str], dict[str, str]]:
    """The paths `choose` times here, and the others with the reason each is left out."""
    records = {name: r for name, r in read_parity(seg_hash, facts).items() if isinstance(r, dict)}
    passed = {name for name, r in records.items() if r.get("ok")}
    timed, skipped = [], {}
    for path in PATHS.values():
        why = unavailable(path, facts, calibration=records.get(path.name, {}).get("calibration"))
        if why:
            skipped[path.name] = why.split(": ", 1)[1]
        elif not path.probe:
            skipped[path.name] = "too slow to build at start-up (measure it with tools/speed_paths.py)"
        elif not path.exact and path.name not in passed:
            skipped[path.name] = "lower precision, no parity recorded here (tools/speed_paths.py)"
        else:
            timed.append(path.name)
    return timed, skipped


def probe_fps(backend: Backend, seconds: float = PROBE_SECONDS) -> float:
    """Model frames/s of a candidate on a fixed random batch, as the pipeline runs it."""
    from .benchmark import throughput

    backend.configure(backend.max_workers)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(PROBE_BATCH, 3, backend.input_size, backend.input_size, generator=gen) * 2 - 1
    return throughput(backend, x, seconds, min_calls=1)


def choose(seg: Segmenter, threads: int | None = None, probe=None, use_cache: bool = True) -> Choice:
    """The fastest parity-keeping CPU path for this machine: from the cache when this CPU, checkpoint,
    thread count and library versions were probed before, else timed now (`probe`: backend -> fps,
    default `probe_fps`) and cached."""
    probe = probe or probe_fps
    threads = threads or max(1, os.cpu_count() or 1)
    facts, seg_hash = cpu_facts(), model_hash(seg)
    key = cache_key(facts, seg_hash, threads)
    file = choice_file(key)
    if use_cache and file.is_file():
        try:
            cached = Choice.model_validate_json(file.read_text())
            if cached.path in PATHS:
                return cached.model_copy(update={"source": "cache" if cached.source == "probe" else cached.source})
        except (OSError, ValidationError):
            pass  # unreadable or from another version: probe again
    timed, skipped = candidates(seg_hash, facts)
    records = read_parity(seg_hash, facts)
    built = {}
    for name in timed:
        try:
            built[name] = build_path(name, seg, "cpu", threads, calibration=records.get(name, {}).get("calibration"))
        except BackendError as exc:
            skipped[name] = str(exc).split(": ", 1)[-1]
    if not built:
        raise BackendError("no CPU path runs here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    fps = {name: 0.0 for name in built}
    for _ in range(PROBE_ROUNDS):
        for name, backend in built.items():
            fps[name] = max(fps[name], round(probe(backend), 2))
    best = pick(fps)
    choice = Choice(path=best, source="probe", fps=fps, skipped=skipped, cpu=facts["model"],
                    vector_extensions=facts["vector_extensions"], threads=threads, model_hash=seg_hash, key=key)
    write_text(file, choice.model_dump_json(indent=1) + "\n")
    return choice


def pick(fps: dict[str, float]) -> str:
    """The fastest path; the default one unless another beats it by more than MARGIN."""
    best = max(fps, key=fps.get)
    if DEFAULT_PATH in fps and fps[best] <= fps[DEFAULT_PATH] * (1 + MARGIN):
        return DEFAULT_PATH
    return best


def build_chosen(seg: Segmenter, threads: int | None = None, choice: Choice | None = None) -> Backend:
    """`--backend auto` on a CPU: the chosen path's backend, carrying its choice for the report."""
    choice = choice or choose(seg, threads)
    calibration = read_parity(choice.model_hash).get(choice.path, {}).get("calibration")
    backend = build_path(choice.path, seg, "cpu", threads, calibration=calibration)
    backend.choice = choice.model_dump()
    return backend
