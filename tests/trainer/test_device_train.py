"""The GPU lease script, run here on the CPU so it cannot rot: pack, one run, the whole session, unpack."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import torch
from safetensors.torch import load_file

from syndiff_stream.model import Segmenter

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "device_train.py"


def tiny_recipe_file(tmp_path, data):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'''version = 1
steps = 2
batch_size = 2
image_size = 64
val_every = 2
log_every = 1
[model]
preset = "tiny"
[[data]]
name = "kvasir"
path = "{data}"
groups = "none"
[split]
val_fraction = 0.25
[optim]
warmup_steps = 1
[stage1]
steps = 2
batch_size = 2
''')
    return recipe


def script(tmp_path):
    env = {**os.environ, "SYNDIFF_DEVICE_PACK": str(tmp_path / "pack"), "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return lambda *a: subprocess.run([sys.executable, str(SCRIPT), *map(str, a)], env=env, check=True,
                                     capture_output=True, text=True, timeout=600)


def test_pack_then_run_on_cpu(kvasir_subset, tmp_path):
    run, recipe = script(tmp_path), tiny_recipe_file(tmp_path, kvasir_subset)
    run("pack", "--recipe", recipe, "--no-wheels")
    packed = sorted((tmp_path / "pack" / "data" / "kvasir" / "images").iterdir())
    assert len(packed) == 8 and all(p.suffix == ".jpg" for p in packed)
    assert cv2.imread(str(packed[0])).shape == (64, 64, 3)  # at the training resolution: small enough to travel
    run("run", "--recipe", recipe, "--device", "cpu", "--out", tmp_path / "out", "--half")
    out = tmp_path / "out"
    assert (out / "recipe.toml").read_text().count(str(tmp_path / "pack")) == 1  # trained on the pack
    assert all((out / n).is_file() for n in ("manifest.json", "split.json", "run.json", "log.jsonl"))
    assert Segmenter.from_pretrained(out).config.image_size == 64


def test_the_whole_session_on_cpu_returns_runs_and_the_device_check(kvasir_subset, rt_tiny_model_dir, tmp_path):
    run, recipe = script(tmp_path), tiny_recipe_file(tmp_path, kvasir_subset)
    run("pack", "--recipe", recipe, "--no-wheels")
    done = run("session", "--out", tmp_path / "OUT", "--recipe", recipe, "--runs", "default,seed-1", "--split", "",
               "--device", "cpu", "--budget", "120", "--check-args",
               f"--model {rt_tiny_model_dir} --sizes 90x72 --variants eager:fp32 --frames 2 --parity-frames 1 "
               "--presets tiny --preset-iters 2", "--budget-args",
               f"--model {rt_tiny_model_dir} --size 96x72 --fps 100 --frames 10 --model-ms 2 --backend eager")
    returned = sorted(p.name for p in (tmp_path / "OUT").iterdir())
    assert returned == ["device-check.json", "device-check.log", "live-budget.json", "live-budget.log",
                        "runs.tar.part0", "session.log"], done.stdout
    assert json.loads((tmp_path / "OUT" / "device-check.json").read_text())["presets"][0]["preset"] == "tiny"
    budget = json.loads((tmp_path / "OUT" / "live-budget.json").read_text())
    assert budget["size"] == "96x72" and {r["setting"] for r in budget["rows"]} == {"device_check", "run"}
    run("unpack", tmp_path / "OUT", tmp_path / "runs")
    for name in ("default", "seed-1"):
        assert {v.dtype for v in load_file(tmp_path / "runs" / name / "model.safetensors").values()} <= {
            torch.float32, torch.int64}  # fp16 on the way, fp32 again on disk
        assert Segmenter.from_pretrained(tmp_path / "runs" / name).config.image_size == 64
        assert "seed = 1" in (tmp_path / "runs" / name / "recipe.toml").read_text().splitlines() or name == "default"
        assert (tmp_path / "runs" / f"{name}.out").is_file()


def test_a_session_of_loco_folds_checks_first_and_returns_results_without_weights(
        kvasir_subset, clinicdb_subset, rt_tiny_model_dir, tmp_path):
    run, recipe = script(tmp_path), tiny_recipe_file(tmp_path, kvasir_subset)
    recipe.write_text(recipe.read_text().replace('[split]', f'''[[data]]
name = "clinicdb"
path = "{clinicdb_subset}"
groups = "none"
[split]'''))
    free = tmp_path / "free-val" / "images"
    free.mkdir(parents=True)
    for i, image in enumerate(sorted((kvasir_subset / "images").iterdir())[:3]):  # stand-ins: any frames do
        cv2.imwrite(str(free / f"f{i}.jpg"), cv2.imread(str(image)))
    run("pack", "--recipe", recipe, "--no-wheels", "--jpeg-quality", "80", "--polyp-free", free.parent)
    mask = next((tmp_path / "pack" / "data" / "clinicdb" / "masks").iterdir())
    assert cv2.imread(str(mask), cv2.IMREAD_UNCHANGED).max() == 255  # bilevel PNG reads back as 0 / 255
    assert len(list((tmp_path / "pack" / "polyp-free" / "free-val" / "images").iterdir())) == 3
    done = run("session", "--out", tmp_path / "OUT", "--runs", "", "--loco", f"bn={recipe}@1", "--check-first",
               "--device", "cpu", "--budget", "200", "--check-args",
               f"--model {rt_tiny_model_dir} --sizes 90x72 --variants eager:fp32 --frames 2 --parity-frames 1",
               "--budget-args", f"--model {rt_tiny_model_dir} --size 96x72 --frames 5 --model-ms 0 --backend eager")
    log = (tmp_path / "OUT" / "session.log").read_text()
    assert log.index("device check: exit 0") < log.index("loco folds"), log  # the bench ran alone, first
    import io
    import tarfile
    parts = sorted((tmp_path / "OUT").glob("runs.tar.part*"))
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        names = tar.getnames()
        assert not [n for n in names if n.endswith(".safetensors")], names  # results travel, weights do not
        for held in ("kvasir", "clinicdb"):
            result = json.loads(tar.extractfile(f"bn/holdout-{held}/result.json").read())
            assert "images" in result and "free-val" in result["polyp_free"], done.stdout
            assert "seed = 1" in tar.extractfile(f"bn/holdout-{held}/recipe.toml").read().decode().splitlines()
