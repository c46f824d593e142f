"""Training from recipes: deterministic, resumable, self-recording, and careful with bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from recipes import tiny_recipe
from syndiff_stream.model import Segmenter, preset_config
from syndiff_trainer.cli import app
from syndiff_trainer.recipe import RecipeError
from syndiff_trainer.train import RunOptions, fit, reproduce


def run(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def options(out, tmp_path, **kw):
    return RunOptions(out=str(out), device="cpu", threads=1, progress=False, cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def two_source_recipe(kvasir_40, clinicdb_subset):
    return tiny_recipe(("kvasir", kvasir_40, "phash"), ("clinicdb", clinicdb_subset, "sequences"),
                       sets=["data.1.weight=2", "augment.preset=scope"])


def test_two_runs_of_one_recipe_give_bit_identical_weights(two_source_recipe, tmp_path):
    a = fit(two_source_recipe, options(tmp_path / "a", tmp_path))
    b = fit(two_source_recipe, options(tmp_path / "b", tmp_path))
    wa, wb = load_file(f"{a['model']}/model.safetensors"), load_file(f"{b['model']}/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    changed = fit(two_source_recipe.model_copy(update={"seed": 1}), options(tmp_path / "c", tmp_path))
    wc = load_file(f"{changed['model']}/model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters, so the test can fail


def test_an_interrupted_run_resumes_to_the_same_weights(two_source_recipe, tmp_path):
    whole = fit(two_source_recipe, options(tmp_path / "whole", tmp_path))
    first = fit(two_source_recipe, options(tmp_path / "parts", tmp_path, stop_at=3))
    assert first["stopped_at"] == 3
    resumed = fit(two_source_recipe, options(tmp_path / "parts", tmp_path))
    wa, wb = load_file(f"{whole['model']}/model.safetensors"), load_file(f"{resumed['model']}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_folder_records_how_it_was_made(two_source_recipe, tmp_path):
    result = fit(two_source_recipe, options(tmp_path / "run", tmp_path))
    model = tmp_path / "run" / "model"
    for name in ("recipe.toml", "manifest.json", "split.json", "run.json", "log.jsonl", "config.json"):
        assert (model / name).is_file(), name
    manifest = json.loads((model / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["kvasir", "clinicdb"]
    assert all(len(f["image_sha256"]) == 64 for s in manifest["sources"] for f in s["files"])
    assert json.loads((model / "run.json").read_text())["libraries"]["torch"].startswith("2.")
    rows = [json.loads(line) for line in (model / "log.jsonl").read_text().splitlines()]
    stage2 = [r for r in rows if r["stage"] == 2]
    assert [r["step"] for r in stage2] == [1, 2, 3, 4]
    assert {"noise", "latent", "mask", "loss", "lr", "wall_s"} <= set(stage2[0])
    validated = [r for r in stage2 if "ema_sha256" in r]
    assert [r["step"] for r in validated] == [2, 4]
    assert {"val_dice", "val_dice/kvasir", "val_dice/clinicdb", "val_spread"} <= set(validated[-1])
    split = json.loads((model / "split.json").read_text())
    assert any(s.startswith("clinicdb/") for s in split["val"]) and result["chosen"] == "last"


def test_reproduce_reruns_the_recorded_recipe_and_checks_the_digest(two_source_recipe, tmp_path):
    fit(two_source_recipe, options(tmp_path / "orig", tmp_path))
    report = reproduce(tmp_path / "orig" / "model", options(tmp_path / "again", tmp_path))
    assert report["identical"] is True and report["step"] == 4
    spot = reproduce(tmp_path / "orig" / "model", options(tmp_path / "spot", tmp_path, stop_at=2))
    assert spot["identical"] is True and spot["step"] == 2


def test_resuming_with_another_recipe_is_refused_and_writes_nothing(two_source_recipe, tmp_path):
    fit(two_source_recipe, options(tmp_path / "run", tmp_path, stop_at=2))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    other = two_source_recipe.model_copy(update={"batch_size": 3})
    with pytest.raises(RecipeError, match="another recipe.*batch_size"):
        fit(other, options(tmp_path / "run", tmp_path))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_missing_data_source_is_named_before_anything_is_written(kvasir_40, tmp_path):
    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), ("elsewhere", tmp_path / "nope", "none"))
    out = tmp_path / "run"
    output = run("fit", "--recipe", "tiny-smoke", "--set", f'data.0.path="{tmp_path / "nope"}"', "--out", out, code=2)
    assert "data source 'kvasir': folder" in output and "does not exist" in output and not out.exists()
    with pytest.raises(Exception, match="data source 'elsewhere'"):
        fit(recipe, options(out, tmp_path))
    assert not out.exists()


@pytest.mark.slow
def test_short_training_beats_an_untrained_model(kvasir_40, tmp_path):
    torch.manual_seed(0)
    untrained = Segmenter(preset_config("tiny", image_size=64))
    untrained.save_pretrained(tmp_path / "untrained")
    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"),
                         sets=["steps=150", "batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=20", "val_every=50",
                               "stage1.steps=200", "split.val_fraction=0.2", "ema.decay=0.9", "log_every=50"])
    fit(recipe, options(tmp_path / "run", tmp_path))
    scores = {}
    for name, model in (("untrained", tmp_path / "untrained"), ("trained", tmp_path / "run" / "model")):
        scores[name] = json.loads(run("eval", "--data", f"kvasir={kvasir_40}", "--model", model, "--split-file",
                                      tmp_path / "run" / "split.json", "--json"))
    trained, untrained = scores["trained"], scores["untrained"]
    assert trained["n"] == untrained["n"] >= 6 and {"dice_ci", "iou_ci", "hd95", "nsd"} <= set(trained)
    assert trained["dice_ci"][0] <= trained["dice"] <= trained["dice_ci"][1]
    # 150 steps of a 67k-parameter model at 64 px: far from converged, but clearly better on overlap
    assert trained["dice"] > untrained["dice"] + 0.03, scores


def test_eval_uses_the_checkpoint_split_and_reports_each_source(two_source_recipe, kvasir_40, clinicdb_subset, tmp_path):
    fit(two_source_recipe, options(tmp_path / "run", tmp_path))
    model = tmp_path / "run" / "model"
    split = json.loads((model / "split.json").read_text())
    result = json.loads(run("eval", "--data", kvasir_40, "--data", clinicdb_subset, "--model", model, "--json"))
    assert result["n"] == len(split["val"]) and set(result["by_source"]) == {"kvasir", "clinicdb"}
    text = run("eval", "--data", kvasir_40, "--data", clinicdb_subset, "--model", model)
    assert "| clinicdb |" in text and "| kvasir |" in text


def test_eval_against_another_checkpoint_reports_the_paired_difference(kvasir_40, tmp_path):
    for seed in (0, 1):
        torch.manual_seed(seed)
        Segmenter(preset_config("tiny", image_size=64)).save_pretrained(tmp_path / f"m{seed}")
    def last_json(output):  # the JSON follows the no-split warning
        return json.loads(output.splitlines()[-1])

    args = ["eval", "--data", kvasir_40, "--model", tmp_path / "m0", "--limit", "6"]
    itself = last_json(run(*args, "--against", tmp_path / "m0", "--json"))
    assert itself["against"]["dice"] == 0.0 and itself["against"]["dice_ci"] == [0.0, 0.0] and "images" not in itself
    other = last_json(run(*args, "--against", tmp_path / "m1", "--json", "--per-image"))
    baseline = last_json(run("eval", "--data", kvasir_40, "--model", tmp_path / "m1", "--limit", "6", "--json"))
    assert other["against"]["dice"] == pytest.approx(other["dice"] - baseline["dice"])
    assert other["against"]["baseline_dice"] == pytest.approx(baseline["dice"]) and len(other["images"]) == 6
    assert "Dice difference" in run(*args, "--against", tmp_path / "m1")
    bad = CliRunner().invoke(app, [str(a) for a in args] + ["--against", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_eval_warns_when_the_checkpoint_records_no_split(kvasir_40, tmp_path):
    Segmenter(preset_config("tiny", image_size=64)).save_pretrained(tmp_path / "bare")
    result = CliRunner().invoke(app, ["eval", "--data", str(kvasir_40), "--model", str(tmp_path / "bare"), "--limit", "2"])
    assert result.exit_code == 0 and "records no split" in result.output


def test_eval_names_a_bad_checkpoint(kvasir_40, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--data", str(kvasir_40), "--model", str(tmp_path / "none")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_plan_steps_fits_whole_validation_intervals_into_the_time_left():
    from syndiff_trainer.train import plan_steps

    recipe = tiny_recipe(("kvasir", "unused", "none"), sets=["steps=10000", "val_every=500", "optim.warmup_steps=300"])
    # 200 steps to the first validation (4 s), then intervals of 500 x 0.02 x 1.2 + 2 s = 14 s
    assert plan_steps(recipe, 300, 0.02, 2.0, 4 + 6 * 14 + 1) == 3000
    assert plan_steps(recipe, 300, 0.001, 0.0, 1e6) == 10000  # never longer than the recipe
    assert plan_steps(recipe, 300, 1.0, 2.0, 10) == 301  # no time at all: past warm-up, not zero
    assert plan_steps(recipe.model_copy(update={"steps": 300}), 300, 1.0, 2.0, 10) == 300  # nor past the recipe


def test_a_time_budget_run_is_the_run_its_recorded_recipe_makes(kvasir_40, tmp_path, monkeypatch):
    import syndiff_trainer.train as train

    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=["steps=40", "val_every=4", "optim.warmup_steps=4"])
    monkeypatch.setattr(train, "plan_steps", lambda *a: 8)  # as if 8 steps were all the budget allowed
    budgeted = fit(recipe, options(tmp_path / "budget", tmp_path, time_budget_s=3600))
    assert budgeted["step"] == 8
    recorded = train.load_run_recipe(tmp_path / "budget" / "model")
    assert recorded.steps == 8
    events = [json.loads(line) for line in (tmp_path / "budget" / "log.jsonl").read_text().splitlines()]
    assert {"event": "time budget", "step": 4, "steps": 8, "budget_s": 3600} in [
        {k: v for k, v in e.items() if k != "wall_s"} for e in events]
    plain = fit(recorded, options(tmp_path / "plain", tmp_path))
    wa = load_file(f"{budgeted['model']}/model.safetensors")
    wb = load_file(f"{plain['model']}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the shortened schedule is exactly the shorter recipe's


def test_a_run_out_of_time_stops_and_keeps_a_checkpoint(kvasir_40, tmp_path):
    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=["steps=40", "val_every=10", "optim.warmup_steps=4"])
    result = fit(recipe, options(tmp_path / "late", tmp_path, time_budget_s=0.001))
    assert result["stopped_at"] == 1  # the deadline had passed before the first step ended
    assert json.loads((tmp_path / "late" / "last" / "config.json").read_text())["step"] == 1
    assert "out of time" in (tmp_path / "late" / "log.jsonl").read_text()


def test_more_loader_threads_give_the_same_weights(two_source_recipe, tmp_path):
    one = fit(two_source_recipe, options(tmp_path / "one", tmp_path))
    three = fit(two_source_recipe, options(tmp_path / "three", tmp_path, loader_workers=3))
    wa, wb = load_file(f"{one['model']}/model.safetensors"), load_file(f"{three['model']}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_compiled_training_step_trains(kvasir_40, tmp_path):
    """--compile (for GPUs, where launches bound a step) runs the same loss through inductor."""
    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=["steps=3", "val_every=3"])
    eager = fit(recipe, options(tmp_path / "eager", tmp_path))
    compiled = fit(recipe, options(tmp_path / "compiled", tmp_path, compile="default"))
    we = load_file(f"{eager['model']}/model.safetensors")
    wc = load_file(f"{compiled['model']}/model.safetensors")
    assert all(torch.isfinite(v).all() for v in wc.values())
    # the same arithmetic in another order: the weights agree to float noise, not bit for bit
    assert max((we[k] - wc[k]).abs().max().item() for k in we if we[k].is_floating_point()) < 1e-3


def test_eval_reports_specificity_on_polyp_free_frames_and_crops(kvasir_40, tmp_path):
    import cv2

    torch.manual_seed(0)
    Segmenter(preset_config("tiny", image_size=64)).save_pretrained(tmp_path / "m")
    free = tmp_path / "free"
    (free / "images").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(free / "images" / f"f{i}.jpg"), np.full((48, 64, 3), 100, np.uint8))
    result = json.loads(run("eval", "--data", f"kvasir={kvasir_40}", "--model", tmp_path / "m", "--limit", "6",
                            "--polyp-free", f"normal={free}", "--json").splitlines()[-1])
    normal, crops = result["polyp_free"]["normal"], result["polyp_free"]["crops of the scored images"]
    assert normal["frames"] == 3 and normal["alarm_frames"] + round(normal["specificity"] * 3) == 3
    assert 0 < crops["frames"] <= 12 and crops["groups"] <= 6  # at most two crops of each scored image, in its group
    assert result["operating_point"] == {"threshold": 0.5, "min_area": 0.0}
    text = run("eval", "--data", f"kvasir={kvasir_40}", "--model", tmp_path / "m", "--limit", "6", "--no-crops",
               "--polyp-free", str(free))
    assert "| free | 3 |" in text and "crops of the scored images" not in text


def test_mask_spread_tells_a_collapse_from_a_model_that_follows_the_images():
    from syndiff_trainer.train import mask_spread

    rng = np.random.default_rng(0)
    truth = np.zeros((6, 16, 16), bool)
    for k in range(6):
        y, x = rng.integers(0, 10, 2)
        truth[k, y:y + 6, x:x + 6] = True
    assert mask_spread(truth, truth) == pytest.approx(1.0)
    assert mask_spread(np.repeat(truth[:1], 6, axis=0), truth) == 0.0  # the same blob everywhere
    assert mask_spread(np.zeros_like(truth), truth) == 0.0  # nothing anywhere
    assert np.isnan(mask_spread(truth, np.zeros_like(truth)))  # no polyp to compare with


def test_stage1_centres_its_latents_when_asked_and_a_reused_stage1_keeps_the_shift(kvasir_40, tmp_path):
    """center_latents: the training masks' latents get zero mean per channel and unit spread, and
    the autoencoder's weights are those of the same run uncentred; off, no shift is recorded
    (earlier recipes' models unchanged). A copied mask_ae/ hands its shift on."""
    import shutil

    from syndiff_trainer.data import apply_split, load_sources

    runs = {}
    for name, centre in (("plain", "false"), ("centred", "true")):
        recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=[f"stage1.center_latents={centre}", "steps=2"])
        fit(recipe, RunOptions(out=str(tmp_path / name), progress=False, threads=1))
        runs[name] = Segmenter.from_pretrained(tmp_path / name / "mask_ae")
    plain, centred = runs["plain"], runs["centred"]
    assert plain.config.latent_shift is None and len(centred.config.latent_shift) == centred.config.latent_channels
    assert all(torch.equal(v, plain.mask_vae.state_dict()[k]) for k, v in centred.mask_vae.state_dict().items())
    ds = load_sources(recipe.data, recipe.image_size, progress=False).ds
    train, _ = apply_split(ds, json.loads((tmp_path / "centred" / "split.json").read_text()))
    with torch.no_grad():
        z = centred.encode_mask(torch.from_numpy(train.masks[:256]).unsqueeze(1).float())
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(z.shape[1]), atol=1e-4)
    assert z.std().item() == pytest.approx(1.0, abs=1e-3)
    shutil.copytree(tmp_path / "centred" / "mask_ae", tmp_path / "reuse" / "mask_ae")
    fit(recipe, RunOptions(out=str(tmp_path / "reuse"), progress=False, threads=1))
    assert Segmenter.from_pretrained(tmp_path / "reuse" / "model").config.latent_shift == centred.config.latent_shift


def test_a_batch_norm_model_is_scored_and_saved_with_statistics_of_its_ema_weights(kvasir_40, tmp_path):
    from syndiff_trainer.train import recalibrate_batch_norms
    from syndiff_stream.model import batch_norms

    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=["model.overrides.norm=batch"])
    a = fit(recipe, options(tmp_path / "a", tmp_path))
    b = fit(recipe, options(tmp_path / "b", tmp_path))
    wa, wb = load_file(f"{a['model']}/model.safetensors"), load_file(f"{b['model']}/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the calibration batches are seeded too
    model = Segmenter.from_pretrained(a["model"])
    trained = [m for m in batch_norms(model) if m not in set(batch_norms(model.mask_vae))]
    assert trained and all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in trained)
    # the statistics are those of the saved weights: recomputed on one batch they differ,
    # on a model whose statistics were reset they are restored; the frozen autoencoder's stay put
    vae_before = [m.running_mean.clone() for m in batch_norms(model.mask_vae)]
    image, mask = torch.rand(2, 3, 64, 64) * 2 - 1, (torch.rand(2, 1, 64, 64) > 0.8).float()
    recalibrate_batch_norms(model, [(image, mask, torch.tensor([999, 999]), torch.randn(2, *model.inference_noise.shape[1:]))])
    names = {m: n for n, m in model.named_modules()}
    assert all(not torch.equal(m.running_mean, wa[f"{names[m]}.running_mean"]) for m in trained)
    assert all(torch.equal(m.running_mean, v) for m, v in zip(batch_norms(model.mask_vae), vae_before))
    assert not model.training and all(not m.training for m in batch_norms(model))
