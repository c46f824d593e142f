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


def fake_cross_centre(folder, stems: dict[str, list[str]], dice_of) -> None:
    """A cross-centre folder's scored folds, without training: each image's Dice from `dice_of`."""
    for held, names in stems.items():
        rows = [{"stem": s, "dice": dice_of(s)} for s in names]
        fold = folder / f"holdout-{held}"
        fold.mkdir(parents=True)
        (fold / "result.json").write_text(json.dumps({"dice": float(np.mean([r["dice"] for r in rows])), "images": rows}))


def test_loco_compare_averages_seeds_and_reports_their_spread(kvasir_40, clinicdb_subset, tmp_path):
    from syndiff_trainer.crossval import compare_loco, compare_table, mean_of_runs

    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), ("clinicdb", clinicdb_subset, "sequences"))
    stems = {"kvasir": [f"kvasir/{p.stem}" for p in sorted((kvasir_40 / "images").iterdir())],
             "clinicdb": [f"clinicdb/{p.stem}" for p in sorted((clinicdb_subset / "images").iterdir())]}
    # recipe A: 0.6 and 0.7 on every image (two seeds); B: 0.5 and 0.5
    for name, value in (("a0", 0.6), ("a1", 0.7), ("b0", 0.5), ("b1", 0.5)):
        fake_cross_centre(tmp_path / name, stems, lambda s, v=value: v)
    report = compare_loco([tmp_path / "a0", tmp_path / "a1"], [tmp_path / "b0", tmp_path / "b1"], recipe,
                          cache_dir=tmp_path / "cache")
    assert report["held_out"] == ["kvasir", "clinicdb"]
    assert report["recipe"]["spread"]["mean"] == pytest.approx(0.1) and report["baseline"]["spread"]["kvasir"] == 0
    assert report["paired"]["mean_dice"] == pytest.approx(0.15)  # (0.6 + 0.7) / 2 - 0.5
    assert report["paired"]["mean_dice_ci"] == pytest.approx([0.15, 0.15])
    table = compare_table(report)
    assert "0.600 / 0.700 (spread 0.100)" in table and "**+0.150 (+0.150 to +0.150)**" in table
    # an image one seed did not score is left out of the average, not counted as 0
    partial = mean_of_runs([{"k": {"dice": 1.0, "images": [{"stem": "x", "dice": 1.0}, {"stem": "y", "dice": 1.0}]}},
                            {"k": {"dice": 0.0, "images": [{"stem": "x", "dice": 0.0}]}}])
    assert partial["k"]["images"] == [{"stem": "x", "dice": 0.5}]
    with pytest.raises(RecipeError, match="no such cross-centre folder"):
        compare_loco([tmp_path / "nowhere"], [tmp_path / "b0"], recipe)


def test_loco_compare_command_reads_the_recorded_recipe(kvasir_40, clinicdb_subset, tmp_path):
    stems = {"kvasir": [f"kvasir/{p.stem}" for p in sorted((kvasir_40 / "images").iterdir())]}
    fake_cross_centre(tmp_path / "a", stems, lambda s: 0.8)
    fake_cross_centre(tmp_path / "b", stems, lambda s: 0.7)
    result = CliRunner().invoke(app, ["loco-compare", str(tmp_path / "a"), "--against", str(tmp_path / "b")])
    assert result.exit_code == 2 and "no holdout-*/recipe.toml; name the recipe with --recipe" in result.output
    (tmp_path / "a" / "holdout-kvasir" / "recipe.toml").write_text(tiny_recipe(("kvasir", kvasir_40, "phash")).to_toml())
    result = CliRunner().invoke(app, ["loco-compare", str(tmp_path / "a"), "--against", str(tmp_path / "b"),
                                      "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    assert "| kvasir | 0.800 | 0.700 | +0.100" in result.output
    assert json.loads((tmp_path / "c.json").read_text())["paired"]["mean_dice"] == pytest.approx(0.1)
