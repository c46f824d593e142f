import numpy as np
import pytest

from syndiff_stream.backends import make_backend
from syndiff_stream.gating import AlarmGate, GateConfig
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.postprocess import find_polyps
from syndiff_stream.sources import DemoSource


def blob(x: int, y: int = 10, r: int = 3, size=(32, 48)) -> np.ndarray:
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    return np.hypot(yy - y, xx - x) <= r


def feed(gate: AlarmGate, masks) -> list[np.ndarray]:
    return [gate.update(m, find_polyps(m))[0] for m in masks]


def test_off_is_the_identity():
    gate = AlarmGate(GateConfig.off())
    masks = [blob(10), np.zeros((32, 48), bool), blob(10) | blob(40)]
    for m, out in zip(masks, feed(gate, masks)):
        assert out is m


def test_a_polyp_is_reported_from_its_nth_consecutive_frame_and_held_m_frames():
    empty = np.zeros((32, 48), bool)
    masks = [empty] + [blob(10 + i) for i in range(6)] + [empty] * 4  # seen in frames 1..6, moving
    shown = [o.any() for o in feed(AlarmGate(GateConfig(persist=3, hold=2)), masks)]
    #          0      1      2      3     4     5     6     7     8      9      10
    assert shown == [False, False, False, True, True, True, True, True, True, False, False]


def test_held_polyp_is_drawn_at_its_last_position_and_comes_back_without_new_persistence():
    empty = np.zeros((32, 48), bool)
    gate = AlarmGate(GateConfig(persist=2, hold=3))
    out = feed(gate, [blob(10), blob(11), empty, blob(12)])
    assert not out[0].any() and out[1].sum() == blob(11).sum()
    assert np.array_equal(out[2], blob(11))  # held where it was last seen
    assert np.array_equal(out[3], blob(12))  # back within the hold: reported at once


def test_brief_blips_are_withheld_while_a_persistent_polyp_is_reported():
    gate = AlarmGate(GateConfig(persist=3, hold=0))
    frames = [blob(10) | (blob(40) if i in (2, 3) else False) for i in range(6)]  # a 2-frame blip at x=40
    out = feed(gate, frames)
    assert all(not o[:, 30:].any() for o in out)  # the blip is never reported
    assert [o[:, :20].any() for o in out] == [False, False, True, True, True, True]
    polyps = gate.update(frames[0], find_polyps(frames[0]))[1]
    assert len(polyps) == 1 and polyps[0].box == (7, 7, 14, 14)


def test_a_gap_resets_persistence_of_an_unreported_polyp():
    empty = np.zeros((32, 48), bool)
    out = feed(AlarmGate(GateConfig(persist=3, hold=5)), [blob(10), blob(10), empty, blob(10), blob(10), blob(10)])
    assert [o.any() for o in out] == [False, False, False, False, False, True]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="persist"):
        GateConfig(persist=0)


def test_pipeline_gates_the_overlay_never_the_frames(rt_tiny_segmenter):
    """Every frame comes out, untouched and on time; only mask and polyps are gated."""
    def run(gating):
        out = []

        class Sink:
            def write(self, r):
                out.append(r)

            def close(self):
                pass

        source = DemoSource(size=(72, 90), realtime=False, frames=10)
        Pipeline(source, make_backend("eager", rt_tiny_segmenter), [Sink()], mode="recorded", gating=gating).run()
        return out

    plain, gated = run(None), run(GateConfig(persist=4, hold=0))
    assert len(plain) == len(gated) == 10
    assert any(r.mask.any() for r in plain[:3])  # the tiny model predicts something at once ...
    for a, b in zip(plain, gated):
        assert a.frame.index == b.frame.index and np.array_equal(a.frame.image, b.frame.image)
        assert np.allclose(a.prob, b.prob, atol=1e-4)  # batching may change the last bits
    assert all(not r.mask.any() and not r.polyps for r in gated[:3])  # ... withheld for 3 frames


def test_run_gates_from_the_command_line_and_refuses_bad_values(rt_tiny_model_dir):
    from typer.testing import CliRunner

    from syndiff_stream.cli import app

    args = ["run", "--model", str(rt_tiny_model_dir), "--backend", "eager", "--publish", "", "--max-frames", "3",
            "--mode", "recorded", "--quiet"]
    result = CliRunner().invoke(app, args + ["--gate-persist", "2", "--gate-hold", "1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert "-> polyps -> gating persist 2, hold 1 ->" in text and "frames 3/3" in text
    result = CliRunner().invoke(app, args + ["--gate-persist", "0"])
    assert result.exit_code == 2 and "persist" in result.output and len(result.output.strip().splitlines()) == 1


def test_profile_sets_gating_and_the_command_line_wins():
    from syndiff_stream.calibration import Profile
    from syndiff_stream.cli import gating_config

    profile = Profile.model_validate({"gating": {"persist": 5, "hold": 2}})
    assert gating_config(profile) == GateConfig(persist=5, hold=2)
    assert gating_config(profile, persist=2) == GateConfig(persist=2, hold=2)
    assert gating_config(None) == GateConfig() == Profile().gating.config()  # one default, in gating.py


def test_the_labelling_a_stage_made_before_gives_the_gate_what_its_own_does():
    """With several polyps the gate needs each one's pixels: from the small-region removal's
    labelling (less what it removed) as from labelling the mask again."""
    from syndiff_stream.smoothing import remove_small_components

    speck = np.zeros((32, 48), bool)
    speck[30, 2] = True
    frames = [blob(10) | blob(30, r=4) | speck, blob(11) | blob(31, r=4), blob(12) | speck, blob(13) | blob(33, r=4)]
    given, fresh = AlarmGate(GateConfig(persist=2, hold=2)), AlarmGate(GateConfig(persist=2, hold=2))
    for frame in frames:
        mask, cc = remove_small_components(frame, 3)
        a = given.update(mask, find_polyps(mask, None, cc), cc)
        b = fresh.update(mask, find_polyps(mask))
        assert np.array_equal(a[0], b[0]) and [p.box for p in a[1]] == [p.box for p in b[1]]
