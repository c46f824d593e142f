"""Clinical video evaluation on hand-built sequences whose answers are known."""

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from syndiff_trainer.cli import app
from syndiff_trainer.video_eval import (ClipScorer, EvalInputError, Rules, bootstrap_ci, open_clips, sequence_clips,
                                        summarise, video_clip)

SIZE = (40, 60)


def disc(x: int, y: int = 20, r: int = 5) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    return np.hypot(yy - y, xx - x) <= r


EMPTY = np.zeros(SIZE, bool)


def score(truths, preds, fps=25.0, **rules) -> dict:
    scorer = ClipScorer("clip", fps, Rules(**rules))
    for t, p in zip(truths, preds):
        scorer.add(t, p)
    return scorer.result()


def test_polyp_found_at_frame_3_after_appearing_at_frame_1_is_detected_2_frames_late():
    truths = [EMPTY] + [disc(15 + i) for i in range(1, 10)]  # appears at frame 1, moves right
    preds = [EMPTY] * 3 + [disc(15 + i) for i in range(3, 10)]  # found from frame 3 on
    (polyp,) = score(truths, preds)["polyps"]
    assert polyp["first_frame"] == 1 and polyp["detected"] and polyp["detected_at"] == 3
    assert polyp["ttd_frames"] == 2 and polyp["ttd_ms"] == 80.0  # 2 frames at 25 fps


def test_detection_needs_k_consecutive_hits_and_a_miss_counts_against_sensitivity():
    truths = [disc(20)] * 10
    preds = [EMPTY, EMPTY, disc(20), EMPTY, disc(20), disc(20), disc(20), EMPTY, EMPTY, EMPTY]
    assert score(truths, preds, min_hits=1)["polyps"][0]["ttd_frames"] == 2
    assert score(truths, preds, min_hits=3)["polyps"][0]["ttd_frames"] == 4
    missed = score(truths, preds, min_hits=4)
    assert not missed["polyps"][0]["detected"]
    s = summarise([score(truths, preds, min_hits=3), missed])
    assert s["polyps"] == 2 and s["detected"] == 1 and s["sensitivity"] == 0.5
    assert s["ttd_frames"] == {"median": 4.0, "worst": 4.0, "mean": 4.0}


def test_hit_rule_is_iou_of_touching_predictions_at_least_0_1():
    truth = disc(20, r=8)  # 197 pixels
    sliver = disc(20, r=2)  # inside it, IoU 13/197 < 0.1
    assert not score([truth], [sliver])["polyps"][0]["detected"]
    assert score([truth], [disc(20, r=3)])["polyps"][0]["detected"]  # 29/197 >= 0.1


def test_two_separate_polyps_are_two_tracks_and_a_gap_splits_a_track():
    truths = [disc(10) | disc(45)] * 3 + [EMPTY] + [disc(10)] * 2
    r = score(truths, truths)
    assert [p["first_frame"] for p in r["polyps"]] == [0, 0, 4]
    assert score(truths, truths, polyps="clip")["polyps"][0]["frames"] == 5  # one polyp per clip


def test_false_alarm_events_per_minute_and_fp_rate_on_polyp_free_frames():
    truths = [EMPTY] * 5 + [disc(10)] * 5
    fa = disc(45, r=3)
    preds = [EMPTY, fa, fa, fa, EMPTY,  # a 3-frame false alarm on polyp-free frames
             disc(10), disc(10) | fa, disc(10), disc(10), disc(10)]  # a 1-frame one beside the polyp
    s1 = summarise([score(truths, preds, fa_frames=1)])
    assert s1["false_alarm_events"] == 2
    assert s1["false_alarms_per_minute"] == pytest.approx(2 / (10 / 25 / 60), abs=1e-3)  # 300 per minute
    assert summarise([score(truths, preds, fa_frames=2)])["false_alarm_events"] == 1
    assert s1["polyp_free_frames"] == 5 and s1["fp_rate_polyp_free_frames"] == 0.6
    assert s1["sensitivity"] == 1.0 and s1["ttd_frames"]["worst"] == 0.0


def test_flicker_of_prediction_next_to_truth_and_dice_on_positive_frames():
    truths = [disc(20)] * 4
    preds = [disc(20), EMPTY, disc(20), EMPTY]
    s = summarise([score(truths, preds)])
    assert s["flicker_truth"] == 0.0 and s["flicker_pred"] == 1.0
    assert s["dice_all"]["mean"] == 0.5 and s["dice_positive"]["frames"] == 4


def test_bootstrap_resamples_clips():
    mean, lo, hi = bootstrap_ci([[1.0] * 10, [0.0] * 10])
    assert mean == 0.5 and lo == 0.0 and hi == 1.0  # two clips: any resample is all of one, the other, or both
    assert bootstrap_ci([[0.7] * 5]) == (0.7, 0.7, 0.7)


# ---- inputs -------------------------------------------------------------------------------------

def write_sequences(root: Path, lengths=(6, 5), size=SIZE) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, n = ["frame,sequence"], 0
    rng = np.random.default_rng(0)
    for seq, length in enumerate(lengths, start=1):
        for i in range(length):
            n += 1
            img = np.full(size + (3,), (170, 80, 70), np.uint8) + rng.integers(0, 20, size + (3,), dtype=np.uint8)
            m = disc(20 + 2 * i)
            img[m] = (230, 130, 120)
            cv2.imwrite(str(root / "images" / f"{n}.png"), img)
            cv2.imwrite(str(root / "masks" / f"{n}.png"), m.astype(np.uint8) * 255)
            rows.append(f"{n},{seq}")
    (root / "sequences.csv").write_text("\n".join(rows) + "\n")
    return root


def test_sequences_become_clips_in_frame_order(tmp_path):
    clips = sequence_clips(write_sequences(tmp_path / "d", (6, 5)), fps=10)
    assert [(c.name, c.frames, c.fps) for c in clips] == [("sequence 1", 6, 10), ("sequence 2", 5, 10)]
    frames = list(clips[1].open())
    assert [f.index for f in frames] == list(range(5)) and np.array_equal(frames[0].truth, disc(20))


def test_pseudo_video_is_one_clip_per_still_with_moving_true_masks(tmp_path):
    write_sequences(tmp_path / "d", (3,))
    clips, kind = open_clips(f"pseudo:{tmp_path / 'd'}", frames_per_image=4, limit=2)
    assert kind == "pseudo" and [(c.frames, c.fps) for c in clips] == [(4, 25.0), (4, 25.0)]
    frames = list(clips[1].open())
    assert len(frames) == 4 and all(f.truth is not None and f.truth.any() for f in frames)
    assert frames[0].image.shape == (288, 384, 3)


def test_bad_sequences_are_one_line_errors_naming_the_file(tmp_path):
    root = write_sequences(tmp_path / "d")
    (root / "sequences.csv").write_text("frame,sequence\n1,1\n99,1\n")
    with pytest.raises(EvalInputError, match=r"sequences.csv line 3: frame '99' has no image"):
        sequence_clips(root)
    (root / "sequences.csv").write_text("frame,sequence\n1,1\n2,1\n")
    cv2.imwrite(str(root / "masks" / "2.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(EvalInputError, match=r"masks/2.png: mask size \(10, 10\) does not match"):
        sequence_clips(root)


def write_video(path: Path, frames: int, size=SIZE) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        for i in range(frames):
            img = np.full(size + (3,), 120, np.uint8)
            container.mux(stream.encode(__import__("av").VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))


def test_video_masks_must_match_in_count_and_size_and_a_video_must_have_frames(tmp_path):
    video, masks = tmp_path / "v.mp4", tmp_path / "m"
    write_video(video, 5)
    masks.mkdir()
    for i in range(4):
        cv2.imwrite(str(masks / f"{i}.png"), np.zeros(SIZE, np.uint8))
    with pytest.raises(EvalInputError, match=r"4 masks for the 5 frames of .*v.mp4"):
        video_clip(video, masks)
    cv2.imwrite(str(masks / "4.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(EvalInputError, match=r"4.png: mask size \(8, 8\) does not match the frames of"):
        video_clip(video, masks)
    cv2.imwrite(str(masks / "4.png"), np.zeros(SIZE, np.uint8))
    clip = video_clip(video, masks)
    assert clip.frames == 5 and clip.fps == 25 and len(list(clip.open())) == 5
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(EvalInputError, match="junk.mp4"):
        open_clips(str(junk), masks)


# ---- the command, end to end on a tiny model ----------------------------------------------------

def test_eval_video_command_json_and_report(tmp_path, rt_tiny_model_dir):
    data = write_sequences(tmp_path / "d", (6, 5))
    runner = CliRunner()
    res = runner.invoke(app, ["eval-video", str(data), "--model", str(rt_tiny_model_dir), "--backend", "eager",
                              "--device", "cpu", "--gate-persist", "2", "--sweep", "1-3", "--json",
                              "--report", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    s = out["summary"]
    assert s["clips"] == 2 and s["frames"] == 11 and s["polyps"] == 2  # one polyp per sequence
    assert [r["persist"] for r in out["gating_sweep"]] == [1, 2, 3]
    assert out["gating_sweep"][1]["dice_all"] == s["dice_all"]["mean"]  # the replay is the runtime's gate
    assert out["settings"]["gate_persist"] == 2 and s["latency_ms"]["p50"] > 0
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "://" not in page  # nothing to fetch (":" is not base64)


def test_eval_video_takes_a_calibration_profile_like_run(tmp_path, rt_tiny_model_dir):
    from syndiff_stream.calibration import Profile, save_profile

    data = write_sequences(tmp_path / "d", (5,))
    profile = save_profile(Profile(threshold=0.3, gating={"persist": 4, "hold": 1}), tmp_path / "p.json")
    res = CliRunner().invoke(app, ["eval-video", str(data), "--model", str(rt_tiny_model_dir), "--backend", "eager",
                                   "--device", "cpu", "--profile", str(profile), "--sweep", "", "--json"])
    assert res.exit_code == 0, res.output
    settings = json.loads(res.stdout.strip().splitlines()[-1])["settings"]
    assert (settings["gate_persist"], settings["gate_hold"], settings["threshold"]) == (4, 1, 0.3)


def test_eval_video_bad_input_is_one_line_before_any_work(tmp_path):
    data = write_sequences(tmp_path / "d")
    (data / "sequences.csv").write_text("frame,sequence\n1,1\n42,1\n")
    res = CliRunner().invoke(app, ["eval-video", str(data), "--model", str(tmp_path / "no-model")])
    assert res.exit_code == 2
    assert "frame '42' has no image" in res.output and len(res.output.strip().splitlines()) == 1


# ---- the report in a real browser ---------------------------------------------------------------

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian chromium not installed (.ci/system-deps installs it)")
def test_report_renders_with_its_plots_in_headless_chromium(tmp_path, rt_tiny_model_dir):
    data = write_sequences(tmp_path / "d", (8,))
    res = CliRunner().invoke(app, ["eval-video", str(data), "--model", str(rt_tiny_model_dir), "--backend", "eager",
                                   "--device", "cpu", "--sweep", "1-4", "--report", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,2400",
                    f"--screenshot={shot}", (tmp_path / "rep" / "index.html").as_uri()],
                   check=True, timeout=120, capture_output=True)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (2400, 1200)
    # The page is black text on white; the plots bring colour: the gating curve's blue line, the
    # timeline's green/gold bands. Count strongly coloured pixels in the screenshot.
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    coloured = (hsv[..., 1] > 80) & (hsv[..., 2] > 60)
    assert coloured.sum() > 2000, "no plots visible in the rendered report"
    rows = np.flatnonzero(coloured.sum(axis=1) > 20)
    assert len(rows) and rows.max() - rows.min() > 200  # several plots, not one stray strip


def test_a_video_without_polyps_scores_with_no_undefined_numbers():
    s = summarise([score([EMPTY] * 4, [EMPTY, disc(20), EMPTY, EMPTY])])
    assert s["polyps"] == 0 and s["sensitivity"] is None and s["ttd_ms"]["median"] is None
    assert s["dice_positive"] == {"mean": None, "ci95": [None, None], "frames": 0}
    assert s["fp_rate_polyp_free_frames"] == 0.25 and s["false_alarm_events"] == 1
    json.dumps(s, allow_nan=False)  # strict JSON


def test_eval_video_scores_only_sequences_the_checkpoint_never_trained_on(tmp_path, rt_tiny_model_dir):
    """A checkpoint whose manifest names this folder and whose split trained on sequence 1 is
    scored on sequence 2 alone; --split all scores both; a checkpoint without a manifest warns."""
    import shutil

    data = write_sequences(tmp_path / "d", (6, 5))
    model = tmp_path / "model"
    shutil.copytree(rt_tiny_model_dir, model)
    (model / "manifest.json").write_text(json.dumps({"sources": [{"name": "clinicdb", "path": str(data)}]}))
    (model / "split.json").write_text(json.dumps({"train": [f"clinicdb/{n}" for n in range(1, 7)],
                                                  "val": [f"clinicdb/{n}" for n in range(7, 12)]}))
    runner = CliRunner()
    common = ["--backend", "eager", "--device", "cpu", "--sweep", "", "--json"]
    res = runner.invoke(app, ["eval-video", str(data), "--model", str(model), *common])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["summary"]["frames"] == 5
    assert "scoring the 1 of 2 clips" in res.stderr
    every = runner.invoke(app, ["eval-video", str(data), "--model", str(model), "--split", "all", *common])
    assert json.loads(every.stdout.strip().splitlines()[-1])["summary"]["frames"] == 11
    bare = runner.invoke(app, ["eval-video", str(data), "--model", str(rt_tiny_model_dir), *common])
    assert bare.exit_code == 0 and "records no training manifest" in bare.stderr


def test_a_folder_without_masks_is_polyp_free_clips_scored_for_alarms(tmp_path, rt_tiny_model_dir):
    root = write_sequences(tmp_path / "d", (4, 3))
    for mask in (root / "masks").iterdir():
        mask.unlink()
    (root / "masks").rmdir()
    clips = sequence_clips(root, fps=5)
    frames = list(clips[0].open())
    assert [c.frames for c in clips] == [4, 3] and all(f.truth is not None and not f.truth.any() for f in frames)
    res = CliRunner().invoke(app, ["eval-video", str(root), "--fps", "5", "--model", str(rt_tiny_model_dir),
                                   "--backend", "eager", "--device", "cpu", "--sweep", "1,3", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.strip().splitlines()[-1])["summary"]
    assert s["polyps"] == 0 and s["polyp_free_frames"] == 7 and s["sensitivity"] is None
    assert 0 <= s["polyp_free_frames_with_alarm"] <= 7 and s["false_alarms_per_minute"] is not None
    text = CliRunner().invoke(app, ["eval-video", str(root), "--fps", "5", "--model", str(rt_tiny_model_dir),
                                    "--backend", "eager", "--device", "cpu", "--sweep", ""])
    assert text.exit_code == 0 and "all polyp-free: an alarm on" in text.stdout
