"""tools/bf16_tail.py (OpenVINO bf16 with an fp32 tail), on a tiny model, so it cannot rot."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
pytest.importorskip("openvino")
import bf16_tail  # noqa: E402
from test_speed_paths import write_data  # noqa: E402


def test_the_tails_keep_more_nodes_fp32_and_every_row_is_scored(rt_tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(rt_tiny_model_dir, model)
    data, _, split = write_data(tmp_path)
    shutil.copy(split, model / "split.json")
    assert bf16_tail.main(["--model", str(model), "--data", f"d={data.parent / 'd'}", "--seconds", "0.1"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert set(report["split"]) == {f"front {f}, tail {t}" for f in ("f32", "bf16") for t in ("f32", "bf16")}
    assert report["split"]["front f32, tail f32"]["dice_min"] == 1.0  # the split model is the whole model
    assert rows["bf16"]["fp32_nodes"] == 0
    # the U-Net's last convolution comes before the mask decoder: its tail holds the decoder's
    assert 0 < rows["bf16, mask decoder fp32"]["fp32_nodes"] < rows["bf16, after the U-Net fp32"]["fp32_nodes"]
    assert all(0 <= r["dice_min"] <= r["dice_mean"] <= 1 and r["fps"] > 0 and r["bf16_convolutions"] >= 0
               for n, r in rows.items() if n != "f32")
