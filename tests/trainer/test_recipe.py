"""Recipes: every knob validated, one-line errors naming the key, --set overrides validated too."""

import pytest

from syndiff_trainer.recipe import (RecipeError, load_recipe, parse_value, recipe_diff, recipe_from_dict,
                                    shipped_recipes)


def test_shipped_recipes_load_and_the_default_is_the_working_recipe():
    assert "compact-kvasir-clinicdb" in shipped_recipes()
    recipe = load_recipe("compact-kvasir-clinicdb")
    cfg = recipe.model_config_()
    # the recipe that works (docs/model.md): mask loss on, timesteps focused on t = 999
    assert cfg.mask_loss_weight == 1.0 and cfg.focus_prob == 0.75 and cfg.prediction_type == "v_prediction"
    assert [s.name for s in recipe.data] == ["kvasir", "clinicdb"]
    assert recipe.data[1].groups == "sequences" and recipe.split.select_fraction == 0.0


def test_the_default_recipe_is_the_one_that_built_the_default_checkpoint():
    from syndiff_stream.model import default_checkpoint_path, read_checkpoint_config
    from syndiff_trainer.recipe import DEFAULT_RECIPE
    from syndiff_trainer.train import load_run_recipe

    shipped, recorded = load_recipe(DEFAULT_RECIPE), load_run_recipe(default_checkpoint_path())
    assert recipe_diff(shipped, recorded) == []
    built = read_checkpoint_config(default_checkpoint_path())
    # every architecture field; the latent scale and shift are measured on the masks in stage 1, the
    # presence head fitted after training (`syndiff-train presence-head`), the threshold and minimum
    # area chosen after that (`syndiff-train operating-point --write`)
    measured = {k: getattr(built, k) for k in ("latent_scaling_factor", "latent_shift", "presence_head",
                                               "threshold", "min_area")}
    assert shipped.model_config_().model_copy(update=measured) == built


def test_round_trip_through_toml(tmp_path):
    recipe = load_recipe("compact-kvasir-clinicdb", ["optim.lr=5e-4", "data.1.weight=2", "augment.preset=none"])
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    again = load_recipe(path)
    assert again == recipe and recipe_diff(again, recipe) == []
    assert recipe_diff(again, load_recipe("compact-kvasir-clinicdb")) == ["augment.preset", "data.1.weight", "optim.lr"]


@pytest.mark.parametrize("sets, message", [
    (["optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["steps=abc"], "steps: Input should be a valid integer"),
    (["steps=0"], "steps: Input should be greater than or equal to 1"),
    (["data.5.weight=1"], "data has 2 entries, no '5'"),
    (["model.preset=huge"], "model.preset: Input should be 'compact', 'large', 'sd' or 'tiny'"),
    (["model.overrides.focus_prob=0.3"], "model.overrides sets ['focus_prob']"),
    (["model.overrides.unet_channels=3"], "unknown key 'unet_channels'"),
    (["split.policy=holdout-source", "split.holdout=elsewhere"], "split.holdout 'elsewhere' names no data source"),
    (["augment.preset=fancy"], "augment.preset: Input should be"),
    (["loss.cond_weight=1", "model.init_from=ckpt"], "loss.cond_weight adds a head that model.init_from"),
    (["model.overrides.cond_loss_weight=1"], "model.overrides sets ['cond_loss_weight']"),
    (["lr"], "expected KEY=VALUE"),
])
def test_bad_keys_and_values_are_one_line_errors_naming_them(sets, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("compact-kvasir-clinicdb", sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_unknown_name_and_bad_toml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(RecipeError, match="no shipped recipe of that name"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="data: List should have at least 1 item"):
        recipe_from_dict({"version": 1, "data": []})


def test_set_values_parse_as_toml():
    assert parse_value("5e-4") == 5e-4 and parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value("scope") == "scope" and parse_value('"scope"') == "scope"


def test_a_recipe_of_another_kind_is_refused_with_the_command_that_trains_it():
    with pytest.raises(RecipeError, match="inpainter recipe.*syndiff-train inpainter"):
        load_recipe("inpainter-small")
