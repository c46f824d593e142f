"""tools/norm_headroom.py: the shipped graph against norm-free copies, on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import norm_headroom  # noqa: E402
from syndiff_stream.model import batch_norms  # noqa: E402

pytest.importorskip("onnxruntime")


def test_copies_lose_their_norms_and_the_original_keeps_them(rt_tiny_segmenter):
    rows = norm_headroom.variants(rt_tiny_segmenter)
    norms = {name: sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) for name, (model, _, _) in rows.items()}
    assert norms["shipped (GroupNorm + SiLU)"] > 0 and norms["norms removed, SiLU"] == 0
    relu = rows["norms removed, ReLU"][0]
    assert not any(isinstance(m, torch.nn.SiLU) for m in relu.modules())
    kept = rows["GroupNorm + ReLU (SiLU -> ReLU, retrained)"][0]
    assert not any(isinstance(m, torch.nn.SiLU) for m in kept.modules()) and norms["GroupNorm + ReLU (SiLU -> ReLU, retrained)"] > 0
    assert any(isinstance(m, torch.nn.GroupNorm) for m in rt_tiny_segmenter.modules())  # the original untouched
    bn = rows["BatchNorm (norm = batch)"][0]
    assert norms["BatchNorm (norm = batch)"] == 0 and len(batch_norms(bn)) == norms["shipped (GroupNorm + SiLU)"]


def test_a_batch_norm_checkpoint_gets_rows_of_its_own(rt_make_segmenter):
    rows = norm_headroom.variants(rt_make_segmenter(0, norm="batch"))
    assert "shipped (BatchNorm + SiLU)" in rows and "BatchNorm (norm = batch)" not in rows
    assert batch_norms(rows["shipped (BatchNorm + SiLU)"][0]) and not batch_norms(rows["norms removed, SiLU"][0])
    assert batch_norms(rows["BatchNorm + ReLU (SiLU -> ReLU, retrained)"][0])


def test_report_counts_reorders_and_shares(rt_tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path / "cache"))
    assert norm_headroom.main(["--model", str(rt_tiny_model_dir), "--out", str(tmp_path / "nh"), "--rounds", "1",
                               "--seconds", "0.05", "--threads", "1", "--batch", "1"]) == 0
    report = json.loads((tmp_path / "nh" / "norm-headroom.json").read_text())
    rows = report["variants"]
    assert len(rows) == 7 and all(r["fps"] > 0 and r["share"] > 0 for r in rows.values())
    assert rows["shipped (GroupNorm + SiLU)"]["norm_ops"] > 0 and rows["norms removed, SiLU"]["norm_ops"] == 0
    assert rows["norms removed, ReLU"]["silu_ops"] < rows["norms removed, SiLU"]["silu_ops"]
    assert set(report["matmul_probes"][0]) == {"torch", "onnxruntime"}
    assert "| shipped (GroupNorm + SiLU) |" in (tmp_path / "nh" / "norm-headroom.md").read_text()
