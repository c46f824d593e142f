"""Grouped k-fold and leave-one-source-out on a tiny recipe: every fold trains and scores whole groups."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from recipes import tiny_recipe
from syndiff_trainer.cli import app
from syndiff_trainer.crossval import run_cross_centre, run_kfold
from syndiff_trainer.data import ArrayDataset
from syndiff_trainer.recipe import RecipeError


def test_kfold_scores_every_image_once_and_cross_centre_holds_out_each_source(kvasir_40, clinicdb_subset, tmp_path):
    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), ("clinicdb", clinicdb_subset, "sequences"),
                         sets=["steps=2", "stage1.steps=2", "val_every=2"])
    opts = {"device": "cpu", "threads": 1, "progress": False, "cache_dir": str(tmp_path / "cache")}
    table = run_kfold(recipe, tmp_path / "cv", 2, **opts)
    results = json.loads((tmp_path / "cv" / "results.json").read_text())
    assert sum(r["n"] for r in results) == 40 + len(list((clinicdb_subset / "images").iterdir()))
    for k in range(2):  # a ClinicDB sequence is scored in one fold only
        split = json.loads((tmp_path / "cv" / f"fold{k}-split.json").read_text())
        assert not {s for s in split["val"]} & set(split["train"])
    assert "| summary |" in table and "| clinicdb |" in table
    free = {"normal": ArrayDataset(np.full((3, 64, 64, 3), 120, np.uint8), np.zeros((3, 64, 64), bool),
                                   ["a", "b", "c"], ["s1", "s1", "s2"])}
    centres = run_cross_centre(recipe, tmp_path / "cc", polyp_free=free, **opts)
    summary = json.loads((tmp_path / "cc" / "results.json").read_text())
    held = summary["folds"]
    assert held["kvasir"]["n"] == 40 and set(held) == {"kvasir", "clinicdb"}
    assert set(held["kvasir"]["polyp_free"]) == {"normal", "crops of the held-out centre"}
    assert summary["summary"]["mean_dice"] == pytest.approx((held["kvasir"]["dice"] + held["clinicdb"]["dice"]) / 2)
    assert summary["summary"]["worst_dice"] == min(held["kvasir"]["dice"], held["clinicdb"]["dice"])
    assert "| clinicdb | kvasir |" in centres and "**mean of 2**" in centres
    # the same folds again, paired against themselves: nothing retrains, every difference is 0
    again = run_cross_centre(recipe, tmp_path / "cc", only=("kvasir",), against=tmp_path / "cc", **opts)
    paired = json.loads((tmp_path / "cc" / "results.json").read_text())["against"]
    assert paired["mean_dice"] == 0.0 and paired["mean_dice_ci"] == [0.0, 0.0] and "**mean**" in again
    with pytest.raises(RecipeError, match="no such source"):
        run_cross_centre(recipe, tmp_path / "cc", only=("etis",), **opts)


def test_groups_command_prints_counts_and_draws_a_sheet(kvasir_40, tmp_path):
    result = CliRunner().invoke(app, ["groups", "--recipe", "tiny-smoke", "--set", f'data.0.path="{kvasir_40}"',
                                      "--sheet", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output.splitlines()[0])
    assert counts["kvasir"]["images"] == 40 and (tmp_path / "g.png").is_file()
