"""The machine a run records, and what `reproduce` says when the weights differ."""

from __future__ import annotations

import copy
import json

import torch

from syndiff_trainer.machine import differences, machine_facts
from syndiff_trainer.train import explain


def _record(**machine) -> dict:
    facts = machine_facts(torch.device("cpu"))
    facts["cpu"].update(machine)
    return {"threads": 2, "device": "cpu", "processes": 1, "grad_accum": 1, "precision": "auto",
            "machine": facts, "libraries": {"torch": "2.13.0+cpu", "numpy": "2.4.6", "platform": "Linux-a"}}


def test_the_machine_facts_name_the_cpu_its_kernels_and_the_math_libraries():
    facts = machine_facts(torch.device("cpu"))
    assert facts["cpu"]["model"] and facts["cpu"]["kernel_capability"] == torch.backends.cpu.get_cpu_capability()
    assert any("CPU capability" in line for line in facts["torch_build"]) and facts["gpu"] is None
    assert facts["threads"] == torch.get_num_threads()
    json.dumps(facts)  # it goes into run.json


def test_same_records_have_no_differences_and_the_message_says_so():
    here = _record()
    assert differences(here, copy.deepcopy(here)) == []
    assert "every fact both records hold is the same" in explain({"differences": []})


def test_another_cpu_kind_is_named_with_its_extensions_and_kernels():
    recorded = _record(model="Intel Xeon Platinum 8480+", kernel_capability="AVX512",
                       vector_extensions=["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "amx_tile"])
    here = _record(model="AMD EPYC", kernel_capability="AVX2", vector_extensions=["sse4_2", "avx", "avx2", "fma"])
    found = differences(recorded, here)
    assert "CPU: recorded Intel Xeon Platinum 8480+, here AMD EPYC" in found
    assert "torch CPU kernels: recorded AVX512, here AVX2" in found
    assert any("recorded machine had amx_tile, avx512bw, avx512f" in line for line in found)
    message = explain({"differences": found})
    assert "AVX512" in message and "spread" in message


def test_threads_libraries_device_and_a_record_without_a_machine_are_named():
    recorded, here = _record(), _record()
    recorded["threads"], recorded["libraries"]["torch"], recorded["device"] = 1, "2.12.0+cpu", "cuda:0"
    recorded["libraries"]["platform"] = "Linux-b"  # the kernel's version does not choose float kernels
    found = differences(recorded, here)
    assert "threads: recorded 1, here 2" in found and "torch: recorded 2.12.0+cpu, here 2.13.0+cpu" in found
    assert "device: recorded cuda:0, here cpu" in found and not any("platform" in line for line in found)
    old = {k: v for k, v in _record().items() if k != "machine"}
    assert differences(old, here)[0].startswith("the record names no machine")
