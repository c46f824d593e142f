"""The operating point: a curve over threshold and minimum area, the rule that picks from it, the
leave-one-sequence-out check of that rule, and the checkpoint it is written into."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from syndiff_stream.model import Segmenter
from syndiff_trainer.cli import app
from syndiff_trainer.evaluate import to_masks
from syndiff_trainer.operating import choose, leave_one_group_out


def _row(t, area, sens, alarms_by_group, dice=0.5):
    total = {}
    for g, (a, n) in alarms_by_group.items():
        name = g.split("/", 1)[0]
        total.setdefault(name, [0, 0])
        total[name][0] += a
        total[name][1] += n
    return {"threshold": t, "min_area": area, "sensitivity": sens, "small_sensitivity": None, "dice": dice,
            "alarm_rate": {n: a / c for n, (a, c) in total.items()}, "alarms_by_group": alarms_by_group}


def test_min_area_drops_small_components_at_the_threshold():
    prob = np.zeros((1, 20, 20), np.float32)
    prob[0, 2:4, 2:4] = 0.9  # 4 px: 1 % of the frame
    prob[0, 10:16, 10:16] = 0.6  # 36 px
    assert to_masks(prob, 0.5).sum() == 40
    assert to_masks(prob, 0.5, min_area=0.02).sum() == 36
    assert to_masks(prob, 0.7, min_area=0.0).sum() == 4


def test_the_rule_takes_the_most_sensitive_point_within_the_alarm_budget():
    rows = [_row(0.5, 0.0, 0.95, {"free/s1": (5, 10), "free/s2": (1, 10)}),   # 30 % alarms
            _row(0.7, 0.0, 0.90, {"free/s1": (1, 10), "free/s2": (0, 10)}),   # 5 %
            _row(0.9, 0.0, 0.80, {"free/s1": (0, 10), "free/s2": (0, 10)})]   # 0 %
    assert choose(rows, 0.05, ["free"])["threshold"] == 0.7
    assert choose(rows, 0.0, ["free"])["threshold"] == 0.9
    assert choose(rows, 0.3, ["free"])["threshold"] == 0.5
    none_fits = [_row(0.5, 0.0, 0.9, {"free/s1": (9, 10)}), _row(0.6, 0.0, 0.8, {"free/s1": (3, 10)})]
    assert choose(none_fits, 0.05, ["free"])["threshold"] == 0.6  # the fewest alarms


def test_leave_one_group_out_scores_each_sequence_with_a_point_chosen_without_it():
    # Sequence s1 alone makes 0.7 too noisy; chosen without s1, 0.7 passes and alarms on s1.
    rows = [_row(0.7, 0.0, 0.9, {"free/s1": (4, 10), "free/s2": (0, 10), "free/s3": (0, 10)}),
            _row(0.9, 0.0, 0.8, {"free/s1": (1, 10), "free/s2": (0, 10), "free/s3": (0, 10)})]
    assert choose(rows, 0.05, ["free"])["threshold"] == 0.9  # 1 of 30 frames
    honest = leave_one_group_out(rows, 0.05, ["free"])
    assert honest["by_group"]["free/s1"]["threshold"] == 0.7 and honest["alarm_rate"] == 4 / 30


def test_operating_point_command_writes_the_chosen_point_into_the_checkpoint(tmp_path, rt_tiny_model_dir, kvasir_subset):
    import shutil

    import cv2

    model = tmp_path / "model"
    shutil.copytree(rt_tiny_model_dir, model)
    free = tmp_path / "free"
    (free / "images").mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(free / "images" / f"seq{i % 2}_img{i}.jpg"), np.full((48, 64, 3), 60 + 20 * i, np.uint8))
    (free / "sequences.csv").write_text("frame,sequence\n" + "".join(f"seq{i % 2}_img{i},seq{i % 2}\n" for i in range(4)))
    res = CliRunner().invoke(app, ["operating-point", "--data", f"kvasir={kvasir_subset}", "--polyp-free", str(free),
                                   "--model", str(model), "--split", "all", "--max-alarm", "0.5", "--write", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    chosen = report["chosen"]
    assert report["binding"] == ["free"] and "crops of the scored images" in chosen["alarm_rate"]
    config = json.loads((model / "config.json").read_text())["config"]
    assert (config["threshold"], config["min_area"]) == (chosen["threshold"], chosen["min_area"])
    seg = Segmenter.from_pretrained(model)
    assert seg.config.min_area == chosen["min_area"]
    assert json.loads((model / "operating_point.json").read_text())["chosen"] == chosen
    bad = CliRunner().invoke(app, ["operating-point", "--data", str(kvasir_subset), "--polyp-free", str(tmp_path / "no"),
                                   "--model", str(model)])
    assert bad.exit_code == 2 and "does not exist" in bad.output
