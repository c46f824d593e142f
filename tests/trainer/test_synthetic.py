"""`syndiff-train synth` end to end on a tiny SDXL inpainting pipeline, the quality gate, resuming,
and loading synthetic data for training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from syndiff_stream.datasets import DatasetError, read_mask
from syndiff_trainer.cli import app
from syndiff_trainer.gate import QualityGate
from syndiff_trainer.inpaint import WeightsError, check_pipeline_folder
from syndiff_trainer.prompts import PromptBank
from syndiff_trainer.synthetic import (DiffusionGenerator, Sample, SynthConfig, load_frame, load_synthetic, run_synth,
                                       synthetic_count, synthetic_view, trained_paint_margin)

RUNNER = CliRunner()


def synth_cli(*args: str) -> dict:
    result = RUNNER.invoke(app, ["synth", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def inpainted(tiny_sdxl, kvasir_subset, rt_tiny_model_dir, tmp_path_factory) -> Path:
    """Three samples through the CLI: tiny SDXL inpainting, gate on a tiny segmenter (threshold 0 keeps all)."""
    out = tmp_path_factory.mktemp("synth") / "run"
    summary = synth_cli("--data", str(kvasir_subset), "--out", str(out), "--count", "3", "--weights", str(tiny_sdxl),
                        "--steps", "3", "--seed", "7", "--gate-model", str(rt_tiny_model_dir),
                        "--gate-threshold", "0", "--device", "cpu", "--batch-size", "2")
    assert summary == {"accepted": 3, "tried": 3, "acceptance_rate": 1.0, "out": str(out), "complete": True}
    return out


def test_outputs_have_the_pipeline_size_and_a_complete_manifest(inpainted):
    rows = manifest(inpainted)
    bank = PromptBank.load()
    texts = {p.text for p in bank.prompts}
    assert [r["index"] for r in rows] == [0, 1, 2]
    required = {"source_frame", "prompt", "negative_prompt", "seed", "sample_seed", "guidance_scale", "steps",
                "strength", "mask", "gate_iou", "accepted", "image", "mask_file"}
    for r in rows:
        assert required <= r.keys() and all(r[k] is not None for k in required)
        assert r["steps"] == 3 and r["guidance_scale"] == 7.5 and r["seed"] == 7 and r["accepted"]
        assert r["prompt"] in texts and r["negative_prompt"] in bank.negative_prompts
        image, mask = read_rgb(inpainted / r["image"]), cv2.imread(str(inpainted / r["mask_file"]), 0)
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)  # tiny pipeline: 32 latent x 2
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.0 <= r["gate_iou"] <= 1.0


def test_label_is_existing_polyp_plus_placed_mask_and_only_the_mask_was_repainted(inpainted):
    for r in manifest(inpainted):
        source = Path(r["source_frame"])
        frame, existing = load_frame(source, source.parent.parent / "masks" / source.name, 64)
        label = read_mask(inpainted / r["mask_file"])
        new = label & ~existing
        y0, x0, y1, x1 = r["mask"]["bbox"]
        assert new.sum() == r["mask"]["area_px"] > 0
        assert not new[:y0].any() and not new[y1:].any() and not new[:, :x0].any() and not new[:, x1:].any()
        assert (label == (existing | new)).all() and not (new & existing).any()
        image = read_rgb(inpainted / r["image"])
        band = cv2.dilate(new.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        assert (image[~band] == frame[~band]).all()  # real pixels outside the polyp (+ feathered seam)
        assert (image[new] != frame[new]).any()  # the polyp region was generated


def test_same_seed_same_sample_other_seed_other_sample(inpainted, tiny_sdxl, kvasir_subset, rt_tiny_model_dir,
                                                       tmp_path):
    def run(out, seed):
        return synth_cli("--data", str(kvasir_subset), "--out", str(out), "--count", "2", "--weights", str(tiny_sdxl),
                         "--steps", "3", "--seed", str(seed), "--gate-model", str(rt_tiny_model_dir),
                         "--gate-threshold", "0", "--device", "cpu")

    run(tmp_path / "again", 7)  # batch size 1 this time: a sample depends on its seed, not its batch
    first, again = manifest(inpainted)[:2], manifest(tmp_path / "again")
    for a, b in zip(first, again):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
        np.testing.assert_allclose(read_rgb(inpainted / a["image"]).astype(int),
                                   read_rgb(tmp_path / "again" / b["image"]).astype(int), atol=1)
        assert (read_mask(inpainted / a["mask_file"]) == read_mask(tmp_path / "again" / b["mask_file"])).all()
    run(tmp_path / "other", 8)
    other = manifest(tmp_path / "other")
    assert [r["sample_seed"] for r in other] != [r["sample_seed"] for r in first]
    assert not np.array_equal(read_rgb(tmp_path / "other" / other[0]["image"]), read_rgb(inpainted / first[0]["image"]))


def test_resume_skips_done_samples_and_refuses_changed_settings(inpainted, tiny_sdxl, kvasir_subset,
                                                                 rt_tiny_model_dir, tmp_path):
    out = tmp_path / "resumed"
    args = ["--data", str(kvasir_subset), "--out", str(out), "--weights", str(tiny_sdxl), "--steps", "3", "--seed", "7",
            "--gate-model", str(rt_tiny_model_dir), "--gate-threshold", "0", "--device", "cpu"]
    synth_cli(*args, "--count", "1")
    first = (out / "images" / "syn-inpaint-s7-000000.png").stat().st_mtime_ns
    with open(out / "manifest.jsonl", "ab") as f:  # a crash in the middle of a manifest line
        f.write(b'{"index": 1, "stem": "torn')
    assert synth_cli(*args, "--count", "3")["accepted"] == 3
    rows = manifest(out)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert (out / "images" / "syn-inpaint-s7-000000.png").stat().st_mtime_ns == first  # not regenerated
    assert [r["sample_seed"] for r in rows] == [r["sample_seed"] for r in manifest(inpainted)]
    changed = RUNNER.invoke(app, ["synth", *args, "--count", "3", "--guidance-scale", "5"])
    assert changed.exit_code != 0 and "guidance_scale" in changed.output


class _Stub:
    """A gate model stand-in: predicts polyp where a test generator painted pure green, or nothing."""

    def __init__(self, finds_green: bool, image_size: int = 128):
        from types import SimpleNamespace

        self.config = SimpleNamespace(image_size=image_size, threshold=0.5)
        self.finds_green = finds_green

    def to(self, device):
        return self

    def eval(self):
        return self

    def predict_proba(self, x):
        import torch

        green = (x[:, 1:2] > 0.9) & (x[:, 0:1] < -0.9) & (x[:, 2:3] < -0.9)
        return green.float() if self.finds_green else torch.zeros_like(green, dtype=torch.float32)


def _paint_green(samples):
    out = []
    for s in samples:
        img = s.frame.copy()
        img[s.new_mask] = (0, 255, 0)
        out.append(img)
    return out


@pytest.mark.parametrize("finds_polyp", [True, False])
def test_gate_keeps_found_polyps_and_rejects_missed_ones(kvasir_subset, tmp_path, finds_polyp):
    cfg = SynthConfig(data=str(kvasir_subset), out=str(tmp_path / "gated"), count=3, method="copy-paste",
                      resolution=128, max_attempts=3, seed=1, progress=False)
    summary = run_synth(cfg, generator=_paint_green, gate=QualityGate(_Stub(finds_polyp), 0.7))
    rows = manifest(tmp_path / "gated")
    assert len(rows) == 3 and summary["tried"] == 3
    if finds_polyp:
        assert summary["acceptance_rate"] == 1.0 and all(r["gate_iou"] >= 0.7 for r in rows)
        assert len(load_synthetic(tmp_path / "gated", None, 64, 0)) == 3
    else:
        assert summary == {**summary, "accepted": 0, "acceptance_rate": 0.0, "complete": False}
        assert all(not r["accepted"] and r["gate_iou"] == 0.0 for r in rows)
        assert not (tmp_path / "gated" / "images").exists()  # the training layout holds accepted samples only
        assert len(list((tmp_path / "gated" / "rejected" / "images").glob("*.png"))) == 3
        assert len(load_synthetic(tmp_path / "gated", None, 64, 0)) == 0


def test_gate_scores_the_new_polyp_not_the_existing_one():
    """A prediction that only covers the real polyp must not pass a sample whose new polyp was missed."""
    frame = np.full((64, 64, 3), 120, np.uint8)
    existing = np.zeros((64, 64), bool)
    existing[5:45, 5:45] = True
    new = np.zeros((64, 64), bool)
    new[50:56, 50:56] = True
    frame[existing] = (0, 255, 0)  # the stub "finds" the existing polyp only
    score = QualityGate(_Stub(True, 64), 0.7).score([frame], [new], [existing])[0]
    assert score.iou == 0.0 and not score.accepted and score.iou_label > 0.9


def test_copy_paste_baseline_and_loading_for_training(kvasir_subset, tmp_path):
    out = tmp_path / "cp"
    summary = synth_cli("--data", str(kvasir_subset), "--out", str(out), "--count", "4", "--method", "copy-paste",
                        "--resolution", "128", "--no-gate", "--seed", "2")
    assert summary["accepted"] == 4
    rows = manifest(out)
    assert all(r["prompt"] is None and r["mask"]["kind"] == "annotation" and r["blend"] == "seamless" for r in rows)
    ds = load_synthetic(out, 2, 64, seed=0)
    assert ds.images.shape == (2, 64, 64, 3) and ds.masks.shape == (2, 64, 64) and ds.masks.any()
    assert load_synthetic(out, 2, 64, seed=0).stems == ds.stems
    assert all(s.startswith("syn-") for s in ds.stems)
    with pytest.raises(DatasetError, match="4 accepted"):
        load_synthetic(out, 5, 64, seed=0)
    excluded = rows[0]["sources"][0]
    kept = load_synthetic(out, None, 64, 0, exclude=[excluded])
    assert rows[0]["stem"] not in kept.stems and len(kept) == sum(excluded not in r["sources"] for r in rows)
    view = synthetic_view(out, tmp_path / "view", [excluded])
    assert load_synthetic(view, None, 64, 0).stems == kept.stems


def test_mix_by_count_or_ratio():
    assert synthetic_count(100, None, 488) == 100
    assert synthetic_count(None, 0.2, 488) == 98
    assert synthetic_count(None, None, 488) is None  # all accepted samples
    with pytest.raises(ValueError, match="not both"):
        synthetic_count(10, 0.5, 100)


def test_synthetic_weight_sets_the_synthetic_share_of_draws():
    from syndiff_trainer.data import ArrayDataset, BatchSampler
    from syndiff_trainer.recipe import Recipe
    from syndiff_trainer.train import draw_weights

    stems = [f"kvasir/{i}" for i in range(6)] + [f"clinicdb/{i}" for i in range(3)] + [f"synthetic/{i}" for i in range(40)]
    ds = ArrayDataset(np.zeros((len(stems), 8, 8, 3), np.uint8), np.zeros((len(stems), 8, 8), bool), stems)
    data = [{"name": "kvasir", "path": "k"}, {"name": "clinicdb", "path": "c"}]
    for weight, share in ((1.0, 1 / 3), (0.5, 0.2)):
        recipe = Recipe(data=data, synthetic={"path": "s", "weight": weight})
        p = BatchSampler(ds, 4, 0, source_weights=draw_weights(recipe, {"kvasir": 1.0, "clinicdb": 1.0})).p
        assert p[-40:].sum() == pytest.approx(share)  # whatever the synthetic set's size
    with pytest.raises(ValueError, match="weight"):
        Recipe(data=data, synthetic={"path": "s", "weight": 0})


def test_missing_or_incomplete_weights_fail_with_the_expected_layout(tiny_sdxl, kvasir_subset, tmp_path):
    result = RUNNER.invoke(app, ["synth", "--data", str(kvasir_subset), "--out", str(tmp_path / "o"), "--count", "1",
                                 "--weights", str(tmp_path / "nothing"), "--no-gate"])
    assert result.exit_code != 0 and "model_index.json" in result.output and "unet/" in result.output
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(WeightsError, match="unet/ has no .*safetensors"):
        check_pipeline_folder(broken)
    assert check_pipeline_folder(tiny_sdxl) == "StableDiffusionXLInpaintPipeline"


def test_painted_region_is_the_mask_grown_as_the_inpainter_was_trained_and_off_existing_polyps(tmp_path):
    new, existing = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
    new[40:50, 40:50], existing[40:50, 52:60] = True, True
    sample = Sample(0, "s", np.zeros((100, 100, 3), np.uint8), existing, new, None, None, 0)
    assert (DiffusionGenerator(None).region(sample) == new).all()  # SDXL and the like: the mask itself
    region = DiffusionGenerator(None, margin=0.03).region(sample)  # 3 px: a square grown like max-pooling
    grown = np.zeros_like(new)
    grown[37:53, 37:53] = True
    assert (region == (grown & ~existing)).all() and (region & new).sum() == new.sum()
    (tmp_path / "inp").mkdir()
    recipe = Path(__file__).resolve().parents[2] / "docs" / "runs" / "synthetic-loco" / "inpainter-7000.toml"
    shutil.copy(recipe, tmp_path / "inp" / "recipe.toml")  # an inpainter model folder holds its recipe
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "recipe.toml").write_text('name = "segmenter"\n[mask]\ndilate = 0.05\n')
    assert trained_paint_margin(tmp_path / "inp") == 0.03
    assert trained_paint_margin(tmp_path / "seg") == trained_paint_margin(tmp_path / "none") == trained_paint_margin(None) == 0.0
