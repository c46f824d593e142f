"""A short real train -> eval run on a few shared Kvasir-SEG images must beat an untrained model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from syndiff_stream.model import Segmenter, preset_config
from syndiff_trainer.cli import app


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_short_training_beats_an_untrained_model(kvasir_40, tmp_path):
    torch.manual_seed(0)
    untrained = Segmenter(preset_config("tiny", image_size=64))
    untrained.save_pretrained(tmp_path / "untrained")
    out = tmp_path / "run"
    run("fit", "--data", kvasir_40, "--out", out, "--preset", "tiny", "--image-size", 64, "--steps", 150,
        "--batch-size", 8, "--lr", 3e-3, "--warmup-steps", 20, "--val-every", 50, "--mask-ae-steps", 200,
        "--val-fraction", 0.2, "--ema-decay", 0.9, "--mask-loss-weight", 1)
    split = out / "split.json"
    assert len(json.loads(split.read_text())["val"]) == 8
    scores = {}
    for name in ("untrained", "trained"):
        model = tmp_path / "untrained" if name == "untrained" else out / "best"
        scores[name] = json.loads(run("eval", "--data", kvasir_40, "--model", model, "--split-file", split, "--json"))
    trained, untrained = scores["trained"], scores["untrained"]
    assert trained["n"] == 8 and set(trained) >= {"dice", "iou", "hd95", "nsd", "dice_std", "iou_std"}
    # 150 steps of a 67k-parameter model at 64 px: far from converged, but clearly better on overlap
    # and on boundaries (seeded, so the margin is reproducible)
    assert trained["dice"] > untrained["dice"] + 0.03, scores
    assert trained["hd95"] < untrained["hd95"] - 5, scores


def test_training_resumes_where_it_stopped(kvasir_40, tmp_path):
    out = tmp_path / "run"
    common = ["fit", "--data", kvasir_40, "--out", out, "--preset", "tiny", "--image-size", 64, "--batch-size", 2,
              "--val-every", 2, "--mask-ae-steps", 4]
    run(*common, "--steps", 2)
    state = json.loads((out / "state" / "state.json").read_text())
    assert state["step"] == 2
    output = run(*common, "--steps", 4)
    assert "resuming at step 2" in output
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 4
    assert (out / "best" / "model.safetensors").is_file() and (out / "mask_ae" / "config.json").is_file()


def test_eval_names_a_bad_checkpoint(kvasir_40, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--data", str(kvasir_40), "--model", str(tmp_path / "none")])
    assert result.exit_code == 2 and "does not exist" in result.output
