"""The GPU training script, run here on the CPU so it cannot rot: pack, run, unpack, load."""

import os
import subprocess
import sys
from pathlib import Path

from syndiff_stream.model import Segmenter

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "device_train.py"


def test_pack_run_unpack_round_trip_on_cpu(kvasir_subset, tmp_path):
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
path = "{kvasir_subset}"
groups = "none"
[split]
val_fraction = 0.25
[stage1]
steps = 2
batch_size = 2
''')
    env = {**os.environ, "SYNDIFF_DEVICE_PACK": str(tmp_path / "pack"), "TMPDIR": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *map(str, a)], env=env, check=True,  # noqa: E731
                                    capture_output=True, text=True)
    run("pack", "--recipe", recipe, "--no-wheels")
    packed = sorted((tmp_path / "pack" / "data" / "kvasir" / "images").iterdir())
    assert len(packed) == 8 and all(p.suffix == ".jpg" for p in packed)
    run("run", "--recipe", recipe, "--device", "cpu", "--out", tmp_path / "out")
    parts = sorted((tmp_path / "out" / "model").glob("model.safetensors.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    assert (tmp_path / "out" / "model" / "recipe.toml").read_text().count(str(tmp_path / "pack")) == 1
    run("unpack", tmp_path / "out" / "model", tmp_path / "ckpt")
    assert Segmenter.from_pretrained(tmp_path / "ckpt").config.image_size == 64
