"""tools/live_budget.py (the pipeline's own share of live latency, with a stand-in model call), on a
tiny model and small frames."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import live_budget  # noqa: E402
from syndiff_stream.model import Segmenter  # noqa: E402


def test_each_setting_runs_live_with_a_call_of_the_given_time(rt_tiny_model_dir, capsys):
    assert live_budget.main(["--model", str(rt_tiny_model_dir), "--size", "128x96", "--fps", "100",
                             "--frames", "40", "--model-ms", "0,8", "--backend", "eager"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["model_ms"], r["setting"]): r for r in report["rows"]}
    assert set(rows) == {(ms, s) for ms in (0.0, 8.0) for s in ("device_check", "run")}
    for (ms, _), row in rows.items():
        assert row["model_call_ms"]["p50"] >= ms
        assert row["latency_ms"]["p50"] >= row["model_call_ms"]["p50"] - 1  # one clock, rounding
        assert row["dropped"] >= 0 and row["e2e_fps"] > 0
    assert rows[(8.0, "run")]["model_call_ms"]["p50"] > rows[(0.0, "run")]["model_call_ms"]["p50"]


def test_the_stand_in_returns_the_real_models_probabilities(rt_tiny_model_dir):
    seg = Segmenter.from_pretrained(rt_tiny_model_dir)
    table = live_budget.real_probabilities(seg, (96, 128), 30.0, "eager")
    assert len(table) == live_budget.REPLAYED
    stand_in = live_budget.StandIn(seg, 0, table)
    inputs = [item.x for item in map(live_budget.Stages(stand_in).preprocess,
                                     live_budget.demo((96, 128), 2, fps=30.0))]
    out = stand_in.infer(torch.from_numpy(np.stack(inputs)))
    assert out.shape == (2, 1, seg.config.image_size, seg.config.image_size)
    assert np.array_equal(out[0, 0].numpy(), table[live_budget.fingerprint(inputs[0])])
    with pytest.raises(RuntimeError, match="not prepared"):
        stand_in.infer(torch.ones(1, 3, seg.config.image_size, seg.config.image_size))


@pytest.mark.parametrize("flag, value, message", [("--size", "1080p", "WIDTHxHEIGHT"),
                                                  ("--settings", "fast", "not one of"),
                                                  ("--model-ms", "5ms", "milliseconds")])
def test_bad_arguments_are_one_clear_error(flag, value, message):
    with pytest.raises(SystemExit, match=f"error: {flag}.*{message}"):
        live_budget.main([flag, value])
