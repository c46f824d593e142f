"""`batch --engine ray` on a local Ray cluster started here (2 CPUs): the local engine's folders,
every video exactly once through a worker crash, a corrupt video reported while the others finish."""

import importlib.util
import json
import os
import sys

import pytest
from typer.testing import CliRunner

from conftest import rt_write_video
from syndiff_stream.batch import BatchError
from syndiff_stream.batch_ray import KILL_ONCE_ENV, import_ray
from syndiff_stream.cli import app

runner = CliRunner()
TIMED = ("latency_ms", "capture_time")  # per-frame timings: the only fields that differ between runs


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local cluster for the module; workers inherit the kill switch's path (unarmed)."""
    ray = pytest.importorskip("ray")
    arm = tmp_path_factory.mktemp("ray-faults") / "kill-armed"
    old = os.environ.get(KILL_ONCE_ENV)
    os.environ[KILL_ONCE_ENV] = str(arm)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield arm
    ray.shutdown()
    if old is None:
        os.environ.pop(KILL_ONCE_ENV, None)
    else:
        os.environ[KILL_ONCE_ENV] = old


@pytest.fixture
def clips(tmp_path):
    paths = []
    for i, name in enumerate(("a", "b", "c")):
        rt_write_video(tmp_path / f"{name}.mp4", frames=8 + 2 * i, size=(60, 80), seed=i)
        paths.append(tmp_path / f"{name}.mp4")
    return paths


def ray_batch(inputs, out, model, *extra):
    return invoke("batch", *inputs, "--out", out, "--model", model, "--backend", "eager", "--engine", "ray",
                  "--actors", 2, *extra)


def folder_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def untimed_lines(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in path.read_text().splitlines()]


def assert_each_video_once(out, frames: dict):
    assert sorted(p.name for p in out.iterdir()) == sorted(frames)  # no .partial folder left
    for name, n in frames.items():
        assert (out / name / ".done").is_file()
        assert sorted(p.name for p in (out / name / "masks").iterdir()) == [f"{i:06d}.png" for i in range(n)]
        assert [row["frame_index"] for row in untimed_lines(out / name / "frames.jsonl")] == list(range(n))


def test_ray_engine_writes_the_local_engines_folders_and_resumes(ray_cluster, clips, rt_tiny_model_dir, tmp_path):
    local = invoke("batch", *clips, "--out", tmp_path / "local", "--model", rt_tiny_model_dir, "--backend", "eager")
    assert local.exit_code == 0, local.output
    result = ray_batch(clips, tmp_path / "ray", rt_tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert "3 inputs: 3 done, 0 done earlier, 0 failed; 30 frames" in result.output
    assert "actor " in result.output and "fps (decode" in result.output  # the per-actor lines
    assert_each_video_once(tmp_path / "ray", {"a": 8, "b": 10, "c": 12})
    for name in ("a", "b", "c"):
        mine, theirs = tmp_path / "ray" / name, tmp_path / "local" / name
        assert folder_files(mine) == folder_files(theirs)
        for mask in (theirs / "masks").iterdir():
            assert (mine / "masks" / mask.name).read_bytes() == mask.read_bytes(), (name, mask.name)
        assert untimed_lines(mine / "frames.jsonl") == untimed_lines(theirs / "frames.jsonl")
    stamp = (tmp_path / "ray" / "a" / "frames.jsonl").stat().st_mtime_ns
    again = ray_batch(clips, tmp_path / "ray", rt_tiny_model_dir)
    assert again.exit_code == 0 and "3 inputs: 0 done, 3 done earlier" in again.output
    assert (tmp_path / "ray" / "a" / "frames.jsonl").stat().st_mtime_ns == stamp


def test_a_worker_killed_mid_video_is_retried_and_every_video_is_done_once(ray_cluster, clips, rt_tiny_model_dir,
                                                                            tmp_path):
    ray_cluster.touch()  # arms the kill switch: the first actor to take it dies two frames into a video
    result = ray_batch(clips, tmp_path / "out", rt_tiny_model_dir)
    assert not ray_cluster.exists(), "no worker died: the test proved nothing"
    assert result.exit_code == 0, result.output
    assert "3 inputs: 3 done" in result.output
    assert_each_video_once(tmp_path / "out", {"a": 8, "b": 10, "c": 12})


def test_a_corrupt_video_is_reported_and_the_others_finish(ray_cluster, clips, rt_tiny_model_dir, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(clips[0].read_bytes()[:200])  # a recording cut short: its header and nothing else
    result = ray_batch([clips[0], corrupt, clips[1]], tmp_path / "out", rt_tiny_model_dir)
    assert result.exit_code == 2
    assert "1 of 3 inputs failed and were skipped" in result.output and "corrupt.mp4" in result.output
    assert_each_video_once(tmp_path / "out", {"a": 8, "b": 10})


def test_a_replica_that_cannot_be_built_stops_the_batch_in_one_line(ray_cluster, clips, rt_tiny_model_dir, tmp_path):
    pytest.importorskip("ray")
    if importlib.util.find_spec("torch_tensorrt"):
        pytest.skip("TensorRT is installed here: the replica would build")
    result = invoke("batch", *clips, "--out", tmp_path / "out", "--model", rt_tiny_model_dir, "--backend", "tensorrt",
                    "--engine", "ray", "--actors", 1)
    assert result.exit_code == 2 and "error: a Ray worker cannot run the model:" in result.output, result.output
    assert list((tmp_path / "out").iterdir()) == []


def test_an_address_where_no_head_answers_is_one_line(tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rt_write_video(tmp_path / "a.mp4", frames=2, size=(60, 80))
    result = invoke("batch", tmp_path / "a.mp4", "--out", tmp_path / "out", "--engine", "ray",
                    "--address", f"127.0.0.1:{port}")
    assert result.exit_code == 2 and f"--address 127.0.0.1:{port}: no Ray head answers there" in result.output


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BatchError, match=r"pip install 'syndiff-stream\[ray\]'"):
        import_ray()
    result = invoke("batch", tmp_path / "x.mp4", "--out", tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--engine ray needs Ray: pip install 'syndiff-stream[ray]'" in result.output


@pytest.mark.parametrize("args, says", [
    (["--engine", "spark"], "--engine 'spark': choose local or ray"),
    (["--actors", 2], "need --engine ray"),
    (["--engine", "ray", "--actors", 0], "--actors: Input should be greater than or equal to 1"),
    (["--engine", "ray", "--address", "not an address"], "--address: choose auto, HOST:PORT or ray://HOST:PORT"),
    (["--engine", "ray", "--gpus-per-actor", -1], "--gpus-per-actor"),
    (["--engine", "ray", "--device", "cuda"], "the device follows --gpus-per-actor"),
    (["--engine", "ray", "--backend", "nope"], "unknown backend 'nope'"),
])
def test_bad_engine_options_are_one_line(args, says, tmp_path):
    result = invoke("batch", tmp_path / "x.mp4", "--out", tmp_path / "out", *args)
    assert result.exit_code == 2 and says in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
