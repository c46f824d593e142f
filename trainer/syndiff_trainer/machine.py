"""The machine a run trained on, as far as it changes float results, and what differs from it now.

The same recipe, data, seed, thread count and library versions give bit-identical weights on the
same kind of machine, and slightly different ones on another: float sums are associative only on
paper, and which kernels run (and so the order of the sums) depends on the CPU's vector extensions
(ATen dispatches AVX2 or AVX-512 kernels, oneDNN picks its own per instruction set), on the math
libraries torch was built with, and on the GPU, its driver and CUDA. `run.json` records these facts
so that `reproduce` can say which of them differ when the weights do.
"""

from __future__ import annotations

import subprocess

import torch

from syndiff_stream.machine import cpu_facts

# Lines of torch.__config__.show() that name the libraries and the dispatch level behind the kernels.
CONFIG_KEYS = ("CPU capability", "Math Kernel Library", "oneDNN", "MKL-DNN", "OpenMP", "LAPACK", "NNPACK",
               "CUDA Runtime", "CuDNN", "OpenBLAS")


def library_build() -> list[str]:
    """The lines of torch's build summary that say which math libraries and dispatch level run."""
    return [line.strip().lstrip("- ") for line in torch.__config__.show().splitlines()
            if any(key in line for key in CONFIG_KEYS) and "Build settings" not in line]


def gpu_facts(device: torch.device) -> dict | None:
    """Name, compute capability, driver, CUDA and cuDNN of the GPU a run used; None on the CPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    driver = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "driver": driver,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def machine_facts(device: torch.device) -> dict:
    """Everything above, and the thread count, as `run.json` records it under `machine`."""
    return {"cpu": cpu_facts(), "threads": torch.get_num_threads(), "torch_build": library_build(),
            "gpu": gpu_facts(device)}


def differences(recorded_run: dict, current_run: dict) -> list[str]:
    """What differs between two `run.json` records that can change float results, one line each:
    the machine (CPU, its extensions and kernel level, threads, math libraries, GPU), the device
    and the library versions. An empty list: none of the recorded facts differ."""
    out = []
    rec_m, cur_m = recorded_run.get("machine"), current_run.get("machine") or {}
    if rec_m is None:
        out.append("the record names no machine (made before run.json recorded one): a different CPU "
                   f"cannot be ruled out; this one is {cur_m.get('cpu', {}).get('model', 'unknown')}, "
                   f"{cur_m.get('cpu', {}).get('kernel_capability', '?')} kernels")
        rec_m = {}
    rc, cc = rec_m.get("cpu", {}), cur_m.get("cpu", {})
    for key, label in (("model", "CPU"), ("kernel_capability", "torch CPU kernels"),
                       ("vector_extensions", "vector extensions")):
        if key in rc and rc.get(key) != cc.get(key):
            a, b = rc.get(key), cc.get(key)
            if isinstance(a, list):
                gone, new = sorted(set(a) - set(b or [])), sorted(set(b or []) - set(a))
                out.append(f"{label}: recorded machine had {', '.join(gone) or 'nothing more'}, "
                           f"this one has {', '.join(new) or 'nothing more'}")
            else:
                out.append(f"{label}: recorded {a}, here {b}")
    threads = (recorded_run.get("threads"), current_run.get("threads"))
    if threads[0] is not None and threads[0] != threads[1]:
        out.append(f"threads: recorded {threads[0]}, here {threads[1]}")
    if "torch_build" in rec_m and rec_m["torch_build"] != cur_m.get("torch_build"):
        out.append("torch build (math libraries): " + "; ".join(
            sorted(set(rec_m["torch_build"]) ^ set(cur_m.get("torch_build") or []))))
    if (rec_m.get("gpu") or None) != (cur_m.get("gpu") or None):
        out.append(f"GPU: recorded {rec_m.get('gpu') or 'none'}, here {cur_m.get('gpu') or 'none'}")
    if recorded_run.get("device") is not None and recorded_run.get("device") != current_run.get("device"):
        out.append(f"device: recorded {recorded_run['device']}, here {current_run.get('device')}")
    for key in ("processes", "grad_accum", "precision"):
        if key in recorded_run and recorded_run[key] != current_run.get(key):
            out.append(f"{key}: recorded {recorded_run[key]}, here {current_run.get(key)}")
    libs_r, libs_c = recorded_run.get("libraries", {}), current_run.get("libraries", {})
    for name in sorted(libs_r.keys() | libs_c.keys()):
        if name != "platform" and libs_r.get(name) != libs_c.get(name):
            out.append(f"{name}: recorded {libs_r.get(name)}, here {libs_c.get(name)}")
    return out
