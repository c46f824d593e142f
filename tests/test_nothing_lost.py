"""Nothing lost: in recorded mode and `batch`, every input frame gets exactly one mask and one
stats row, in order; a batch killed midway and restarted ends with no gaps and no duplicates."""

from __future__ import annotations

import json
import signal
import threading

import cv2
from typer.testing import CliRunner

from conftest import rt_write_video
from rt_faults import partial_files, start_cli, video_frames, wait_for
from syndiff_stream.cli import app
from syndiff_stream.subscribe import Subscriber

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_complete(folder, frames: int, shape) -> None:
    """One mask PNG and one JSONL row per frame, indices 0..frames-1 in order, and a video of them."""
    rows = [json.loads(line) for line in (folder / "frames.jsonl").read_text().splitlines()]
    assert [r["frame_index"] for r in rows] == list(range(frames))
    masks = sorted((folder / "masks").iterdir())
    assert [p.name for p in masks] == [f"{i:06d}.png" for i in range(frames)]
    assert all(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).shape == shape for p in masks)
    assert video_frames(folder / "overlay.mp4") == frames


def test_recorded_run_gives_every_frame_one_mask_one_row_and_one_message(tmp_path, rt_tiny_model_dir, rt_endpoint):
    rt_write_video(tmp_path / "clip.mp4", frames=40, size=(60, 80))
    received = []
    with Subscriber(rt_endpoint, reliable=True, hwm=2) as sub:  # the reliable channel: the run waits for it
        reader = threading.Thread(target=lambda: received.extend(sub.messages(timeout=60)))
        reader.start()
        result = invoke("run", tmp_path / "clip.mp4", "--model", rt_tiny_model_dir, "--backend", "eager",
                        "--publish", "", "--reliable", rt_endpoint, "--masks", tmp_path / "masks",
                        "--jsonl", tmp_path / "frames.jsonl", "--overlay", tmp_path / "overlay.mp4", "--quiet")
        reader.join(timeout=60)
        missed = sub.missed
    assert result.exit_code == 0, result.output
    assert "frames 40/40" in result.output
    assert_complete(tmp_path, 40, (60, 80))
    assert [m.header["frame_index"] for m in received] == list(range(40)) and missed == 0


def test_batch_killed_midway_then_restarted_has_no_gaps_and_no_duplicates(tmp_path, rt_tiny_model_dir):
    videos = []
    for name in ("a", "b", "c"):
        rt_write_video(tmp_path / f"{name}.mp4", frames=90, size=(60, 80), seed=len(videos))
        videos.append(tmp_path / f"{name}.mp4")
    out = tmp_path / "out"
    args = ["batch", *videos, "--out", out, "--model", rt_tiny_model_dir, "--backend", "eager"]
    proc = start_cli(*args)
    try:  # kill -9 while b is half done: no chance to clean up
        wait_for(lambda: len(list((out / ".b.partial" / "masks").glob("*.png"))) >= 3, 90, "b half done", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert (out / "a" / ".done").is_file() and not (out / "b").exists() and not (out / "c").exists()
    finished_a = (out / "a" / "frames.jsonl").stat().st_mtime_ns

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]
    for name in ("a", "b", "c"):
        assert_complete(out / name, 90, (60, 80))
        assert json.loads((out / name / "summary.json").read_text())["frames_out"] == 90
    assert (out / "a" / "frames.jsonl").stat().st_mtime_ns == finished_a  # done once, kept
    assert partial_files(out) == []
