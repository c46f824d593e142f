"""Train recipes on a lent GPU: pack here, run there, unpack the checkpoints here.

    python tools/device_train.py pack                        # here: .device/ (git-ignored): data + wheels
    python tools/device_train.py session --out $OUT          # there: the prepared lease, below
    python tools/device_train.py unpack /work/.device/... runs/gpu      # here: one checkpoint per run

`pack` writes what the device lacks into `.device/` (a device call carries at most 64 MiB, the
repository's tracked files included):
  data/<source>/images, masks (+ sequences.csv): every recipe source at the recipe's training
  resolution (the loader's own field-of-view crop and square resize, then JPEG q92; masks PNG), so
  the whole training set travels; a run's manifest records these files, not the originals
  wheels/: the pure-Python and manylinux wheels of what the device image lacks (diffusers,
  albumentations, pydantic, imagehash, tomli-w and what they need at import), for CPython 3.12
`run` trains one recipe with its data paths pointed at the pack and writes the run's model and
records to OUT/NAME (weights in fp16 with --half: what 16 MiB returned files and 64 MiB in all
allow). `session` is the whole lease in one call, so nothing is lost to a second machine start:
  1. the SESSION_RUNS below in parallel on the one GPU, each with --time-budget (it measures its
     pace at the end of warm-up and shortens its schedule to fit; its recipe records the steps),
     all on the shipped default's validation split, so their scores compare with its card;
  2. tools/device_check.py (GPU bench: parity, recorded and live fps, per-preset model time), then
     tools/live_budget.py on the same host (the host's own part of a live p99, a stand-in model call);
  3. OUT/runs.tar.partN (15 MiB parts), OUT/device-check.json, OUT/live-budget.json, OUT/session.log.
The device call (one, inside its 10 minutes; every checkpoint but the default left out of the tree, docs/training.md):

    device run, carry [".device"], timeout_s 590, command:
      python3 tools/device_train.py session --out $OUT

Leave-one-centre-out folds instead of (or beside) plain runs, the GPU bench first and alone
(docs/runs/h200-lease-2):

    python tools/device_train.py pack --recipe RECIPE --polyp-free ../shared/data/polyp-free-val
      python3 tools/device_train.py session --out $OUT --runs '' --check-first \
        --loco bn=.device/recipes/batchnorm.toml@2 --loco-set steps=3000 --loco-set val_every=1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = Path(os.environ.get("SYNDIFF_DEVICE_PACK", ROOT / ".device"))
JPEG_QUALITY = 92
PART_BYTES = 15 * 1024 * 1024
# What the device image (see the device tool's KINDS.md) lacks for the trainer, pinned to what runs
# here. pywavelets (imagehash's whash, unused) stays behind: it would cost 4.5 of the 64 MiB.
WHEELS = ["diffusers==0.42.1", "albumentations==2.0.8", "albucore==0.0.24", "pydantic==2.14.4",
          "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5", "imagehash==4.3.2",
          "tomli-w==1.2.0", "stringzilla==5.3.2", "simsimd==6.5.16", "importlib-metadata==10.2.0",
          "monai==1.6.1"]  # monai: scoring's surface metrics (a LOCO fold scores on the device)
# The lease's training runs: name -> recipe overrides on the default recipe. The default again on
# the GPU at full length, a second seed (run-to-run spread at full length, which the 1 500-step
# ablation could not afford), the small-polyp lever, and the large preset the issue asks for.
SESSION_RUNS = {
    "default": [],
    "seed-1": ["seed=1"],
    "small-cases": ['loss.mask_type="tversky_focal"', "sampling.small_polyp_boost=2.0"],
    "large": ['model.preset="large"', "model.overrides={}"],  # the preset as it is, not the default's 16 x 16 latent
    # more seeds of the rows above: on the H200 parallel runs cost nothing extra (docs/training.md)
    "seed-2": ["seed=2"],
    "small-cases-seed-1": ['loss.mask_type="tversky_focal"', "sampling.small_polyp_boost=2.0", "seed=1"],
    "standard-aug": ['augment.preset="standard"'],
}


def pack(recipe_name: str | None, sets: list[str], wheels: bool, quality: int = JPEG_QUALITY,
         polyp_free: list[str] = ()) -> None:
    import cv2

    from syndiff_stream.datasets import find_pairs, read_image, read_mask
    from syndiff_stream.preprocess import crop_resize, find_field_of_view
    from syndiff_trainer.recipe import DEFAULT_RECIPE, load_recipe

    recipe_name = recipe_name or DEFAULT_RECIPE
    recipe = load_recipe(recipe_name, sets)
    exclude = ROOT / ".git" / "info" / "exclude"
    if PACK == ROOT / ".device" and exclude.parent.is_dir():
        text = exclude.read_text() if exclude.is_file() else ""
        if "/.device/" not in text:
            exclude.write_text(text + "/.device/\n")
    size = recipe.image_size
    for spec in recipe.data:
        dest = PACK / "data" / spec.name
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "images").mkdir(parents=True)
        (dest / "masks").mkdir()
        for pair in find_pairs(spec.path, skip_unpaired=spec.skip_unpaired):
            image, mask = read_image(pair.image), read_mask(pair.mask).astype("uint8") * 255
            fov = find_field_of_view(image)  # what the loader would crop; at load it then finds the whole frame
            image = crop_resize(image, fov, size)
            mask = crop_resize(mask, fov, size, interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(dest / "images" / f"{pair.stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])
            cv2.imwrite(str(dest / "masks" / f"{pair.stem}.png"), mask, [cv2.IMWRITE_PNG_BILEVEL, 1])  # 1 bit a pixel
        if (Path(spec.path) / "sequences.csv").is_file():
            shutil.copy2(Path(spec.path) / "sequences.csv", dest / "sequences.csv")
    for root in map(Path, polyp_free):  # validation only (alarm rates of LOCO folds), never trained on
        dest = PACK / "polyp-free" / root.name / "images"
        shutil.rmtree(dest.parent, ignore_errors=True)
        dest.mkdir(parents=True)
        folder = root / "images" if (root / "images").is_dir() else root
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"):
                continue
            image = read_image(path)
            image = crop_resize(image, find_field_of_view(image), size)
            cv2.imwrite(str(dest / f"{path.stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, quality])
        if (root / "sequences.csv").is_file():
            shutil.copy2(root / "sequences.csv", dest.parent / "sequences.csv")
    if wheels:
        shutil.rmtree(PACK / "wheels", ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        *[f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                                      "manylinux2014_x86_64", "manylinux_2_27_x86_64")],
                        "-d", str(PACK / "wheels"), *WHEELS], check=True)
    total = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    print(f"{PACK}: {total / 2**20:.1f} MiB (a device call carries at most 64 MiB with the repository)")


def install_wheels() -> None:
    """The pack's wheels into /tmp/site, first on sys.path here and in every child process."""
    site = Path("/tmp/site")
    if (PACK / "wheels").is_dir() and not site.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, (PACK / "wheels").glob("*.whl"))],
                       check=True)
    paths = [str(site), str(ROOT), str(ROOT / "trainer")]
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def to_half(model_dir: Path) -> None:
    """Floating-point weights to fp16 (half the bytes; `unpack` restores fp32)."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(path))


def run(recipe_name: str | None, sets: list[str], out: Path, device: str, time_budget: float | None, half: bool,
        loader_workers: int = 1, compile_mode: str = "no", precision: str = "auto") -> None:
    install_wheels()
    from syndiff_trainer.recipe import DEFAULT_RECIPE, load_recipe
    from syndiff_trainer.train import RunOptions, fit

    recipe_name = recipe_name or DEFAULT_RECIPE
    recipe = load_recipe(recipe_name, sets)
    recipe = load_recipe(recipe_name, [*sets, *pack_paths(recipe)])
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"device-run-{out.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = fit(recipe, RunOptions(out=str(run_dir), device=device, progress=False, time_budget_s=time_budget,
                                    loader_workers=loader_workers, compile=compile_mode, precision=precision))
    print(json.dumps(result), flush=True)
    chosen = run_dir / ("model" if (run_dir / "model").is_dir() else "last")  # `last` when out of time
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(chosen, out)
    for name in ("recipe.toml", "manifest.json", "split.json", "run.json", "log.jsonl"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    if half:
        to_half(out)


def pack_paths(recipe) -> list[str]:
    """--set overrides pointing the recipe's sources at the pack (those packed)."""
    return [f'data.{i}.path="{PACK / "data" / s.name}"' for i, s in enumerate(recipe.data)
            if (PACK / "data" / s.name).is_dir()]


def loco(recipe_name: str, sets: list[str], only: str, out: Path, device: str, time_budget: float | None,
         loader_workers: int = 1, compile_mode: str = "no", precision: str = "no") -> None:
    """One leave-one-centre-out fold (`syndiff-train cross-centre --only`) on the pack: trained on the
    other sources, scored on the held-out one and on every packed polyp-free set."""
    install_wheels()
    from syndiff_trainer.crossval import run_cross_centre
    from syndiff_trainer.negatives import named_polyp_free
    from syndiff_trainer.recipe import load_recipe

    recipe = load_recipe(recipe_name, sets)
    recipe = load_recipe(recipe_name, [*sets, *pack_paths(recipe)])
    free = named_polyp_free([str(p) for p in sorted((PACK / "polyp-free").glob("*")) if p.is_dir()],
                            recipe.image_size)
    table = run_cross_centre(recipe, out, (only,), free, device=device, progress=False, time_budget_s=time_budget,
                             loader_workers=loader_workers, compile=compile_mode, precision=precision)
    print(table, flush=True)


def parse_loco(items: list[str]) -> dict[str, tuple[str, int]]:
    """NAME=RECIPE[@SEED] -> {NAME: (RECIPE, SEED)}."""
    parsed = {}
    for item in items:
        name, sep, rest = item.partition("=")
        recipe, _, seed = rest.partition("@")
        if not sep or not name or not recipe or (seed and not seed.isdigit()):
            raise SystemExit(f"--loco {item!r}: expected NAME=RECIPE or NAME=RECIPE@SEED")
        parsed[name] = (recipe, int(seed or 0))
    return parsed


def session(out: Path, budget: float, check_timeout: float, runs: list[str], recipe: str | None, sets: list[str],
            split: str | None, device: str, check_args: list[str], compile_mode: str = "no", precision: str = "auto",
            loco_items: list[str] = (), loco_sets: list[str] = (), check_first: bool = False,
            budget_args: list[str] = ()) -> int:
    """The lease in one call: parallel training runs (plain runs and leave-one-centre-out folds), the
    GPU bench before or after them, then the returned files."""
    started = time.time()
    unknown = sorted(set(runs) - set(SESSION_RUNS))
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {', '.join(unknown)}; choose from {', '.join(SESSION_RUNS)}")
    locos = parse_loco(list(loco_items))
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(os.environ.get("TMPDIR", "/tmp")) / "device-session"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log = (out / "session.log").open("a")

    def say(text: str) -> None:
        line = f"[{time.time() - started:6.1f} s] {text}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    def device_check() -> None:
        check = [sys.executable, str(ROOT / "tools" / "device_check.py"), "--device", device, *check_args,
                 "--out", str(out / "device-check.json")]
        with (out / "device-check.log").open("w") as check_log:  # rows land here as they are measured
            try:
                done = subprocess.run(check, stdout=check_log, stderr=subprocess.STDOUT, timeout=check_timeout)
                say(f"device check: exit {done.returncode}")
            except subprocess.TimeoutExpired:
                say(f"device check: stopped after {check_timeout:.0f} s (rows so far in device-check.log)")
        # the host's part of the live p99, on this host's cores: what device_check's live rows leave to the GPU
        host = [sys.executable, str(ROOT / "tools" / "live_budget.py"), *budget_args]
        with (out / "live-budget.json").open("w") as report, (out / "live-budget.log").open("w") as rows:
            try:
                done = subprocess.run(host, stdout=report, stderr=rows, timeout=check_timeout)
                say(f"live budget: exit {done.returncode}")
            except subprocess.TimeoutExpired:
                say(f"live budget: stopped after {check_timeout:.0f} s (rows so far in live-budget.log)")

    install_wheels()
    from syndiff_stream.model import default_checkpoint_path
    from syndiff_trainer.recipe import DEFAULT_RECIPE, load_recipe

    recipe = recipe or DEFAULT_RECIPE
    split = str(default_checkpoint_path() / "split.json") if split is None else split
    if check_first:
        say("device check first, alone on the GPU")
        device_check()
    # one process per plain run and per fold; the deadline counts from here
    jobs = {name: [*sets, *SESSION_RUNS[name]] for name in runs}
    folds = {(name, held): (loco_recipe, seed) for name, (loco_recipe, seed) in locos.items()
             for held in (d.name for d in load_recipe(loco_recipe, list(loco_sets)).data)}
    say(f"wheels in; runs {runs}, loco folds {[f'{n}/{h}' for n, h in folds]}, budget {budget:.0f} s each")
    launched = time.time()
    procs = {}
    cores = max(2, (os.cpu_count() or 4) // max(1, len(jobs) + len(folds)))  # half of each share prepares batches
    threads, workers = max(1, cores // 2 - 1), max(1, cores // 2)
    split_sets = ['split.policy="file"', f'split.file="{Path(split).resolve()}"'] if split else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TMPDIR": str(staging)}
    common = ["--device", device, "--time-budget", str(budget), "--loader-workers", str(workers),
              "--compile", compile_mode]
    for name, run_sets in jobs.items():
        cmd = [sys.executable, __file__, "run", "--recipe", recipe, "--out", str(staging / name), "--half", *common,
               "--precision", precision, *[a for s in [*run_sets, *split_sets] for a in ("--set", s)]]
        procs[name] = subprocess.Popen(cmd, stdout=(staging / f"{name}.out").open("w"), stderr=subprocess.STDOUT,
                                       env=env)
    for (name, held), (loco_recipe, seed) in folds.items():
        cmd = [sys.executable, __file__, "loco", "--recipe", loco_recipe, "--only", held, "--out", str(staging / name),
               *common, "--precision", "no" if precision == "auto" else precision,  # LOCO records are fp32
               *[a for s in [*loco_sets, f"seed={seed}"] for a in ("--set", s)]]
        procs[f"{name}-{held}"] = subprocess.Popen(cmd, stdout=(staging / f"{name}-{held}.out").open("w"),
                                                   stderr=subprocess.STDOUT, env=env)
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, launched + budget + 60 - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        say(f"run {name}: exit {proc.returncode}; " + " | ".join(
            (staging / f"{name}.out").read_text().strip().splitlines()[-3:]))
    pack_runs(staging, [*runs, *locos], out, [f"{n}-{h}" for n, h in folds])
    say("runs packed")
    if not check_first:
        device_check()
    say("done")
    return 0


def pack_runs(staging: Path, runs: list[str], out: Path, logs: list[str] = ()) -> None:
    """Every run's folder and output in one tar, cut into parts a returned file may hold. A LOCO
    folder travels without its weights: its results and each fold's records are what rank recipes."""
    tar_path = staging / "runs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in [*runs, *logs]:
            if (staging / f"{name}.out").is_file():
                tar.add(staging / f"{name}.out", arcname=f"{name}.out")
        for name in runs:
            if (staging / name).is_dir():
                tar.add(staging / name, arcname=name,
                        filter=lambda info: None if info.name.endswith(".safetensors") and "/holdout-" in info.name
                        else info)
            elif (staging / f"device-run-{name}" / "log.jsonl").is_file():  # no model: at least its log
                tar.add(staging / f"device-run-{name}" / "log.jsonl", arcname=f"{name}.log.jsonl")
    data = tar_path.read_bytes()
    for i in range(0, len(data), PART_BYTES):
        (out / f"runs.tar.part{i // PART_BYTES}").write_bytes(data[i:i + PART_BYTES])


def unpack(folder: Path, dest: Path) -> None:
    """runs.tar.part* -> DEST/<run>/ checkpoints with fp32 weights."""
    import io

    from safetensors.torch import load_file, save_file

    parts = sorted(folder.glob("runs.tar.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        raise SystemExit(f"{folder}: no runs.tar.part* files")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts))) as tar:
        tar.extractall(dest, filter="data")
    for weights in dest.glob("*/model.safetensors"):
        state = load_file(str(weights))
        save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(weights))
        print(f"{weights.parent}: checkpoint (fp32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("pack", "run", "loco"):
        p = sub.add_parser(name)
        p.add_argument("--recipe", default=None, help="default: the trainer's default recipe")
        p.add_argument("--set", dest="sets", action="append", default=[])
    k = sub.choices["pack"]
    k.add_argument("--no-wheels", action="store_true")
    k.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, help="of the packed frames (smaller travels)")
    k.add_argument("--polyp-free", action="append", default=[], metavar="PATH",
                   help="a polyp-free folder to pack for LOCO folds' alarm rates (validation only)")
    sub.choices["loco"].add_argument("--only", required=True, metavar="SOURCE", help="the held-out source")
    for r in (sub.choices["run"], sub.choices["loco"]):
        r.add_argument("--out", type=Path, required=True, help="the run's model and records land here")
        r.add_argument("--device", default="cuda")
        r.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
        r.add_argument("--loader-workers", type=int, default=1, help="threads preparing batches ahead")
        r.add_argument("--compile", default="no", choices=["no", "default", "reduce-overhead"],
                       help="torch.compile the training step (fewer kernel launches)")
        r.add_argument("--precision", default="auto", choices=["auto", "bf16", "no"],
                       help="auto: bf16 autocast on CUDA (its casts add launches to a launch-bound step)")
    sub.choices["run"].add_argument("--half", action="store_true", help="weights in fp16")
    s = sub.add_parser("session")
    s.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-out")))
    s.add_argument("--budget", type=float, default=350, help="seconds each training run may take")
    s.add_argument("--check-timeout", type=float, default=150, help="seconds the GPU bench may take")
    s.add_argument("--runs", default="default,small-cases,large", help=f"of {', '.join(SESSION_RUNS)}")
    s.add_argument("--recipe", default=None, help="default: the trainer's default recipe")
    s.add_argument("--set", dest="sets", action="append", default=[], help="override for every run")
    s.add_argument("--split", default=None, help="split.json every run validates on (default: the shipped default's; "
                   "'' for the recipe's own)")
    s.add_argument("--device", default="cuda")
    s.add_argument("--compile", default="no", choices=["no", "default", "reduce-overhead"],
                   help="every run's training step compiled (on the H200, eager was launch-bound)")
    s.add_argument("--precision", default="auto", choices=["auto", "bf16", "no"], help="every run's precision")
    s.add_argument("--loco", action="append", default=[], metavar="NAME=RECIPE[@SEED]",
                   help="a leave-one-centre-out run: one process per held-out source (repeatable)")
    s.add_argument("--loco-set", action="append", default=[], metavar="KEY=VALUE", help="override for every LOCO run")
    s.add_argument("--check-first", action="store_true", help="the GPU bench before training, alone on the GPU")
    # CUDA graphs first: on the H200 eager mode was launch-bound (docs/runtime.md)
    s.add_argument("--check-args", default="--sizes 1920x1080,720x576 --frames 200 --variants cudagraphs:fp16,"
                   "compile:fp16,eager:fp32 --presets tiny,compact,large", help="device_check.py's arguments")
    s.add_argument("--budget-args", default="--size 1920x1080 --fps 60 --model-ms 0,5,10 --backend eager",
                   help="tools/live_budget.py's arguments (run after the check)")
    u = sub.add_parser("unpack")
    u.add_argument("folder", type=Path)
    u.add_argument("dest", type=Path)
    args = parser.parse_args()
    if args.cmd == "pack":
        pack(args.recipe, args.sets, not args.no_wheels, args.jpeg_quality, args.polyp_free)
    elif args.cmd == "run":
        run(args.recipe, args.sets, args.out, args.device, args.time_budget, args.half, args.loader_workers, args.compile,
            args.precision)
    elif args.cmd == "loco":
        loco(args.recipe, args.sets, args.only, args.out, args.device, args.time_budget, args.loader_workers,
             args.compile, args.precision)
    elif args.cmd == "session":
        sys.exit(session(args.out, args.budget, args.check_timeout, [r for r in args.runs.split(",") if r],
                         args.recipe, args.sets, args.split, args.device, args.check_args.split(), args.compile,
                         args.precision, args.loco, args.loco_set, args.check_first, args.budget_args.split()))
    else:
        unpack(args.folder, args.dest)


if __name__ == "__main__":
    main()
