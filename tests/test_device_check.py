"""The prepared device check (tools/device_check.py) runs here on CPU, so it cannot rot before a
GPU is lent; on a GPU, the `gpu` test runs it in full and holds it to mask parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import device_check  # noqa: E402
from syndiff_stream.backends import EagerBackend  # noqa: E402


def test_device_check_runs_on_cpu(rt_tiny_model_dir, tmp_path):
    done = subprocess.run([sys.executable, str(TOOLS / "device_check.py"), "--device", "cpu", "--model",
                           str(rt_tiny_model_dir), "--sizes", "90x72", "--variants", "eager:fp32", "--frames", "3",
                           "--parity-frames", "2", "--live-fps", "50", "--presets", "tiny", "--preset-iters", "2",
                           "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["parity_ok"] and "too large to carry" in report["tensorrt"]
    (row,) = report["rows"]
    assert row["variant"] == "eager:fp32" and row["size"] == "90x72" and row["runner"] == "HostRunner"
    assert row["parity_dice_min"] == 1.0  # the reference path itself: identical masks
    assert set(row["live_latency_ms"]) == {"p50", "p95", "p99"} and row["live_frames"] == 3
    assert set(row["live_parts_ms"]) == {"wait_ms", "model_call_ms", "finish_ms"}
    assert {"recorded_e2e_fps", "recorded_model_fps", "plain_loop_fps"} <= set(row)
    assert row["graphs_compiled"] == {"warmup": 0, "parity": 0, "recorded": 0, "live": 0}  # eager builds none
    (preset,) = report["presets"]
    assert preset["preset"] == "tiny" and preset["params"] > 0 and preset["fp32_ms_median"] > 0


class Inverted(EagerBackend):
    """A broken variant: polyp where the model says background."""

    def infer(self, batch):
        return 1 - super().infer(batch)


def test_a_variant_whose_masks_differ_fails_parity(rt_tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(device_check, "make_variant", lambda spec, seg, device: Inverted(seg, device))
    status = device_check.main(["--device", "cpu", "--model", str(rt_tiny_model_dir), "--sizes", "90x72",
                                "--variants", "eager:fp32", "--frames", "2", "--parity-frames", "2"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 1 and not report["parity_ok"] and report["rows"][0]["parity_dice_min"] < 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run when a device is lent")
def test_gpu_variants_match_cpu_eager(tmp_path):
    status = device_check.main(["--device", "cuda", "--frames", "120", "--out", str(tmp_path / "gpu.json")])
    report = json.loads((tmp_path / "gpu.json").read_text())
    print(json.dumps(report, indent=2))  # the figures, for docs/runtime.md
    assert status == 0 and report["parity_ok"], [r for r in report["rows"] if not r["parity_ok"]]
