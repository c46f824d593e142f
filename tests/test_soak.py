"""The soak command (a benchmark, not CI: see docs/runtime.md) checked on a few seconds of demo."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from syndiff_stream.cli import app
from syndiff_stream.soak import summarize


def test_soak_samples_memory_fps_and_latency(rt_tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["soak", "--minutes", "0.05", "--sample-every", "0.5", "--fps", "15",
                                      "--model", str(rt_tiny_model_dir), "--backend", "eager",
                                      "--out", str(tmp_path / "soak.json")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "soak.json").read_text())
    samples = report["samples"]
    assert len(samples) >= 2 and all(s["rss_mb"] > 0 for s in samples)
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    # How many frames a loaded 2-core machine gets through in 3 s is not asserted: only that the
    # counts agree (on a busy CI machine a model call has taken 1.7 s here).
    final = report["final"]
    assert final["frames_out"] >= samples[-1]["frames_out"] and final["frames_out"] + final["dropped"] <= final["frames"]
    assert report["received_by_subscriber"] + report["missed_by_subscriber"] <= final["frames_out"]
    assert set(report["summary"]) >= {"fps_mean", "rss_growth_mb", "latency_p99_ms_max"}
    assert samples[-1]["t_s"] >= 0.5  # sampled over the run; how long a stop takes is not asserted


def test_summary_measures_growth_and_slope_over_the_second_half():
    samples = [{"t_s": t, "rss_mb": 100 + (t if t >= 50 else 0), "fps": 30.0,
                "latency_ms": {"p50": 20.0, "p95": 30.0, "p99": 40.0 + t}} for t in range(0, 101, 10)]
    summary = summarize(samples)
    assert summary["rss_growth_mb"] == 100 and summary["rss_slope_mb_per_hour_second_half"] == 3600
    assert summary["fps_min"] == 30 and summary["latency_p99_ms_max"] == 140
