"""One stage chain: the pipeline, FrameSegmenter (the plugins), `predict` and `calibrate` all go
through `stages.Stages`, so the NaN/inf guard and polyp finding hold in every one of them."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from typer.testing import CliRunner

from syndiff_stream.backends import EagerBackend
from syndiff_stream.calibration import FovSpec, _predict_frames
from syndiff_stream.cli import app
from syndiff_stream.frames import Mode
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.segment import FrameSegmenter
from syndiff_stream.sources import DemoSource
from syndiff_stream.stages import Stages
from syndiff_stream.stills import segment_stills


class Poisoned(EagerBackend):
    """The tiny model, with NaN (or inf) in the output of the calls listed in `bad`."""

    def __init__(self, seg, bad: dict):
        super().__init__(seg)
        self.bad, self.calls = bad, 0

    def infer(self, batch):
        prob = super().infer(batch).clone()
        if not batch.any():  # the pipeline's warm-up call (zeros), not a frame
            return prob
        for i in range(len(batch)):
            if self.calls in self.bad:
                prob[i, :, :3, :3] = self.bad[self.calls]
            self.calls += 1
        return prob


def frames(n=6):
    return list(DemoSource(size=(72, 90), realtime=False, frames=n, seed=3))


def test_frame_segmenter_guards_nan_and_inf_and_finds_polyps_like_the_pipeline(rt_tiny_segmenter):
    bad = {2: float("nan"), 4: float("inf")}
    host = FrameSegmenter(Poisoned(rt_tiny_segmenter, bad))
    hosted = [host(f.image) for f in frames()]
    collected, backend = [], Poisoned(rt_tiny_segmenter, bad)
    pipeline = Pipeline(DemoSource(size=(72, 90), realtime=False, frames=6, seed=3), backend, mode=Mode.RECORDED,
                        batch_size=1, stages=Stages.for_profile(backend, host.profile))
    pipeline.sinks.append(type("Sink", (), {"write": lambda self, r: collected.append(r), "close": lambda self: None})())
    pipeline.run()
    assert [r.valid for r in hosted] == [i not in bad for i in range(6)] == [r.valid for r in collected]
    for h, p in zip(hosted, collected):
        assert np.isfinite(h.prob).all()  # NaN never reached the smoother's memory
        assert np.array_equal(h.mask, p.mask) and h.polyps == p.polyps  # one chain: the same answer
    assert not hosted[4].mask.any()  # +inf is no answer, not a full-frame polyp


def test_predict_stills_guard_and_skip_unreadable(rt_tiny_segmenter, tmp_path):
    good = tmp_path / "a.png"
    cv2.imwrite(str(good), cv2.cvtColor(frames(1)[0].image, cv2.COLOR_RGB2BGR))
    (tmp_path / "text.png").write_text("not an image")
    got = dict(segment_stills([good, tmp_path / "missing.png", tmp_path / "text.png", good],
                              Poisoned(rt_tiny_segmenter, {0: float("nan")}), tmp_path))
    assert isinstance(got[tmp_path / "missing.png"], str) and "No such file" in got[tmp_path / "missing.png"]
    assert "not an image" in got[tmp_path / "text.png"]
    assert got[good].valid and (tmp_path / "a_mask.png").is_file()  # the second run of a.png: call 1, finite


def test_predict_command_does_the_rest_and_names_the_bad_ones(rt_tiny_model_dir, tmp_path):
    images = []
    for name in ("one", "two"):
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), cv2.cvtColor(frames(1)[0].image, cv2.COLOR_RGB2BGR))
        images.append(path)
    result = CliRunner().invoke(app, ["predict", str(images[0]), str(tmp_path / "gone.jpg"), str(images[1]),
                                      "--out", str(tmp_path / "out"), "--model", str(rt_tiny_model_dir)])
    assert result.exit_code == 2 and "gone.jpg" in result.output.splitlines()[-1]
    assert "WARN" not in result.output  # no OpenCV warning line before our own
    assert sorted(p.name for p in (tmp_path / "out").glob("*_mask.png")) == ["one_mask.png", "two_mask.png"]


def test_predict_reports_an_output_it_could_not_write(rt_tiny_model_dir, tmp_path):
    image = tmp_path / "one.png"
    cv2.imwrite(str(image), cv2.cvtColor(frames(1)[0].image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    (out / "one_mask.png").mkdir(parents=True)  # a folder where the mask file must go: the write fails
    result = CliRunner().invoke(app, ["predict", str(image), "--out", str(out), "--model", str(rt_tiny_model_dir)])
    assert result.exit_code == 2 and "could not write" in result.output and "polyp area" not in result.output


def test_calibration_predictions_pass_the_guard(rt_tiny_segmenter):
    from syndiff_stream.calibration import ColorSpec

    fs = frames(3)
    backend = Poisoned(rt_tiny_segmenter, {1: float("nan")})
    probs = _predict_frames(fs, FovSpec(), ColorSpec(), lambda x: backend.infer_numpy(torch.from_numpy(x)), 64)
    assert all(np.isfinite(p).all() for p in probs) and not probs[1].any()
