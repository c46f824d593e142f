"""The Holoscan operator in a small Holoscan application, with CPU data (no GPU needed)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from syndiff_stream.overlay import render_overlay
from syndiff_stream.segment import FrameSegmenter
from syndiff_stream.sources import DemoSource

HOLOSCAN = Path(__file__).resolve().parents[1] / "plugins" / "holoscan"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("holoscan") is None,
                                reason="holoscan not installed: pip install -e '.[holoscan]'")


@pytest.fixture(scope="module")
def holo():
    sys.path.insert(0, str(HOLOSCAN))
    try:
        import segmentation_app as app
        import syndiff_holoscan
    finally:
        sys.path.remove(str(HOLOSCAN))
    return app, syndiff_holoscan


def test_operator_in_an_application_matches_the_segmenter(holo, rt_tiny_model_dir):
    app_mod, op_mod = holo
    from holoscan.conditions import CountCondition
    from holoscan.core import Application, Operator

    class Collect(Operator):
        def __init__(self, fragment, *args, **kwargs):
            self.masks, self.overlays = [], []
            super().__init__(fragment, *args, **kwargs)

        def setup(self, spec):
            spec.input("mask")
            spec.input("overlay")

        def compute(self, op_input, op_output, context):
            self.masks.append(np.asarray(op_input.receive("mask")["mask"]).copy())
            self.overlays.append(np.asarray(op_input.receive("overlay")["overlay"]).copy())

    frames = list(DemoSource(size=(96, 128), realtime=False, frames=4, seed=4))

    class TestApp(Application):
        def compose(self):
            source = app_mod.FrameSourceOp(self, CountCondition(self, len(frames)), frames=frames, name="source")
            seg = op_mod.SyndiffSegOp(self, model=str(rt_tiny_model_dir), name="syndiff")
            self.sink = Collect(self, name="sink")
            self.add_flow(source, seg, {("frame", "frame")})
            self.add_flow(seg, self.sink, {("mask", "mask"), ("overlay", "overlay")})

    application = TestApp()
    application.run()
    reference = FrameSegmenter.load(rt_tiny_model_dir)
    assert len(application.sink.masks) == len(frames)
    for frame, mask, overlay in zip(frames, application.sink.masks, application.sink.overlays):
        expected = reference(frame.image)
        assert mask.shape == (96, 128, 1) and mask.dtype == np.uint8
        assert np.array_equal(mask[..., 0] > 0, expected.mask)
        assert np.array_equal(overlay, render_overlay(frame.image, expected.mask))


def test_input_tensor_forms(holo):
    _, op_mod = holo
    image = np.random.default_rng(0).integers(0, 255, (8, 10, 4), dtype=np.uint8)
    assert np.array_equal(op_mod.to_host_image({"video": image}), image[..., :3])
    assert np.array_equal(op_mod.to_host_image({"a": image[None, ..., :3], "b": 0}, "a"), image[..., :3])
    with pytest.raises(ValueError, match="RGB uint8"):
        op_mod.to_host_image(image.astype(np.float32))


def test_example_app_writes_an_overlay_video(holo, rt_tiny_model_dir, tmp_path):
    app_mod, _ = holo
    import av

    assert app_mod.main(["demo", "--frames", "3", "--out", str(tmp_path / "o.mp4"), "--model", str(rt_tiny_model_dir)]) == 0
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 3
