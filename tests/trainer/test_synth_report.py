"""synth-report: pass rates per attribute, the painted polyp told from the old ones, found sizes,
a copy of a training polyp flagged by the memorisation check, and the CLI's files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from typer.testing import CliRunner

from syndiff_stream.datasets import find_pairs, read_image, read_mask
from syndiff_trainer.cli import app
from syndiff_trainer.frame_prompts import polyps
from syndiff_trainer.synth_report import (found_size, memorisation, new_polyp, pass_rates, polyp_crops,
                                          prompt_attributes)
from syndiff_trainer.synthetic import load_frame

RUNNER = CliRunner()


def test_prompt_attributes_and_pass_rates_per_value():
    records = [
        {"prompt": "colonoscopy, diminutive round polyp, kvasir", "size_class": "diminutive",
         "mask": {"kind": "parametric"}, "accepted": False},
        {"prompt": "colonoscopy, large irregular neoplastic polyp, neopolyp", "size_class": "large",
         "mask": {"kind": "annotation"}, "accepted": True},
        {"prompt": "colonoscopy, large round polyp, kvasir", "size_class": "large",
         "mask": {"kind": "annotation"}, "accepted": True},
    ]
    assert prompt_attributes(records[1]) == {"size": "large", "shape": "irregular", "class": "neoplastic",
                                             "centre": "neopolyp", "mask": "annotation"}
    rates = pass_rates(records)
    assert rates["overall"] == {"tried": 3, "accepted": 2, "rate": 0.6667}
    assert rates["size"]["diminutive"]["rate"] == 0.0 and rates["size"]["large"]["rate"] == 1.0
    assert rates["shape"]["round"] == {"tried": 2, "accepted": 1, "rate": 0.5}
    assert rates["class"]["any"]["tried"] == 2 and rates["centre"]["kvasir"]["tried"] == 2
    copy_paste = {"prompt": None, "size_class": None, "resolution": 100, "accepted": True,
                  "mask": {"kind": "annotation", "diameter_px": 8.0}}
    assert prompt_attributes(copy_paste)["size"] == "diminutive"  # no prompt: the planned mask's size


def test_new_polyp_is_what_lies_wholly_inside_the_planned_box(tmp_path):
    label = np.zeros((64, 64), bool)
    label[2:30, 2:30] = True  # a polyp the frame had, reaching into the box
    label[40:50, 40:50] = True  # the painted one
    cv2.imwrite(str(tmp_path / "m.png"), label.astype(np.uint8) * 255)
    new, old = new_polyp({"mask_file": "m.png", "mask": {"bbox": [20, 20, 60, 60]}}, tmp_path)
    assert new.sum() == 100 and new[45, 45] and not new[25, 25]
    assert old.sum() == 28 * 28


def test_found_size_counts_what_touches_the_new_polyp_away_from_the_old():
    new = np.zeros((100, 100), bool)
    new[40:60, 40:60] = True
    old = np.zeros((100, 100), bool)
    old[0:10, 0:10] = True
    pred = new | old
    pred[80:90, 80:90] = True  # a detection elsewhere is not the painted polyp
    assert abs(found_size(pred, new, old) - np.sqrt(4 * 400 / np.pi) / 100) < 1e-9
    assert found_size(np.zeros_like(new), new, old) == 0.0


def _copy_sample(pair, out: Path) -> dict:
    """A 'synthetic' sample that is a training frame itself: its polyp is a copy of a training polyp."""
    frame, mask = load_frame(pair.image, pair.mask, 128)
    largest = polyps(mask)[0]
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    cv2.imwrite(str(out / "images" / "s.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(out / "masks" / "s.png"), largest.astype(np.uint8) * 255)
    return {"stem": "s", "accepted": True, "image": "images/s.png", "mask_file": "masks/s.png",
            "mask": {"bbox": [0, 0, 128, 128]}}


def test_a_copy_of_a_training_polyp_is_flagged_and_another_centre_is_not(kvasir_subset, clinicdb_subset, tmp_path):
    reference = polyp_crops([kvasir_subset], 128, copies_every=1)
    control = polyp_crops([clinicdb_subset], 128)
    pair = find_pairs(kvasir_subset)[3]
    record = _copy_sample(pair, tmp_path / "syn")
    report = memorisation([record], tmp_path / "syn", reference, control)
    assert report["synthetic"]["min"] < 1e-3 and report["closest"][0]["nearest"].endswith(f"{pair.stem}#0")
    assert report["closer_than_every_control_polyp"] == 1 and report["control"]["min"] > 0.05
    copies = report["copies_of_reference"]
    assert copies["n"] == len(reference[1]) and copies["found_their_original"] >= copies["n"] - 1


def test_cli_reports_a_synth_run_with_a_sheet(kvasir_subset, clinicdb_subset, rt_tiny_model_dir, tmp_path):
    run = tmp_path / "cp"
    result = RUNNER.invoke(app, ["synth", "--data", str(kvasir_subset), "--out", str(run), "--count", "4",
                                 "--method", "copy-paste", "--blend", "feather", "--resolution", "128",
                                 "--gate-model", str(rt_tiny_model_dir), "--gate-threshold", "0", "--seed", "3",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    result = RUNNER.invoke(app, ["synth-report", str(run), "--reference", str(kvasir_subset),
                                 "--control", str(clinicdb_subset), "--gate-model", str(rt_tiny_model_dir),
                                 "--sheet", str(tmp_path / "sheet.png"), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "copy-paste" and report["pass_rate"]["overall"]["tried"] == 4
    found = report["faithfulness"]["requested_vs_found"]
    assert sum(sum(row.values()) for row in found.values()) == report["faithfulness"]["samples"] == 4
    assert report["memorisation"]["synthetic"]["n"] == 4 and report["memorisation"]["reference_polyps"] >= 8
    sheet = read_image(tmp_path / "sheet.png")
    assert sheet.shape[1] == 6 * 128 and sheet.shape[0] > 128
    assert read_mask(run / "masks" / f"{report['memorisation']['closest'][0]['stem']}.png").any()


def test_cli_names_a_folder_without_a_manifest(tmp_path, rt_tiny_model_dir):
    (tmp_path / "empty").mkdir()
    result = RUNNER.invoke(app, ["synth-report", str(tmp_path / "empty"), "--gate-model", str(rt_tiny_model_dir)])
    assert result.exit_code == 2 and "no manifest.jsonl" in result.output
    assert len(result.output.strip().splitlines()) == 1
