"""A tiny grouped k-fold ablation (2 folds, 2 steps, a 64-pixel segmenter): every row trains or
scores what it names, synthetic data never comes from a validation fold, and a rerun reuses the runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from recipes import tiny_recipe
from syndiff_trainer.ablate import AblateConfig, run_ablation
from syndiff_trainer.recipe import RecipeError
from syndiff_trainer.synthetic import SynthConfig, run_synth


@pytest.fixture(scope="module")
def ablation(kvasir_subset, tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    run_synth(SynthConfig(data=str(kvasir_subset), out=str(root / "cp"), count=16, method="copy-paste",
                          resolution=64, gate=False, seed=0, progress=False))
    recipe = tiny_recipe(("kvasir", kvasir_subset, "none"), sets=["steps=2", "stage1.steps=2", "val_every=2"])
    cfg = AblateConfig(recipe=recipe, out=str(root / "out"), synthetic=str(root / "cp"), counts=(1, 50),
                       copy_paste=str(root / "cp"), copy_paste_count=1, folds=2, multistep=3,
                       custom_rows=("scope: augment.preset=scope",),
                       options={"device": "cpu", "threads": 1, "progress": False, "cache_dir": str(root / "cache")})
    return cfg, run_ablation(cfg)


def test_table_has_every_configuration_with_mean_std_and_ci(ablation):
    cfg, summary = ablation
    table = (Path(cfg.out) / "ablation.md").read_text()
    by_name = {r["name"]: r for r in summary["rows"]}
    assert list(by_name) == ["real", "text-guided-1", "text-guided-50", "copy-paste-1", "traditional",
                             "frozen-encoder", "noise-only", "multistep-3", "scope"]
    for name, row in by_name.items():
        if name == "text-guided-50":  # 16 samples exist: reported as not run, not silently shrunk
            assert not row["folds"] and "50 synthetic samples asked for" in row["skipped"]
            assert "| + text-guided synthetic (50) | not run |" in table
            continue
        assert len(row["folds"]) == 2 and 0.0 <= row["dice_mean"] <= 1.0 and row["dice_std"] >= 0.0
        assert row["dice_ci"][0] <= row["dice_mean"] + 1e-9 or row["dice_ci"][1] >= row["dice_mean"] - 1e-9
        assert f"| {row['label']} | {100 * row['dice_mean']:.1f} ± {100 * row['dice_std']:.1f} |" in table
    assert all(f["steps"] == 3 for f in by_name["multistep-3"]["folds"])
    assert all(f["steps"] == 1 for f in by_name["real"]["folds"])


def test_rows_change_what_they_name(ablation):
    cfg, _ = ablation
    runs = Path(cfg.out) / "runs"
    init = load_file(str(runs / "real" / "fold0" / "mask_ae" / "model.safetensors"))

    def weights(row):
        return load_file(str(runs / row / "fold0" / "last" / "model.safetensors"))

    enc = [k for k in init if k.startswith("vision_encoder.")]
    assert all((weights("frozen-encoder")[k] == init[k]).all() for k in enc)
    assert not all((weights("real")[k] == init[k]).all() for k in enc)
    config = json.loads((runs / "noise-only" / "fold0" / "last" / "config.json").read_text())["config"]
    assert config["latent_loss_weight"] == 0.0
    recipe = (runs / "traditional" / "fold0" / "recipe.toml").read_text()
    assert 'preset = "standard"' in recipe and "real/fold0/mask_ae" in recipe
    assert 'preset = "none"' in (runs / "real" / "fold0" / "recipe.toml").read_text()
    assert 'preset = "scope"' in (runs / "scope" / "fold0" / "recipe.toml").read_text()


def test_synthetic_data_never_comes_from_the_validation_fold(ablation):
    cfg, _ = ablation
    for k in range(2):
        fold = Path(cfg.out) / "folds" / f"fold{k}"
        val = {s.split("/", 1)[1] for s in json.loads((fold / "split.json").read_text())["val"]}
        view = fold / "synthetic-text-guided-1" / "manifest.jsonl"
        rows = [json.loads(line) for line in view.read_text().splitlines()]
        assert rows and all(not val & set(r["sources"]) for r in rows)


def test_rerun_reuses_finished_runs(ablation):
    cfg, summary = ablation
    weights = Path(cfg.out) / "runs" / "real" / "fold1" / "last" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert run_ablation(cfg)["rows"] == summary["rows"]
    assert weights.stat().st_mtime_ns == before


def test_a_mistyped_path_or_row_fails_before_any_training(kvasir_subset, tmp_path):
    recipe = tiny_recipe(("kvasir", kvasir_subset, "none"))
    with pytest.raises(RecipeError, match="--synthetic .*nope: folder does not exist"):
        run_ablation(AblateConfig(recipe=recipe, out=str(tmp_path / "o"), synthetic=str(tmp_path / "nope")))
    with pytest.raises(RecipeError, match="expected 'name: key=value"):
        run_ablation(AblateConfig(recipe=recipe, out=str(tmp_path / "o"), custom_rows=("oops",)))
    assert not (tmp_path / "o").exists()


def test_one_fold_is_the_recipes_own_split_with_per_source_columns(kvasir_subset, clinicdb_subset, tmp_path,
                                                                    monkeypatch):
    """`folds=1` scores every row on the split `fit` makes from the recipe (the default's card), a
    row that changes the network trains its own stage 1, and the TTA row scores the first row's
    models with flip TTA on."""
    import syndiff_trainer.ablate as ablate_mod
    from syndiff_trainer.data import load_sources
    from syndiff_trainer.train import make_split

    recipe = tiny_recipe(("kvasir", kvasir_subset, "none"), ("clinicdb", clinicdb_subset, "sequences"),
                         sets=["steps=2", "stage1.steps=2", "val_every=2"])
    seen_tta = []
    real_evaluate = ablate_mod.evaluate

    def spy(model, *args, **kwargs):
        seen_tta.append(model.config.tta_flip)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(ablate_mod, "evaluate", spy)
    cfg = AblateConfig(recipe=recipe, out=str(tmp_path / "out"), folds=1, paper_rows=False, tta_row=True,
                       custom_rows=("wider: model.overrides.cond_channels=8",),
                       options={"device": "cpu", "threads": 1, "progress": False, "cache_dir": str(tmp_path / "c")})
    summary = run_ablation(cfg)

    ds = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=False).ds
    expected = make_split(recipe, ds)
    split = json.loads((tmp_path / "out" / "folds" / "fold0" / "split.json").read_text())
    assert sorted(split["val"]) == sorted(expected["val"]) and sorted(split["train"]) == sorted(expected["train"])

    runs = tmp_path / "out" / "runs"
    import tomllib
    assert tomllib.loads((runs / "wider" / "fold0" / "recipe.toml").read_text())["model"]["init_from"] == ""
    assert (runs / "wider" / "fold0" / "mask_ae").is_dir()
    assert seen_tta == [False, False, True]  # base, wider, flip-tta
    by_name = {r["name"]: r for r in summary["rows"]}
    assert by_name["flip-tta"]["folds"] and set(by_name["base"]["by_source"]) == {"kvasir", "clinicdb"}
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "the recipe's grouped split" in table and "| clinicdb Dice (%) | kvasir Dice (%) |" in table
