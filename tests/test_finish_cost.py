"""tools/finish_cost.py (the finishing stage's time per frame), on a tiny model and a small video."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import finish_cost  # noqa: E402
from conftest import rt_write_video  # noqa: E402


def test_both_smoothing_settings_are_timed_at_the_clip_size(rt_tiny_model_dir, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    rt_write_video(video, frames=6, size=(96, 128))
    assert finish_cost.main([str(video), "--model", str(rt_tiny_model_dir), "--frames", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == [96, 128] and report["frames"] == 5
    for name in ("finish_ms_smoothing_off", "finish_ms_smoothing_default"):
        times = report[name]
        assert 0 < times["p50"] <= times["p95"] <= times["max"]


def test_a_source_without_frames_is_one_clear_error(rt_tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="error: .*empty"):
        finish_cost.main([str(tmp_path / "empty"), "--model", str(rt_tiny_model_dir)])
