"""tools/speed_paths.py, the side-by-side measurement of the CPU paths, run here in seconds on a tiny
random model, so that the command the lead runs on a quiet machine cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import speed_paths  # noqa: E402
from syndiff_stream.backends import model_hash  # noqa: E402
from syndiff_stream.cpu_paths import choose, read_parity  # noqa: E402
from syndiff_stream.model import Segmenter  # noqa: E402


def scope_image(rng, size=(72, 90)) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    image = rng.integers(40, 220, (h, w, 3)).astype(np.uint8)
    image[np.hypot(yy - h / 2, xx - w / 2) > 0.48 * h] = 0  # a circular field of view on black
    return image


def write_data(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """A split source `d` (4 validation and 3 training images), a polyp-free folder, the split."""
    rng = np.random.default_rng(seed)
    (root / "d" / "images").mkdir(parents=True)
    (root / "free").mkdir()
    for i in range(7):
        cv2.imwrite(str(root / "d" / "images" / f"{i}.png"), scope_image(rng))
    for i in range(3):
        cv2.imwrite(str(root / "free" / f"f{i}.png"), scope_image(rng))
    split = root / "split.json"
    split.write_text(json.dumps({"train": ["d/4", "d/5", "d/6"], "select": [], "val": ["d/0", "d/1", "d/2", "d/3"]}))
    return root / "d", root / "free", split


def test_speed_paths_measures_paths_side_by_side(rt_tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path / "cache"))
    data, free, split = write_data(tmp_path)
    out = tmp_path / "out"
    code = speed_paths.main(["--model", str(rt_tiny_model_dir), "--paths", "onnx,eager,eager-bf16", "--threads", "1",
                             "--frames", "4", "--rounds", "2", "--data", f"d={data}", "--split", str(split),
                             "--polyp-free", str(free), "--out", str(out), "--record"])
    assert code == 0
    report = json.loads((out / "speed-paths.json").read_text())
    rows = {r["path"]: r for r in report["rows"]}
    native_bf16 = {"avx512_bf16", "amx_bf16"} & set(report["cpu"]["vector_extensions"])
    assert set(rows) == {"onnx", "eager"} | ({"eager-bf16"} if native_bf16 else set())
    assert report["parity"]["validation_images"] == 4
    assert rows["eager"]["parity_min"] == 1.0 and rows["eager"]["extra_alarms"] == 0  # the reference itself
    for r in rows.values():
        assert len(r["fps_rounds"]) == 2 and r["fps_range"][0] <= r["model_fps"] <= r["fps_range"][1]
        assert r["share"] == round(r["model_fps"] / report["ceiling_fps"], 3)
        assert 0 <= r["parity_min"] <= r["parity_mean"] <= 1 and 0 <= r["alarms"] <= 3
        assert r["ok"] == (r["parity_min"] >= 0.99 and r["extra_alarms"] == 0)
    assert rows["onnx"]["workers"] == 1  # one thread: one call per core is one call
    if not native_bf16:
        assert "not available here" in report["skipped"]["eager-bf16"]
    table = (out / "speed-paths.md").read_text()
    assert table == capsys.readouterr().out
    assert "| `onnx`" in table and report["cpu"]["model"] in table and "share of ceiling" in table
    # --record: the parity of each path, and the fastest passing one is what auto now takes here
    seg = Segmenter.from_pretrained(rt_tiny_model_dir)
    assert read_parity(model_hash(seg))["eager"]["ok"] is True
    choice = choose(seg, threads=1, probe=lambda backend: 1 / 0)  # no probe: the measurement's choice
    assert choice.source == "speed_paths" and choice.path == report["recorded_choice"]
    assert choice.path in {name for name, r in rows.items() if r["ok"]}


def test_validation_images_come_from_the_split(tmp_path):
    data, _, split = write_data(tmp_path)
    found = speed_paths.validation_images(split, {"d": data}, limit=None)
    assert [p.stem for p in found] == ["0", "1", "2", "3"]
    assert [p.stem for p in speed_paths.validation_images(split, {"d": data}, limit=2)] == ["0", "3"]
    calib = speed_paths.training_frames(split, {"d": data}, tmp_path / "calib")
    assert sorted(p.name for p in calib.iterdir()) == ["d-4.png", "d-5.png", "d-6.png"]


def test_record_keeps_the_default_path_unless_another_is_clearly_faster(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path))
    cpu = {"model": "Test CPU", "vector_extensions": ["avx2"]}

    def report(daz_fps):
        rows = [{"path": "onnx", "ok": True, "parity_min": 1.0, "extra_alarms": 0, "model_fps": 82.2},
                {"path": "onnx-daz", "ok": True, "parity_min": 1.0, "extra_alarms": 0, "model_fps": daz_fps},
                {"path": "onnx-int8", "ok": False, "parity_min": 0.7, "extra_alarms": 2, "model_fps": 200.0}]
        return {"model_hash": "h", "rows": rows, "calibration": None, "cpu": cpu, "threads": 2}

    assert speed_paths.record(report(84.5)) == "onnx"  # 3 % faster: within a median's noise
    assert speed_paths.record(report(90.0)) == "onnx-daz"  # 9 % faster, and it kept parity
