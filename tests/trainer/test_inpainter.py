"""`syndiff-train inpainter`: prompts from the data, the word-level tokenizer, the training masks,
and a tiny run end to end: a pipeline folder that `synth --weights` loads and uses, bit-identical
reruns (`reproduce`), resuming, one-line errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tomli_w
import torch
from typer.testing import CliRunner

from syndiff_stream.datasets import DatasetError
from syndiff_trainer.cli import app
from syndiff_trainer.data import ArrayDataset, file_sha256
from syndiff_trainer.frame_prompts import (all_prompts, describe, frame_prompts, prompt_bank, read_classes,
                                           shape_word, size_class)
from syndiff_trainer.inpainter import (MaskSpec, build_tokenizer, encode_prompts, inpaint_masks, load_inpainter_recipe,
                                       prompt_words)
from syndiff_trainer.prompts import PromptBank

RUNNER = CliRunner()
NEOPOLYP = Path(__file__).parents[2].parent / "shared" / "data" / "neopolyp-train"
S = 256


def disc(diameter: float, centre=(128, 128), size: int = S) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.hypot(yy - centre[0], xx - centre[1]) < diameter / 2


def ellipse(axes: tuple[int, int], angle: float = 30, size: int = S) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    cv2.ellipse(m, (size // 2, size // 2), axes, angle, 0, 360, 1, -1)
    return m.astype(bool)


# ---- prompts from the data -------------------------------------------------------------------------

def test_size_classes_follow_the_prompt_banks_ranges_cut_in_the_middle_of_their_overlaps():
    # DEFAULT_SIZE_CLASSES: diminutive 0.05-0.11, small 0.10-0.20, large 0.18-0.38 of the side
    assert [size_class(x) for x in (0.02, 0.08, 0.104, 0.106, 0.15, 0.189, 0.191, 0.3, 0.9)] == \
        ["diminutive", "diminutive", "diminutive", "small", "small", "small", "large", "large", "large"]
    # equivalent diameter of the largest polyp over the frame side, measured on hand-made masks
    for diameter, want in ((20, "diminutive"), (40, "small"), (80, "large")):
        d = describe(disc(diameter), "kvasir")
        assert d["size"] == want and abs(d["diameter_share"] - diameter / S) < 0.01, (diameter, d)
        assert d["prompt"] == f"colonoscopy, {want} round polyp, kvasir"


def test_shape_words_are_measured_on_the_outline_and_left_out_when_too_small_to_tell():
    assert shape_word(disc(60)) == "round"
    assert shape_word(ellipse((30, 24))) == "round"  # 1.25 : 1
    assert shape_word(ellipse((45, 15))) == "elongated"  # 3 : 1
    cross = np.zeros((S, S), bool)
    cross[100:156, 120:136] = cross[120:136, 100:156] = True  # a plus sign: solidity about 0.5
    assert shape_word(cross) == "irregular"
    tiny = disc(6)  # 28 px: too coarse to tell a shape
    assert shape_word(tiny) is None
    assert describe(disc(6, (32, 32), size=64), "clinicdb")["prompt"] == "colonoscopy, diminutive polyp, clinicdb"


def test_several_polyps_specks_and_empty_frames():
    two = disc(60, (70, 70)) | disc(30, (190, 190))
    d = describe(two, "neopolyp")
    assert d["polyps"] == 2 and d["size"] == "large"  # the largest one's size
    assert d["prompt"] == "colonoscopy, several large round polyps, neopolyp"
    speck = disc(60) | disc(3, (10, 10))  # 7 px: under 0.1 % of the frame, an annotation speck
    assert describe(speck, "kvasir")["prompt"] == "colonoscopy, large round polyp, kvasir"
    assert describe(np.zeros((S, S), bool), "kvasir")["prompt"] == "colonoscopy, normal mucosa, kvasir"


def test_neoplastic_words_come_from_classes_csv_and_are_left_out_where_unknown(tmp_path):
    neo, kv = tmp_path / "neo", tmp_path / "kv"
    neo.mkdir(), kv.mkdir()
    (neo / "classes.csv").write_text("frame,class,neoplastic_px,non_neoplastic_px\n"
                                     "a,neoplastic,100,0\nb,non-neoplastic,0,100\n")
    assert read_classes(neo) == {"a": "neoplastic", "b": "non-neoplastic"} and read_classes(kv) == {}
    masks = np.stack([disc(80)] * 4)
    ds = ArrayDataset(np.zeros((4, S, S, 3), np.uint8), masks, ["neo/a", "neo/b", "neo/c", "kv/a"])
    sources = [type("Spec", (), {"name": "neo", "path": str(neo)}), type("Spec", (), {"name": "kv", "path": str(kv)})]
    assert [d["prompt"] for d in frame_prompts(ds, sources)] == [
        "colonoscopy, large round neoplastic polyp, neo", "colonoscopy, large round non-neoplastic polyp, neo",
        "colonoscopy, large round polyp, neo", "colonoscopy, large round polyp, kv"]
    (neo / "classes.csv").write_text("frame,class\na,adenoma\n")
    with pytest.raises(DatasetError, match="adenoma"):
        read_classes(neo)


@pytest.mark.skipif(not (NEOPOLYP / "classes.csv").is_file(), reason="NeoPolyp data not available")
def test_neopolyp_classes_csv_is_read_for_every_frame():
    classes = read_classes(NEOPOLYP)
    assert len(classes) == 1000 and set(classes.values()) == {"neoplastic", "non-neoplastic"}


def test_the_tokenizer_knows_every_word_a_prompt_can_hold_and_pads_and_truncates_like_clip():
    prompts = all_prompts(["kvasir", "clinicdb", "neopolyp"])
    tok = build_tokenizer(prompt_words(prompts), 16)
    unk = tok.convert_tokens_to_ids("<|unk|>")
    longest = max(prompts, key=lambda p: len(tok(p).input_ids))
    assert len(tok(longest).input_ids) <= 16
    for p in prompts:
        assert unk not in tok(p).input_ids, p
    ids = tok(["colonoscopy, small round non-neoplastic polyp, kvasir", "an unknown " * 20], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 16)
    assert tok.convert_ids_to_tokens(ids[0])[:9] == ["<|startoftext|>", "colonoscopy", ",", "small", "round",
                                                     "non-neoplastic", "polyp", ",", "kvasir"]
    assert ids[0, 9:].tolist() == [1] * 7  # end of text, then padded with it
    assert ids[1, 1] == unk and ids[1, -1] == 1  # truncated, still ends with the end token


def test_the_prompt_bank_holds_what_the_model_was_taught_in_the_shipped_schema(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompt_bank(["kvasir", "neopolyp"])))
    bank = PromptBank.load(path)
    assert len(bank.prompts) == 2 * 3 * 3 * 3 and bank.negative_prompts == ("",)
    sizes = {p.size for p in bank.prompts}
    assert sizes == {"diminutive", "small", "large"}
    assert sum(p.size == "diminutive" for p in bank.prompts) == len(bank.prompts) // 3  # as often as large ones
    assert {p.text for p in bank.prompts} <= set(all_prompts(["kvasir", "neopolyp"]))
    no_classes = prompt_bank(["kvasir"], with_classes=False)["prompts"]
    assert len(no_classes) == 9 and not any("neoplastic" in p["text"] for p in no_classes)


def test_training_masks_are_the_dilated_polyp_plus_seeded_boxes():
    polyp = torch.from_numpy(disc(20, (32, 32), size=64)).float()[None, None].repeat(4, 1, 1, 1)
    plain = inpaint_masks(polyp, MaskSpec(dilate=0.05, box_prob=0.0), torch.Generator().manual_seed(0))
    r = round(0.05 * 64)
    assert torch.equal(plain, torch.nn.functional.max_pool2d(polyp, 2 * r + 1, 1, r))
    assert (plain >= polyp).all() and plain.sum() > polyp.sum()
    spec = MaskSpec(dilate=0.0, box_prob=1.0, box_min=0.25, box_max=0.25)
    boxed = inpaint_masks(polyp, spec, torch.Generator().manual_seed(1))
    extra = (boxed - polyp).clamp(min=0).sum((1, 2, 3))
    assert (extra > 0).all() and (boxed.sum((1, 2, 3)) <= polyp.sum((1, 2, 3)) + 16 * 16).all()
    assert torch.equal(boxed, inpaint_masks(polyp, spec, torch.Generator().manual_seed(1)))
    assert not torch.equal(boxed, inpaint_masks(polyp, spec, torch.Generator().manual_seed(2)))


# ---- a tiny run, end to end ------------------------------------------------------------------------

def tiny_recipe(path: Path, sources: list[tuple[str, Path, str]], **changes) -> Path:
    data = {"version": 1, "kind": "inpainter", "name": "tiny", "seed": 0, "image_size": 32, "log_every": 1,
            "data": [{"name": n, "path": str(p), "groups": g} for n, p, g in sources],
            "split": {"policy": "grouped", "val_fraction": 0.25},
            "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4, "steps": 3, "batch_size": 2},
            "unet": {"block_out_channels": [16, 32], "attention_heads": 2, "norm_num_groups": 8},
            "text": {"hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 32},
            "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "val_every": 2, "val_limit": 4,
                      "prompt_dropout": 0.5}}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    path.write_text(tomli_w.dumps(data))
    return path


def cli(*args: str, code: int = 0):
    result = RUNNER.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def neopolyp_12(tmp_path_factory) -> Path:
    """The first 12 NeoPolyp frames, linked, with their rows of classes.csv."""
    if not (NEOPOLYP / "classes.csv").is_file():
        pytest.skip(f"real data not available: {NEOPOLYP} is absent")
    root = tmp_path_factory.mktemp("neopolyp-12")
    (root / "images").mkdir(), (root / "masks").mkdir()
    rows = (NEOPOLYP / "classes.csv").read_text().splitlines()
    stems = sorted(p.stem for p in (NEOPOLYP / "images").glob("*.jpg"))[:12]
    for stem in stems:
        (root / "images" / f"{stem}.jpg").symlink_to(NEOPOLYP / "images" / f"{stem}.jpg")
        (root / "masks" / f"{stem}.png").symlink_to(NEOPOLYP / "masks" / f"{stem}.png")
    (root / "classes.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[0] in stems]) + "\n")
    return root


@pytest.fixture(scope="module")
def recipe_file(kvasir_40, neopolyp_12, tmp_path_factory) -> Path:
    return tiny_recipe(tmp_path_factory.mktemp("recipe") / "tiny.toml",
                       [("kvasir", kvasir_40, "phash"), ("neopolyp", neopolyp_12, "none")])


@pytest.fixture(scope="module")
def trained(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inpainter") / "run"
    result = last_json(cli("inpainter", "--recipe", str(recipe_file), "--out", str(out), "--threads", "1",
                           "--no-progress"))
    assert result["step"] == 4 and result["model"] == str(out / "model")
    return out


def weight_files(model: Path) -> dict[str, str]:
    return {str(p.relative_to(model)): file_sha256(p) for p in sorted(model.glob("*/*.safetensors"))}


def test_the_run_writes_a_pipeline_folder_that_inpaint_loads(trained):
    from syndiff_trainer.inpaint import check_pipeline_folder, load_inpaint_pipeline, native_resolution

    model = trained / "model"
    assert check_pipeline_folder(model) == "StableDiffusionInpaintPipeline"
    index = json.loads((model / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert set(weight_files(model)) == {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                        "unet/diffusion_pytorch_model.safetensors"}
    assert not list(model.rglob("*.bin"))
    pipe = load_inpaint_pipeline(model)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and native_resolution(pipe) == 32
    assert pipe.unet.config.in_channels == 9 and pipe.vae_scale_factor == 2
    measured = json.loads((model / "inpainter.json").read_text())["scaling_factor"]
    assert pipe.vae.config.scaling_factor == measured != 0.18215  # stage 1 measured it
    # the embeddings training conditioned on are the pipeline's own
    prompt = "colonoscopy, small round neoplastic polyp, neopolyp"
    with torch.no_grad():
        ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt], "cpu")
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    assert torch.equal(ours, theirs)
    for name in ("recipe.toml", "manifest.json", "split.json", "run.json", "log.jsonl", "frame_prompts.json",
                 "prompts.json"):
        assert (model / name).is_file(), name


def test_the_run_records_itself_and_never_trains_on_validation_frames(trained, neopolyp_12):
    split = json.loads((trained / "split.json").read_text())
    assert split["val"] and not set(split["val"]) & set(split["train"])
    run = json.loads((trained / "run.json").read_text())
    assert run["threads"] == 1 and run["kind"] == "inpainter" and run["machine"]["cpu"]
    assert run["data"]["train"] == len(split["train"]) and run["data"]["val"] == len(split["val"])
    assert run["libraries"]["diffusers"] and run["libraries"]["transformers"]
    manifest = json.loads((trained / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["kvasir", "neopolyp"]
    assert all(len(f["image_sha256"]) == 64 for s in manifest["sources"] for f in s["files"])
    rows = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == 2] == [1, 2, 3, 4]
    assert all(r["sec_per_step"] > 0 and len(r["sha256"]) == 64 for r in rows if "loss" in r)
    assert "val_loss" in rows[-1] and "val_loss_empty_prompt" in rows[-1]
    # every frame's prompt, the NeoPolyp ones with the word classes.csv gives, the Kvasir ones without
    prompts = json.loads((trained / "frame_prompts.json").read_text())
    with (neopolyp_12 / "classes.csv").open() as f:
        classes = {r["frame"]: r["class"] for r in csv.DictReader(f)}
    for stem, cls in classes.items():
        assert f" {cls} polyp" in prompts[f"neopolyp/{stem}"], prompts[f"neopolyp/{stem}"]
    kvasir = [p for s, p in prompts.items() if s.startswith("kvasir/")]
    assert len(kvasir) == 40 and not any("neoplastic" in p for p in kvasir)
    assert all(p.endswith(", kvasir") for p in kvasir)


def test_synth_inpaints_with_the_trained_folder_and_its_own_prompt_bank(trained, kvasir_40, tmp_path):
    out = tmp_path / "synth"
    result = last_json(cli("synth", "--data", str(kvasir_40), "--out", str(out), "--count", "2", "--weights",
                           str(trained / "model"), "--steps", "2", "--seed", "3", "--no-gate", "--device", "cpu"))
    assert result["accepted"] == 2 and result["complete"]
    bank = PromptBank.load(trained / "model" / "prompts.json")
    recipe = load_inpainter_recipe(trained / "model" / "recipe.toml")
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["prompt"] in {p.text for p in bank.prompts} and r["negative_prompt"] == ""
        image = cv2.imread(str(out / r["image"]))
        assert image.shape == (32, 32, 3)
        assert r["resolution"] == 32
        assert r["paint_margin"] == recipe.mask.dilate > 0  # grown as the model was trained
    settings = json.loads((out / "synth.json").read_text())
    assert settings["prompt_bank_sha256"] == file_sha256(trained / "model" / "prompts.json")


def test_same_seed_same_weights_and_reproduce_says_so(trained, tmp_path):
    again = tmp_path / "again"
    report = last_json(cli("reproduce", str(trained / "model"), "--out", str(again), "--no-progress"))
    assert report["identical"] is True and report["kind"] == "inpainter" and report["threads"] == 1
    assert report["compared_rows"] == 3 + 1 + 4  # stage 1's three steps and its end, stage 2's four
    assert weight_files(again / "model") == weight_files(trained / "model")
    other = tmp_path / "seed1"
    recipe = trained / "recipe.toml"
    cli("inpainter", "--recipe", str(recipe), "--set", "seed=1", "--out", str(other), "--threads", "1", "--no-progress")
    theirs, ours = weight_files(other / "model"), weight_files(trained / "model")
    assert all(theirs[k] != ours[k] for k in ours)


def test_reproduce_dispatches_on_the_recorded_recipes_kind(trained):
    from syndiff_stream.model import default_checkpoint_path
    from syndiff_trainer.inpainter import is_inpainter_run

    assert is_inpainter_run(trained / "model") and is_inpainter_run(trained)
    assert not is_inpainter_run(default_checkpoint_path())  # a segmenter: train.reproduce, as before


def test_reproduce_reports_a_logged_difference(trained, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(trained / "model", tampered)
    rows = [json.loads(line) for line in (tampered / "log.jsonl").read_text().splitlines()]
    for r in rows:
        if r["stage"] == 2 and r["step"] == 2:
            r["loss"] += 1e-3
    (tampered / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli("reproduce", str(tampered), "--out", str(tmp_path / "rerun"), "--stop-at", "2", "--no-progress",
                 code=1)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["identical"] is False and report["step"] == 2
    assert report["first_difference"]["stage"] == 2 and report["first_difference"]["step"] == 2
    assert set(report["first_difference"]) == {"stage", "step", "loss"}


def test_an_interrupted_run_resumes_to_the_same_weights(trained, recipe_file, tmp_path):
    out = tmp_path / "resumed"
    args = ["inpainter", "--recipe", str(recipe_file), "--out", str(out), "--threads", "1", "--no-progress"]
    assert last_json(cli(*args, "--stop-at", "3")) == {"stopped_at": 3, "out": str(out)}
    assert not (out / "model").exists()
    cli(*args)
    assert weight_files(out / "model") == weight_files(trained / "model")
    changed = cli(*args, "--set", "train.lr=1e-3", code=2)
    assert "another recipe" in changed.output and "train.lr" in changed.output


def test_bad_input_is_a_one_line_error(recipe_file, tmp_path):
    out = str(tmp_path / "x")
    result = cli("inpainter", "--recipe", str(recipe_file), "--set", "train.stepz=3", "--out", out, code=2)
    assert "unknown key 'train.stepz'" in result.output and len(result.output.strip().splitlines()) == 1
    result = cli("inpainter", "--recipe", str(recipe_file), "--set", "image_size=30", "--out", out, code=2)
    assert "multiple of 4" in result.output
    result = cli("inpainter", "--recipe", "compact16-stem4-kvasir-clinicdb", "--out", out, code=2)
    assert "not an inpainter recipe" in result.output
    missing = tiny_recipe(tmp_path / "missing.toml", [("kvasir", tmp_path / "nowhere", "phash")])
    result = cli("inpainter", "--recipe", str(missing), "--out", out, code=2)
    assert "nowhere" in result.output and "does not exist" in result.output
    assert not (tmp_path / "x").exists()


def test_the_shipped_recipe_is_valid_and_names_the_three_training_centres():
    recipe = load_inpainter_recipe("inpainter-small")
    assert [(s.name, s.path) for s in recipe.data] == [
        ("kvasir", "../shared/data/kvasir-seg-train"), ("clinicdb", "../shared/data/cvc-clinicdb-train"),
        ("neopolyp", "../shared/data/neopolyp-train")]
    assert recipe.split.policy == "grouped" and recipe.image_size == 128 and recipe.vae_scale_factor == 4
    assert recipe.text.hidden_size and math.isclose(recipe.train.prompt_dropout, 0.1)
