"""presence.py: a presence head fitted on a finished, frozen segmenter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from syndiff_stream.model import CheckpointError, Segmenter
from syndiff_trainer.cli import app
from syndiff_trainer.presence import ARGS_NAME, LOG_NAME, PresenceOptions, presence_head


@pytest.fixture(scope="module")
def finished(kvasir_40, tmp_path_factory):
    """A tiny finished run's model/ folder (focused timesteps, as the presets train)."""
    from recipes import tiny_recipe

    from syndiff_trainer.train import RunOptions, fit

    root = tmp_path_factory.mktemp("presence")
    fit(tiny_recipe(("kvasir", kvasir_40, "phash")),
        RunOptions(out=str(root / "run"), progress=False, threads=1, cache_dir=str(root / "cache")))
    return root / "run" / "model"


def test_the_head_is_fitted_and_the_segmenter_left_bit_for_bit(finished, tmp_path):
    record = presence_head(finished, tmp_path / "out", PresenceOptions(steps=3, batch_size=4, log_every=1))
    source, fitted = Segmenter.from_pretrained(finished), Segmenter.from_pretrained(tmp_path / "out")
    assert fitted.presence is not None and fitted.config.presence_head
    theirs = source.state_dict()
    for name, tensor in fitted.state_dict().items():
        if not name.startswith("presence."):
            assert torch.equal(tensor, theirs[name]), name
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(fitted.predict_proba(x), source.predict_proba(x) * fitted.predict_presence(x).view(-1, 1, 1, 1))
    assert record["data"]["frames"] > 0 and record["data"]["crops"] + record["data"]["erased"] > 0
    assert [json.loads(r)["step"] for r in (tmp_path / "out" / LOG_NAME).read_text().splitlines()] == [1, 2, 3]
    for name in (ARGS_NAME, "recipe.toml", "split.json", "manifest.json"):
        assert (tmp_path / "out" / name).is_file(), name


def test_the_same_arguments_give_the_same_head(finished, tmp_path):
    for k in (0, 1):
        presence_head(finished, tmp_path / f"o{k}", PresenceOptions(steps=2, batch_size=4))
    a, b = (Segmenter.from_pretrained(tmp_path / f"o{k}").presence.state_dict() for k in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_what_it_refuses_is_one_line_and_writes_nothing(finished, tmp_path):
    with pytest.raises(Exception, match="beside the source"):
        presence_head(finished, finished, PresenceOptions(steps=1, batch_size=2))
    bare = tmp_path / "bare"
    shutil.copytree(finished, bare)
    (bare / "split.json").unlink()
    with pytest.raises(CheckpointError, match="split.json is missing"):
        presence_head(bare, tmp_path / "never", PresenceOptions(steps=1, batch_size=2))
    assert not (tmp_path / "never").exists()
    presence_head(finished, tmp_path / "once", PresenceOptions(steps=1, batch_size=2))
    with pytest.raises(CheckpointError, match="has a presence head already"):
        presence_head(tmp_path / "once", tmp_path / "twice", PresenceOptions(steps=1, batch_size=2))
    result = CliRunner().invoke(app, ["presence-head", "--model", str(bare), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "split.json is missing" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_command_writes_a_checkpoint_that_says_what_comes_next(finished, tmp_path):
    result = CliRunner().invoke(app, ["presence-head", "--model", str(finished), "--out", str(tmp_path / "cli"),
                                      "--steps", "2", "--batch-size", "4", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "operating-point --model" in result.output
    assert json.loads((tmp_path / "cli" / ARGS_NAME).read_text())["options"]["steps"] == 2
