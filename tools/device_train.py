"""Train a recipe on a lent GPU: pack here, run there, unpack the checkpoint here.

    python tools/device_train.py pack                      # here: .device/ (git-ignored) with data + wheels
    python tools/device_train.py run --recipe compact-kvasir-clinicdb --out $OUT    # there (or here, --device cpu)
    python tools/device_train.py unpack /work/.device/... runs/gpu-default          # here: rejoin the checkpoint

`pack` writes what the device lacks into `.device/` (at most 64 MiB travel with a call):
  data/<source>/images, masks (+ sequences.csv): every recipe source re-encoded small (JPEG q92 at
  most PACK_SIDE pixels on the long side, masks as PNG), so the whole training set travels; the
  run's manifest records these re-encoded files, not the originals
  wheels/: the pure-Python and manylinux wheels of what the device image lacks (diffusers,
  albumentations, pydantic, imagehash, tomli-w and what they need), for CPython 3.12
`run` installs the wheels into /tmp/site, trains the recipe with its data paths pointed at the pack,
and writes the run's records and the model, its weights split into parts under the 16 MiB a
returned file may have. The device call (one, well inside its 10 minutes):

    device run, carry [".device"], command:
      python3 tools/device_train.py run --recipe compact-kvasir-clinicdb --set steps=5000 --out $OUT
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = Path(os.environ.get("SYNDIFF_DEVICE_PACK", ROOT / ".device"))
PACK_SIDE = 384
PART_BYTES = 15 * 1024 * 1024
# What the device image (see the device tool's KINDS.md) lacks for the trainer, pinned to what runs here.
WHEELS = ["diffusers==0.42.1", "albumentations==2.0.8", "albucore==0.0.24", "pydantic==2.14.4",
          "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5", "imagehash==4.3.2",
          "pywavelets==1.9.0", "tomli-w==1.2.0", "stringzilla==5.3.2", "simsimd==6.5.16",
          "importlib-metadata==10.2.0"]


def pack(recipe_name: str, sets: list[str], wheels: bool) -> None:
    import cv2

    from syndiff_stream.datasets import find_pairs, read_image, read_mask
    from syndiff_trainer.recipe import load_recipe

    recipe = load_recipe(recipe_name, sets)
    exclude = ROOT / ".git" / "info" / "exclude"
    if PACK == ROOT / ".device" and exclude.is_file() and "/.device/" not in exclude.read_text():
        exclude.write_text(exclude.read_text() + "/.device/\n")
    for spec in recipe.data:
        dest = PACK / "data" / spec.name
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "images").mkdir(parents=True)
        (dest / "masks").mkdir()
        for pair in find_pairs(spec.path, skip_unpaired=spec.skip_unpaired):
            image, mask = read_image(pair.image), read_mask(pair.mask).astype("uint8") * 255
            scale = min(1.0, PACK_SIDE / max(image.shape[:2]))
            if scale < 1:
                size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(dest / "images" / f"{pair.stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 92])
            cv2.imwrite(str(dest / "masks" / f"{pair.stem}.png"), mask)
        if (Path(spec.path) / "sequences.csv").is_file():
            shutil.copy2(Path(spec.path) / "sequences.csv", dest / "sequences.csv")
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                                      "manylinux2014_x86_64", "manylinux_2_27_x86_64")],
                        "-d", str(PACK / "wheels"), *WHEELS], check=True)
    size = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    print(f"{PACK}: {size / 2**20:.1f} MiB (a device call carries at most 64 MiB)")


def split_weights(model_dir: Path) -> None:
    """model.safetensors -> model.safetensors.part0, .part1, ... each under a returned file's limit."""
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    for i in range(0, len(data), PART_BYTES):
        (model_dir / f"model.safetensors.part{i // PART_BYTES}").write_bytes(data[i:i + PART_BYTES])
    weights.unlink()


def unpack(folder: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    parts = sorted(folder.glob("model.safetensors.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    for item in folder.iterdir():
        if "part" not in item.name and item.is_file():
            shutil.copy2(item, dest / item.name)
    (dest / "model.safetensors").write_bytes(b"".join(p.read_bytes() for p in parts))
    print(f"{dest}: checkpoint from {len(parts)} part(s)")


def run(recipe_name: str, sets: list[str], out: Path, device: str) -> None:
    if (PACK / "wheels").is_dir():
        site = Path("/tmp/site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, (PACK / "wheels").glob("*.whl"))],
                       check=True)
        sys.path.insert(0, str(site))
    sys.path[:0] = [str(ROOT), str(ROOT / "trainer")]
    from syndiff_trainer.recipe import load_recipe
    from syndiff_trainer.train import RunOptions, fit

    recipe = load_recipe(recipe_name, sets)
    paths = [f'data.{i}.path="{PACK / "data" / s.name}"' for i, s in enumerate(recipe.data)
             if (PACK / "data" / s.name).is_dir()]
    recipe = load_recipe(recipe_name, [*sets, *paths])
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "device-run"
    result = fit(recipe, RunOptions(out=str(run_dir), device=device, progress=False))
    print(result)
    model = out / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(run_dir / "model", model)
    split_weights(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("pack", "run"):
        p = sub.add_parser(name)
        p.add_argument("--recipe", default="compact-kvasir-clinicdb")
        p.add_argument("--set", dest="sets", action="append", default=[])
    sub.choices["pack"].add_argument("--no-wheels", action="store_true")
    sub.choices["run"].add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-out")))
    sub.choices["run"].add_argument("--device", default="cuda")
    u = sub.add_parser("unpack")
    u.add_argument("folder", type=Path)
    u.add_argument("dest", type=Path)
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(args.recipe, args.sets, not args.no_wheels)
    elif args.cmd == "run":
        run(args.recipe, args.sets, args.out, args.device)
    else:
        unpack(args.folder, args.dest)


if __name__ == "__main__":
    main()
