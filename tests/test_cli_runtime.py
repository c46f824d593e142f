import json
import re
import threading

import av
import pytest
import torch
from typer.testing import CliRunner

from conftest import RT_TINY_CONFIG, rt_write_video
from syndiff_stream.backends import make_backend
from syndiff_stream.cli import app
from syndiff_stream.model import Segmenter, preset_config
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.publish import Publisher
from syndiff_stream.sources import open_source
from syndiff_stream.subscribe import Subscriber

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def frames_in(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_run_file_to_every_sink_and_subscriber(rt_tiny_model_dir, rt_video, tmp_path, rt_endpoint):
    received = []
    with Subscriber(rt_endpoint) as sub:
        reader = threading.Thread(target=lambda: received.extend(sub.messages(timeout=60)))
        reader.start()
        result = invoke("run", rt_video, "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", rt_endpoint,
                        "--wait-subscribers", 1, "--encoding", "rle", "--overlay", tmp_path / "o.mp4",
                        "--masks", tmp_path / "m", "--jsonl", tmp_path / "f.jsonl", "--quiet")
        reader.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert "frames 12/12" in result.output
    assert len(received) == 12 and received[0].mask.shape == (120, 160)
    assert frames_in(tmp_path / "o.mp4") == 12
    assert len(list((tmp_path / "m").glob("*.png"))) == 12
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 12


def test_run_demo_by_default(rt_tiny_model_dir):
    result = invoke("run", "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", "",
                    "--max-frames", 3, "--fps", 100)
    assert result.exit_code == 0, result.output
    assert "demo:0" in result.output and "live buffer" in result.output
    out, taken, dropped = (int(v) for v in re.search(r"frames (\d+)/(\d+) .* dropped (\d+)", result.output).groups())
    assert taken == 3 and out + dropped == 3  # live mode may drop on a busy machine, but counts what it drops


@pytest.mark.parametrize("args, named", [
    (["run", "missing.mp4"], "missing.mp4"),
    (["run", "demo", "--mode", "fast"], "--mode"),
    (["run", "demo", "--backend", "turbo"], "turbo"),
    (["run", "demo", "--device", "tpu"], "--device"),
    (["bench", "--frames", "0"], "--frames"),
])
def test_bad_input_is_one_line_and_exit_2(rt_tiny_model_dir, args, named):
    result = invoke(*args, "--model", rt_tiny_model_dir)
    assert result.exit_code == 2
    assert named in result.output and len(result.output.strip().splitlines()) == 1


def test_bad_model_is_named(tmp_path):
    result = invoke("run", "demo", "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "nope" in result.output


def test_batch_is_resumable(rt_tiny_model_dir, tmp_path):
    videos = []
    for name in ("a", "b"):
        rt_write_video(tmp_path / f"{name}.mp4", frames=6, size=(60, 80))
        videos.append(tmp_path / f"{name}.mp4")
    out = tmp_path / "out"
    (out / ".b.partial").mkdir(parents=True)  # debris of an interrupted earlier run
    result = invoke("batch", *videos, "--out", out, "--model", rt_tiny_model_dir, "--backend", "eager")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    for name in ("a", "b"):
        folder = out / name
        assert (folder / ".done").is_file() and frames_in(folder / "overlay.mp4") == 6
        assert len(list((folder / "masks").glob("*.png"))) == 6
        assert json.loads((folder / "summary.json").read_text())["frames_out"] == 6
    stamp = (out / "a" / "frames.jsonl").stat().st_mtime_ns
    again = invoke("batch", *videos, "--out", out, "--model", rt_tiny_model_dir, "--backend", "eager")
    assert again.exit_code == 0 and "skipped" in again.output
    assert (out / "a" / "frames.jsonl").stat().st_mtime_ns == stamp


def test_bench_prints_one_json_object(rt_tiny_model_dir):
    result = invoke("bench", "--model", rt_tiny_model_dir, "--backend", "eager", "--frames", 8,
                    "--compare-steps", 3, "--compare-frames", 1, "--smoothing", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("device", "backend", "model_params", "input_size", "frames", "decode_fps", "model_fps", "e2e_fps",
                "latency_ms", "dropped", "multistep_fps", "speedup"):
        assert key in report, key
    assert report["frames"] == 8 and report["backend"] == "eager" and report["input_size"] == 64
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    # timings are reported, never asserted: only that the speedup is the ratio it says, with its spread
    low, high = report["speedup_range"]
    assert low <= report["speedup"] <= high and report["compare_repeats"] >= 3
    assert {"dice_raw", "dice_smoothed", "flicker_raw", "flicker_smoothed"} <= set(report["smoothing"])


def test_bench_compares_models_side_by_side(rt_tiny_model_dir, tmp_path):
    wider = tmp_path / "wider"
    torch.manual_seed(1)
    Segmenter(preset_config("compact", **{**RT_TINY_CONFIG, "cond_channels": 8})).save_pretrained(wider)
    result = invoke("bench", "--model", rt_tiny_model_dir, "--backend", "eager", "--frames", 4,
                    "--compare-model", wider, "--compare-rounds", 2, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    models = report["compare_models"]
    assert list(models) == ["model", str(wider)] and report["compare_models_rounds"] == 2
    assert models["model"]["ratio"] == 1.0 and models["model"]["params"] == report["model_params"]
    assert models[str(wider)]["params"] > report["model_params"]
    low, high = models[str(wider)]["ratio_range"]
    assert low <= models[str(wider)]["ratio"] <= high and models[str(wider)]["ms_per_frame"] > 0

    missing = invoke("bench", "--model", rt_tiny_model_dir, "--compare-model", tmp_path / "nope", "--json")
    assert missing.exit_code == 2 and "nope" in missing.output and len(missing.output.strip().splitlines()) == 1


def test_tta_option_reaches_the_model(rt_tiny_model_dir, monkeypatch):
    """--tta turns flip TTA on in the model every backend runs; the bench report says so, and
    --compare-model with the same folder times the model without it, side by side."""
    import syndiff_stream.benchmark as benchmark

    seen = []
    real = benchmark.run_benchmark

    def spy(seg, backend, *args, **kwargs):
        seen.append((seg.config.tta_flip, {k: b.seg.config.tta_flip for k, b in kwargs["compare_backends"].items()}))
        return real(seg, backend, *args, **kwargs)

    monkeypatch.setattr(benchmark, "run_benchmark", spy)
    result = invoke("bench", "--model", rt_tiny_model_dir, "--backend", "eager", "--frames", 2, "--tta",
                    "--compare-model", rt_tiny_model_dir, "--compare-rounds", 1, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tta"] is True
    assert seen == [(True, {str(rt_tiny_model_dir): False})]


def test_view_records_overlays_to_a_file(rt_tiny_segmenter, rt_video, tmp_path, rt_endpoint):
    # The publishing side runs through the Python API in a thread: CliRunner swaps sys.stdout,
    # so two CLI invocations cannot run at once.
    pub = Publisher(rt_endpoint, overlay=True)

    def publish():
        if pub.wait_for_subscribers(1, timeout=60):
            Pipeline(open_source(str(rt_video)), make_backend("eager", rt_tiny_segmenter), [pub]).run()

    sender = threading.Thread(target=publish)
    sender.start()
    result = invoke("view", rt_endpoint, "--out", tmp_path / "v.mp4", "--timeout", 60)
    sender.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert frames_in(tmp_path / "v.mp4") == 12 and "12 frames" in result.output


def test_view_without_display_asks_for_a_file(monkeypatch, rt_endpoint):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    result = invoke("view", rt_endpoint)
    assert result.exit_code == 2 and "--out" in result.output


def test_live_mode_on_a_file_plays_at_its_frame_rate(rt_tiny_model_dir, rt_video):
    import time

    start = time.perf_counter()
    result = invoke("run", rt_video, "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", "",
                    "--mode", "live", "--quiet")
    assert result.exit_code == 0, result.output
    assert "live buffer" in result.output and time.perf_counter() - start >= 11 / 25


def test_batch_skips_a_missing_input_and_does_the_others(rt_tiny_model_dir, tmp_path):
    rt_write_video(tmp_path / "a.mp4", frames=4, size=(60, 80))
    (tmp_path / "text.mp4").write_text("not a video")
    result = invoke("batch", tmp_path / "gone.mp4", tmp_path / "text.mp4", tmp_path / "a.mp4", "--out",
                    tmp_path / "out", "--model", rt_tiny_model_dir, "--backend", "eager")
    assert result.exit_code == 2 and "2 of 3 inputs failed and were skipped" in result.output
    assert "gone.mp4" in result.output and "text.mp4" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a"] and (tmp_path / "out" / "a" / ".done").is_file()


@pytest.mark.parametrize("endpoint, says", [
    ("tcp://127.0.0.1:99999", "99999"), ("foo", "not a ZeroMQ endpoint"), ("tcp://999.1.1.1:5556", "not an IP"),
])
def test_bad_endpoints_are_one_line(rt_tiny_model_dir, endpoint, says):
    run = ["run", "demo", "--model", rt_tiny_model_dir, "--backend", "eager"]
    for args in ([*run, "--publish", endpoint], [*run, "--publish", "", "--reliable", endpoint],
                 ["view", endpoint, "--out", "never.mp4"]):
        result = invoke(*args)
        assert result.exit_code == 2 and says in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "reachable" not in result.output


def test_view_with_no_publisher_fails_and_writes_nothing(tmp_path, rt_endpoint):
    result = invoke("view", rt_endpoint, "--out", tmp_path / "v.mp4", "--timeout", 0.5)
    assert result.exit_code == 2 and "nothing received" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_text_file_named_mp4_is_one_clear_line(rt_tiny_model_dir, tmp_path):
    (tmp_path / "fake.mp4").write_text("hello, not a video\n")
    result = invoke("run", tmp_path / "fake.mp4", "--model", rt_tiny_model_dir, "--publish", "", "--backend", "eager")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "fake.mp4" in result.output and "Errno" not in result.output and "not a video" in result.output


def test_live_drops_are_explained_by_their_cause():
    from syndiff_stream.cli import live_drops_explained
    from syndiff_stream.pipeline import Stats

    stats = Stats(mode="live", dropped=4, dropped_late=1, dropped_capacity=3, latency_budget_s=0.12)
    line = live_drops_explained(stats)
    assert "3 for capacity" in line and "1 late" in line and "120 ms budget" in line
    assert "late" not in live_drops_explained(Stats(mode="live", dropped=2, dropped_capacity=2))
