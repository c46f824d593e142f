"""tools/ort_profile.py: kernel time per operator type of the onnx path, on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import ort_profile  # noqa: E402

pytest.importorskip("onnxruntime")


def test_profile_shares_add_up_and_name_the_convolutions(rt_tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "p.json"
    assert ort_profile.main(["--model", str(rt_tiny_model_dir), "--runs", "2", "--batch", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    shares = {row["op"]: row["share"] for row in report["ops"]}
    assert sum(shares.values()) == pytest.approx(1.0) and "Conv" in shares
    assert all(row["nodes"] >= 1 for row in report["ops"]) and report["ms_per_call"] > 0
    assert "Conv" in capsys.readouterr().out
