"""`syndiff-train`: train from recipes, evaluate, cross-validate, reproduce, synthesise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None,
                  pretty_exceptions_enable=False)

DATA_HELP = "dataset folder (Kvasir-SEG, CVC-ClinicDB, PraNet or paired images/masks layout)"
RECIPE_HELP = "recipe file (.toml) or shipped recipe name (default: the one that built the shipped default checkpoint)"
SET_HELP = "override one recipe key, e.g. --set optim.lr=5e-4 --set data.1.weight=2 (repeatable)"


@app.callback()
def main() -> None:
    """Companion trainer for syndiff-stream."""


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _recipe(recipe: Optional[str], sets: Optional[List[str]]):
    from .recipe import DEFAULT_RECIPE, RecipeError, load_recipe

    try:
        return load_recipe(recipe or DEFAULT_RECIPE, sets or [])
    except RecipeError as exc:
        _fail(exc)


def _run(fn, *args, **kwargs):
    """Call into the library; its known errors become one line and exit code 2."""
    from syndiff_stream.backends import BackendError
    from syndiff_stream.datasets import DatasetError
    from syndiff_stream.model import CheckpointError

    from .recipe import RecipeError

    try:
        return fn(*args, **kwargs)
    except (RecipeError, DatasetError, CheckpointError, BackendError) as exc:
        _fail(exc)


@app.command()
def fit(
    recipe: Optional[str] = typer.Option(None, metavar="RECIPE", help=RECIPE_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    out: Path = typer.Option(..., metavar="DIR", help="run folder: recipe, manifest, split, log, state, last/ and model/"),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto, cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="CPU threads for torch (recorded: float sums depend on it)"),
    stop_at: Optional[int] = typer.Option(None, metavar="N", help="stop after this stage-2 step; run again to resume"),
    progress: bool = typer.Option(True, help="show progress bars"),
    grad_accum: int = typer.Option(1, metavar="N", help="micro-batches per step and process (the recipe's batch_size "
                                   "stays the global batch)"),
    precision: str = typer.Option("auto", metavar="P", help="auto (bf16 autocast on GPU, float32 on CPU), bf16 or no"),
    loader_workers: int = typer.Option(1, metavar="N", help="threads preparing batches ahead (on a GPU one is too "
                                       "few); the batches, and so the weights, are the same for any N"),
    compile_: str = typer.Option("no", "--compile", metavar="MODE", help="torch.compile the training step: no, "
                                 "default or reduce-overhead (CUDA graphs); for GPUs, where kernel launches bound a step"),
    time_budget: Optional[float] = typer.Option(None, metavar="SECONDS", help="finish within this wall time: at the "
                                                "end of warm-up the run measures its pace and shortens its schedule to "
                                                "fit (recorded in its recipe)"),
):
    """Train a recipe (stage 1 mask autoencoder, stage 2 encoder + U-Net); resumes if OUT has state.

    The shipped default recipe on 2 CPU cores takes about 1 h (see README). Under `accelerate
    launch` it trains data-parallel on every process the launcher starts (docs/scale-out.md)."""
    from pydantic import ValidationError

    from syndiff_stream.model import validation_message

    from .train import RunOptions, fit as run_fit

    cfg = _recipe(recipe, set_)
    try:
        opts = RunOptions(out=str(out), device=device, threads=threads, stop_at=stop_at, progress=progress,
                          grad_accum=grad_accum, precision=precision, time_budget_s=time_budget,
                          loader_workers=loader_workers, compile=compile_)
    except ValidationError as exc:
        _fail(ValueError("--" + validation_message(exc).replace("_", "-")))
    result = _run(run_fit, cfg, opts)
    if result is not None:  # the main process's answer; the others of a launched run say nothing
        typer.echo(json.dumps(result))


@app.command()
def inpainter(
    recipe: Optional[str] = typer.Option(None, metavar="RECIPE", help="inpainter recipe file (.toml) or shipped "
                                         "name (default: inpainter-small)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP.replace(
        "optim.lr=5e-4 --set data.1.weight=2", "train.steps=2000 --set image_size=192")),
    out: Path = typer.Option(..., metavar="DIR", help="run folder: records, vae/, state/ and model/ (the pipeline)"),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto, cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="CPU threads for torch (recorded: float sums depend on it)"),
    stop_at: Optional[int] = typer.Option(None, metavar="N", help="stop after this stage-2 step; run again to resume"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Train a small text-conditioned inpainting latent diffusion model on the recipe's polyp frames
    (autoencoder, then U-Net + text encoder; prompts from the data) and write OUT/model/, a diffusers
    inpainting pipeline folder for `synth --weights` (docs/training.md). Resumes if OUT has state;
    `reproduce OUT/model` reruns it and compares the logs."""
    from .inpainter import DEFAULT_INPAINTER_RECIPE, fit_inpainter, load_inpainter_recipe
    from .recipe import RecipeError
    from .train import RunOptions

    try:
        cfg = load_inpainter_recipe(recipe or DEFAULT_INPAINTER_RECIPE, set_ or [])
    except RecipeError as exc:
        _fail(exc)
    result = _run(fit_inpainter, cfg, RunOptions(out=str(out), device=device, threads=threads, stop_at=stop_at,
                                                 progress=progress))
    typer.echo(json.dumps(result))


@app.command()
def reproduce(
    checkpoint: Path = typer.Argument(..., help="a checkpoint folder with recipe.toml, manifest.json and log.jsonl"),
    out: Path = typer.Option(..., metavar="DIR", help="run folder for the rerun"),
    stop_at: Optional[int] = typer.Option(None, metavar="N", help="spot check: stop at this step and compare the digest logged there"),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto, cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="default: the thread count the checkpoint recorded"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Rerun a checkpoint's recorded recipe on its recorded data and compare the weights (an
    inpainter's model or run folder: every loss and weights digest the two logs share)."""
    from .inpainter import is_inpainter_run, reproduce_inpainter
    from .train import RunOptions, explain, reproduce as run_reproduce

    run = reproduce_inpainter if is_inpainter_run(checkpoint) else run_reproduce
    report = _run(run, checkpoint, RunOptions(out=str(out), device=device, threads=threads, stop_at=stop_at,
                                              progress=progress))
    typer.echo(json.dumps(report))
    if report.get("identical") is False:
        typer.secho(explain(report), err=True)
        raise typer.Exit(1)
    if report.get("identical") and report.get("differences"):
        typer.secho("bit-identical, although the records differ in: " + "; ".join(report["differences"]), err=True)


@app.command()
def groups(
    recipe: Optional[str] = typer.Option(None, metavar="RECIPE", help=RECIPE_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    sheet: Optional[Path] = typer.Option(None, metavar="PNG", help="write a PNG contact sheet of the multi-image groups here"),
    limit: int = typer.Option(40, metavar="N", help="groups on the contact sheet"),
):
    """Show how the recipe's data is grouped (sequences, near-copy clusters) so a person can check it."""
    from .data import load_sources
    from .groups import contact_sheet, group_summary

    cfg = _recipe(recipe, set_)
    sources = _run(load_sources, cfg.data, cfg.image_size, cfg.split.phash_threshold, progress=False)
    summary = group_summary(sources.ds)
    typer.echo(json.dumps(summary["counts"]))
    for name, members in summary["multi"][:limit]:
        typer.echo(f"{name}: {' '.join(members)}")
    if sheet:
        contact_sheet(sources.ds, sheet, limit)
        typer.echo(f"contact sheet: {sheet}")


def _load_model(path: Optional[Path]):
    from syndiff_stream.model import CheckpointError, Segmenter

    try:
        return Segmenter.from_pretrained(path)
    except CheckpointError as exc:
        _fail(exc)


@app.command("eval")
def eval_(
    data: List[str] = typer.Option(..., metavar="PATH", help=DATA_HELP + "; repeat for several sources, NAME=PATH to name one"),
    model: Optional[Path] = typer.Option(None, metavar="DIR", help="checkpoint folder; default: the shipped model"),
    split_file: Optional[Path] = typer.Option(None, metavar="PATH", help="JSON with train / select / val stem lists; default: "
                                                         "the checkpoint's own split.json"),
    split: str = typer.Option("val", metavar="SIDE", help="which side to score: val, select, train or all"),
    subset: Optional[str] = typer.Option(None, metavar="TEXT", help="PraNet layout: the TestDataset/<name> to score"),
    steps: int = typer.Option(1, metavar="N", help="1 = single step; T > 1 = DDIM with T U-Net passes"),
    timestep: Optional[int] = typer.Option(None, metavar="N", help="single-step inference timestep (default: the model's)"),
    limit: Optional[int] = typer.Option(None, metavar="N", help="score only the first N images"),
    tta: bool = typer.Option(False, "--tta", help="flip test-time augmentation: average the frame and its "
                                                  "mirror (about twice the model time)"),
    skip_unpaired: bool = typer.Option(False, "--skip-unpaired", help="leave out images without a mask and "
                                                                     "unreadable files (reported)"),
    per_image: bool = typer.Option(False, help="add per-image rows"),
    against: Optional[Path] = typer.Option(None, metavar="PATH", help="also score this checkpoint on the same "
                                           "images and report the paired Dice difference with its 95 % CI"),
    polyp_free: Optional[List[str]] = typer.Option(None, "--polyp-free", metavar="PATH", help="folder of polyp-free "
                                                   "frames (images/, optional sequences.csv): frame-level specificity "
                                                   "after the operating point's threshold and minimum area; NAME=PATH "
                                                   "names it; repeatable"),
    crops: bool = typer.Option(True, help="also score specificity on polyp-free crops of the scored images"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="CPU threads for torch"),
):
    """Score a checkpoint: Dice and IoU with 95 % bootstrap CIs, HD95, NSD, polyps found; a row per
    source; specificity on polyp-free frames and crops."""
    import torch

    from syndiff_stream.model import default_checkpoint_path

    from .evaluate import evaluate, load_eval_data, paired_difference, paired_table, polyp_free_sets, source_table

    if split not in ("val", "select", "train", "all"):
        _fail(ValueError(f"--split {split!r}: choose val, select, train or all"))
    if threads:
        torch.set_num_threads(threads)
    seg = _load_model(model)
    if tta:
        seg.config.tta_flip = True
    warn = lambda msg: typer.secho(f"warning: {msg}", err=True, fg=typer.colors.YELLOW)  # noqa: E731
    ds = _run(load_eval_data, data, model or default_checkpoint_path(), split_file, split, subset,
              seg.config.image_size, warn, skip_unpaired)
    ds = ds.subset(range(min(limit, len(ds)))) if limit else ds
    free = _run(polyp_free_sets, polyp_free or [], data if crops else [], ds, model or default_checkpoint_path(),
                seg.config.image_size)
    result = evaluate(seg, ds, steps=steps, timestep=timestep, per_image=per_image or against is not None,
                      polyp_free=free)
    if against is not None:
        other = _load_model(against)
        if other.config.image_size != seg.config.image_size:
            _fail(ValueError(f"--against {against}: input size {other.config.image_size}, "
                             f"not {seg.config.image_size} like --model"))
        other.config.tta_flip = seg.config.tta_flip
        baseline = evaluate(other, ds, steps=steps, timestep=timestep, per_image=True, polyp_free=free)
        result["against"] = {"model": str(against), **paired_difference(result, baseline, ds),
                             "polyp_free": baseline.get("polyp_free", {})}
        if not per_image:
            result.pop("images")
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{result['n']} images in {result['groups']} groups, {steps} step(s) at t={result['timestep']}, "
               f"{result['ms_per_image']:.1f} ms/image, NSD {result['nsd']:.4f}")
    typer.echo(source_table(result))
    if against is not None:
        typer.echo(paired_table(result["against"]))


@app.command("operating-point")
def operating_point(
    data: List[str] = typer.Option(..., metavar="PATH", help=DATA_HELP + ": images with polyps (sensitivity); "
                                   "NAME=PATH to name one; repeatable"),
    polyp_free: List[str] = typer.Option(..., "--polyp-free", metavar="PATH", help="folder of polyp-free frames "
                                         "(images/, optional sequences.csv) whose alarm rate binds; repeatable"),
    model: Optional[Path] = typer.Option(None, metavar="DIR", help="checkpoint folder; default: the shipped model"),
    split: str = typer.Option("val", metavar="SIDE", help="which side of the checkpoint's split scores "
                              "sensitivity: val, select, train or all"),
    max_alarm: float = typer.Option(0.05, metavar="X", help="highest share of polyp-free frames with an alarm, per frame"),
    crops: bool = typer.Option(True, help="also report alarms on polyp-free crops of the scored images"),
    write: bool = typer.Option(False, "--write", help="set the chosen threshold and min_area in the checkpoint's "
                               "config.json, and keep the curve in operating_point.json"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="CPU threads for torch"),
):
    """Choose the checkpoint's threshold and minimum area from the curve of polyps found against
    alarms on polyp-free frames (docs/evaluation.md); --write stores them in the checkpoint."""
    import torch

    from syndiff_stream.model import default_checkpoint_path

    from .evaluate import load_eval_data, polyp_free_sets
    from .operating import choose, curve, curve_table, leave_one_group_out, write_operating_point

    if split not in ("val", "select", "train", "all"):
        _fail(ValueError(f"--split {split!r}: choose val, select, train or all"))
    if not 0 <= max_alarm < 1:
        _fail(ValueError(f"--max-alarm {max_alarm}: must be in [0, 1)"))
    if threads:
        torch.set_num_threads(threads)
    model_dir = model or default_checkpoint_path()
    seg = _load_model(model_dir)
    warn = lambda msg: typer.secho(f"warning: {msg}", err=True, fg=typer.colors.YELLOW)  # noqa: E731
    ds = _run(load_eval_data, data, model_dir, None, split, None, seg.config.image_size, warn)
    free = _run(polyp_free_sets, polyp_free, data if crops else [], ds, model_dir, seg.config.image_size)
    binding = [n for n in free if n != "crops of the scored images"]
    measured = curve(seg, ds, free)
    point = choose(measured["rows"], max_alarm, binding)
    honest = leave_one_group_out(measured["rows"], max_alarm, binding)
    was = {"threshold": seg.config.threshold, "min_area": seg.config.min_area}
    report = {"model": str(model_dir), "max_alarm": max_alarm, "binding": binding, "split": split,
              "chosen": {k: point[k] for k in ("threshold", "min_area", "sensitivity", "small_sensitivity", "dice",
                                               "alarm_rate")},
              "leave_one_group_out": honest, "previous": was, **measured}
    if write:
        write_operating_point(model_dir, point, report)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(curve_table(measured["rows"], list(free), point, top=25))
    c = report["chosen"]
    typer.echo(f"chosen: threshold {c['threshold']:.2f}, min area {c['min_area']:.3f}: polyps found "
               f"{100 * c['sensitivity']:.1f} %, " + ", ".join(f"alarms {100 * v:.1f} % on {n}" for n, v in c["alarm_rate"].items())
               + f"; chosen without each sequence in turn: {100 * honest['alarm_rate']:.1f} % alarms on it"
               + (f" -> written to {model_dir / 'config.json'}" if write else " (--write stores it)"))


@app.command("presence-head")
def presence_head_(
    model: Path = typer.Option(..., metavar="DIR", help="a finished checkpoint with its run's recipe.toml and "
                               "split.json (a run's model/ folder)"),
    out: Path = typer.Option(..., metavar="DIR", help="the new checkpoint: the same segmenter with a presence head"),
    steps: int = typer.Option(600, metavar="N", help="head training steps"),
    batch_size: int = typer.Option(32, metavar="N", help="samples a step, half polyp frames, half polyp-free"),
    lr: float = typer.Option(2e-3, metavar="X", help="AdamW learning rate (cosine to zero)"),
    seed: int = typer.Option(0, metavar="N", help="head initialisation, draws and augmentation"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="CPU threads for torch"),
    progress: bool = typer.Option(True, help="show data loading progress"),
):
    """Fit a frame-level presence head on a finished segmenter, everything else frozen: its masks
    stay as they were and its map becomes p(polyp in the frame) x p(pixel | polyp)
    (docs/training.md). Choose the operating point afterwards (`operating-point --write`)."""
    import torch

    from .presence import PresenceOptions, presence_head

    if threads:
        torch.set_num_threads(threads)
    try:
        options = PresenceOptions(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    except ValueError as exc:
        _fail(ValueError(str(exc).splitlines()[-1]))
    record = _run(presence_head, model, out, options, progress)
    d = record["data"]
    typer.echo(f"presence head: {out} ({options.steps} steps on {d['frames']} frames + {d['decoys']} decoys against "
               f"{d['crops']} crops + {d['erased']} erased frames of {', '.join(d['sources'])}); "
               f"next: syndiff-train operating-point --model {out} ... --write")


@app.command()
def kfold(
    recipe: Optional[str] = typer.Option(None, metavar="RECIPE", help=RECIPE_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    out: Path = typer.Option(..., metavar="DIR", help="folder: one run per fold, results.json and table.md"),
    folds: int = typer.Option(5, metavar="N", help="number of folds; whole groups per fold, balanced within each source"),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto, cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="CPU threads for torch"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Grouped k-fold cross-validation of a recipe: the last checkpoint of each fold scores its fold."""
    from .crossval import run_kfold

    cfg = _recipe(recipe, set_)
    table = _run(run_kfold, cfg, out, folds, device=device, threads=threads, progress=progress)
    typer.echo(table)


@app.command("cross-centre")
def cross_centre(
    recipe: Optional[str] = typer.Option(None, metavar="RECIPE", help=RECIPE_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    out: Path = typer.Option(..., metavar="DIR", help="folder: one run per held-out source, results.json and table.md"),
    only: Optional[str] = typer.Option(None, metavar="NAMES", help="comma-separated held-out sources to run now "
                                       "(one process per fold, sharing OUT); the table shows every finished fold"),
    polyp_free: Optional[List[str]] = typer.Option(None, "--polyp-free", metavar="PATH", help="folder of polyp-free "
                                                   "frames: each fold's alarm rate on it (NAME=PATH names it; repeatable)"),
    against: Optional[Path] = typer.Option(None, metavar="DIR", help="another cross-centre folder of the same sources: "
                                           "Dice differences per held-out centre and of the mean, paired image by image"),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto, cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="CPU threads for torch"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Leave one source out, in turn: train on the others, score the whole held-out source, its
    polyp-free crops and each --polyp-free folder. The mean over held-out centres and the worst one
    rank recipes (docs/training.md)."""
    from .crossval import run_cross_centre
    from .negatives import named_polyp_free

    cfg = _recipe(recipe, set_)
    names = tuple(n.strip() for n in (only or "").split(",") if n.strip())
    free = _run(named_polyp_free, polyp_free or [], cfg.image_size)
    table = _run(run_cross_centre, cfg, out, names, free, against, device=device, threads=threads, progress=progress)
    typer.echo(table)


@app.command("loco-compare")
def loco_compare(
    runs: List[Path] = typer.Argument(..., metavar="DIR...", help="cross-centre folders of one recipe (one per seed)"),
    against: List[Path] = typer.Option(..., metavar="DIR", help="a cross-centre folder of the recipe compared against "
                                       "(repeatable: one per seed)"),
    recipe: Optional[str] = typer.Option(None, metavar="RECIPE", help="the recipe whose sources group the images "
                                         "(default: the first run's recorded recipe)"),
    json_out: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="also write the report as JSON"),
):
    """Compare two recipes' leave-one-centre-out runs, several seeds each: every seed's Dice per
    held-out centre, the spread between seeds, and the difference of the seed-averaged Dice paired
    image by image (95 % CI over groups). The spread says how large a difference must be to rank."""
    from .crossval import compare_loco, compare_table

    if recipe is None:
        recorded = sorted(Path(runs[0]).glob("holdout-*/recipe.toml"))
        if not recorded:
            _fail(f"{runs[0]}: no holdout-*/recipe.toml; name the recipe with --recipe")
        recipe = str(recorded[0])
    report = _run(compare_loco, list(runs), list(against), _recipe(recipe, None))
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
    typer.echo(compare_table(report))


@app.command()
def synth(
    data: Path = typer.Option(..., metavar="PATH", help=DATA_HELP + ": base frames (unless --normal-frames) and real mask shapes"),
    out: Path = typer.Option(..., metavar="DIR", help="output dataset: images/ + masks/ (accepted), rejected/, manifest.jsonl"),
    count: int = typer.Option(..., metavar="N", help="accepted samples wanted"),
    weights: Optional[Path] = typer.Option(None, metavar="PATH", help="local diffusers inpainting folder (SDXL inpainting or other)"),
    method: str = typer.Option("inpaint", metavar="TEXT", help="inpaint (text-guided diffusion) or copy-paste (baseline)"),
    prompts: Optional[Path] = typer.Option(None, metavar="PATH", help="prompt bank (.json like the shipped one, or .txt "
                                           "one per line); default: the --weights folder's prompts.json if it has one "
                                           "(an `inpainter` model), else the shipped bank"),
    normal_frames: Optional[Path] = typer.Option(None, metavar="PATH", help="folder of polyp-free frames to inpaint into"),
    mask_source: str = typer.Option("mixed", metavar="TEXT", help="mixed, real (re-placed annotations) or parametric (ellipse/blob)"),
    resolution: Optional[int] = typer.Option(None, metavar="N", help="generation size (default: the pipeline's native size)"),
    steps: int = typer.Option(30, metavar="N", help="denoising steps"),
    guidance_scale: float = typer.Option(7.5, metavar="X", help="classifier-free guidance scale"),
    strength: float = typer.Option(0.99, metavar="X", help="inpainting strength (1.0: ignore the masked pixels)"),
    blend: str = typer.Option("seamless", metavar="TEXT", help="copy-paste blending: seamless (Poisson) or feather"),
    paint_margin: Optional[float] = typer.Option(None, metavar="X", help="inpaint: paint the polyp's mask grown by "
                                                 "this fraction of the side (the label stays the mask); default: "
                                                 "what an `inpainter` model was trained with, else 0"),
    gate_model: Optional[Path] = typer.Option(None, metavar="PATH", help="Segmenter checkpoint for the quality gate "
                                                         "(default: the shipped checkpoint)"),
    gate_threshold: float = typer.Option(0.7, metavar="X", help="keep samples with IoU(intended, predicted) >= this"),
    no_gate: bool = typer.Option(False, "--no-gate", help="accept every sample (no quality gate)"),
    max_attempts: Optional[int] = typer.Option(None, metavar="N", help="stop after this many samples (default 4 x count)"),
    seed: int = typer.Option(0, metavar="N", help="same seed, same samples"),
    batch_size: int = typer.Option(1, metavar="N", help="samples per pipeline call"),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto, cpu or cuda[:N]"),
    fp16: bool = typer.Option(False, "--fp16", help="half precision weights (GPU)"),
    cpu_offload: bool = typer.Option(False, "--cpu-offload", help="enable_model_cpu_offload (needs accelerate)"),
    attention_slicing: bool = typer.Option(False, "--attention-slicing", help="lower peak memory, slower"),
    keep_rejected: bool = typer.Option(True, help="write rejected samples under rejected/ for audit"),
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    """Text-guided synthetic polyps with a quality gate (DiffAug); resumable, same seed -> same samples."""
    from .synthetic import SynthConfig, run_synth

    cfg = SynthConfig(data=str(data), out=str(out), count=count, method=method,
                      weights=str(weights) if weights else None, prompts=str(prompts) if prompts else None,
                      normal_frames=str(normal_frames) if normal_frames else None, mask_source=mask_source,
                      resolution=resolution, steps=steps, guidance_scale=guidance_scale, strength=strength,
                      blend=blend, paint_margin=paint_margin, gate=not no_gate,
                      gate_model=str(gate_model) if gate_model else None,
                      gate_threshold=gate_threshold, max_attempts=max_attempts, seed=seed, batch_size=batch_size,
                      device=device, fp16=fp16, cpu_offload=cpu_offload, attention_slicing=attention_slicing,
                      keep_rejected=keep_rejected, progress=progress)
    try:
        summary = run_synth(cfg)
    except (ValueError, FileNotFoundError) as exc:  # WeightsError, DatasetError, bad prompt file: one line
        raise SystemExit(f"synth: {exc}") from None
    typer.echo(json.dumps(summary))


@app.command("synth-report")
def synth_report_(
    folder: Path = typer.Argument(..., help="a folder written by `syndiff-train synth` (kept rejected samples too)"),
    reference: Optional[List[Path]] = typer.Option(None, metavar="PATH", help="the generator's training frames "
                                                   "(repeatable): memorisation is the distance to their polyps"),
    control: Optional[List[Path]] = typer.Option(None, metavar="PATH", help="real frames the generator never saw "
                                                 "(repeatable): their polyps' distance to the reference is the yardstick"),
    gate_model: Optional[Path] = typer.Option(None, metavar="PATH", help="segmenter that measures the painted size "
                                              "(default: the shipped checkpoint; use the synth run's gate model)"),
    sheet: Optional[Path] = typer.Option(None, metavar="PNG", help="write the picture sheet here"),
    out: Optional[Path] = typer.Option(None, metavar="JSON", help="write the report here"),
):
    """Measure a synth run: the gate's pass rate per prompt attribute, requested against found
    polyp size, each accepted polyp's distance to the nearest training polyp, and a picture sheet."""
    from syndiff_stream.atomic import write_text

    from .gate import load_gate_model
    from .prompts import DEFAULT_SIZE_CLASSES
    from .synth_report import synth_report

    try:
        report = synth_report(folder, [str(p) for p in reference or []], [str(p) for p in control or []],
                              load_gate_model(str(gate_model) if gate_model else None), dict(DEFAULT_SIZE_CLASSES),
                              sheet)
    except (ValueError, FileNotFoundError, OSError) as exc:
        _fail(exc)
    text = json.dumps(report, indent=1)
    if out:
        write_text(out, text)
    typer.echo(text)


@app.command()
def ablate(
    recipe: Optional[str] = typer.Option(None, metavar="RECIPE", help=RECIPE_HELP),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP + "; applies to every row"),
    out: Path = typer.Option(..., metavar="DIR", help="folder for fold runs, ablation.md and ablation.json (resumable)"),
    row: Optional[List[str]] = typer.Option(None, "--row", metavar="ROW", help="custom row 'name: key=value, key=value' "
                                                                "(repeatable), e.g. 'scope: augment.preset=scope'"),
    paper_rows: bool = typer.Option(True, help="include the papers' rows (real only, synthetic, traditional "
                                               "augmentation, frozen encoder, noise only, multi-step)"),
    synthetic: Optional[Path] = typer.Option(None, metavar="PATH", help="synth output for the text-guided rows"),
    counts: str = typer.Option("20,50,100,200", metavar="TEXT", help="synthetic sample counts, comma-separated"),
    copy_paste: Optional[Path] = typer.Option(None, metavar="PATH", help="synth --method copy-paste output (baseline row)"),
    copy_paste_count: int = typer.Option(100, metavar="N", help="copy-paste samples in the baseline row"),
    folds: int = typer.Option(5, metavar="N", min=1, help="k of grouped k-fold cross-validation; 1: the recipe's own "
                                                           "grouped split (the default checkpoint's validation)"),
    tta_row: bool = typer.Option(False, help="add an inference-only row: the first row's models with flip TTA"),
    limit: Optional[int] = typer.Option(None, metavar="N", help="use about this many real images, whole groups (reduced scale)"),
    multistep: int = typer.Option(50, metavar="N", help="DDIM steps for the multi-step inference row"),
    base_augment: str = typer.Option("none", metavar="TEXT", help="augmentation of the papers' rows but 'traditional'"),
    only: Optional[str] = typer.Option(None, metavar="TEXT", help="comma-separated row names to run (default: all)"),
    device: str = typer.Option("auto", metavar="DEVICE", help="auto, cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, metavar="N", help="CPU threads for torch"),
    cache_dir: Optional[Path] = typer.Option(None, metavar="PATH", help="decoded-dataset cache (default ~/.cache/syndiff-stream)"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Ablations of a recipe under grouped validation: one table, a row per change, mean ± std and CI.

    Shorten every run with --set, e.g. --set steps=300 --set stage1.steps=100."""
    from .ablate import AblateConfig, run_ablation

    cfg = _recipe(recipe, set_)
    options = {"device": device, "threads": threads, "progress": progress,
               **({"cache_dir": str(cache_dir)} if cache_dir else {})}
    acfg = AblateConfig(recipe=cfg, out=str(out), synthetic=str(synthetic) if synthetic else None,
                        copy_paste=str(copy_paste) if copy_paste else None,
                        counts=tuple(int(c) for c in counts.split(",") if c.strip()), copy_paste_count=copy_paste_count,
                        folds=folds, limit=limit, multistep=multistep, base_augment=base_augment, paper_rows=paper_rows,
                        custom_rows=tuple(row or ()), only=tuple(o.strip() for o in only.split(",")) if only else (),
                        tta_row=tta_row, options=options)
    summary = _run(run_ablation, acfg)
    typer.echo((out / "ablation.md").read_text())
    typer.echo(json.dumps({"out": str(out), "rows": len(summary["rows"])}))


@app.command("eval-video")
def eval_video(
    source: str = typer.Argument(..., help="video file (with --masks), folder with sequences.csv, or pseudo:FOLDER"),
    masks: Optional[Path] = typer.Option(None, metavar="DIR", help="video input: folder of one mask per frame, in frame order"),
    fps: Optional[float] = typer.Option(None, metavar="X", help="frame rate the frames are played at (sequences, pseudo: 25; video: its own)"),
    model: Optional[Path] = typer.Option(None, metavar="DIR", help="checkpoint folder; default: the shipped compact model"),
    backend: str = typer.Option("auto", metavar="BACKEND", help="eager | compile | onnx | tensorrt | auto, as in syndiff-stream run"),
    device: str = typer.Option("auto", metavar="DEVICE"),
    threads: Optional[int] = typer.Option(None, metavar="N"),
    profile: Optional[Path] = typer.Option(None, metavar="FILE", help="calibration profile, as in run (preprocessing, threshold, smoothing, gating)"),
    smooth: bool = typer.Option(True, help="temporal smoothing, as in run"),
    gate_persist: Optional[int] = typer.Option(None, metavar="N", help="report a polyp from its Nth consecutive frame (default: as run)"),
    gate_hold: Optional[int] = typer.Option(None, metavar="N", help="keep a reported polyp M frames after it vanishes (default: as run)"),
    polyps: str = typer.Option("auto", metavar="RULE", help="truth polyps: overlap (tracks), clip (one per clip), auto (clip for sequences)"),
    hit_iou: float = typer.Option(0.1, metavar="X", help="a polyp is hit when the predictions touching it reach this IoU"),
    min_hits: int = typer.Option(1, metavar="N", help="... and detected when hit in this many consecutive frames"),
    fa_frames: int = typer.Option(1, metavar="N", help="a false alarm lasting this many frames is one event"),
    sweep: str = typer.Option("1-8", metavar="LIST", help="gating persistence values to trade off (e.g. 1-8 or 1,3,5; '' for none)"),
    sweep_hold: str = typer.Option("", metavar="LIST", help="gating hold values for the trade-off, e.g. 0,5 (default: --gate-hold)"),
    limit: Optional[int] = typer.Option(None, metavar="N", help="only the first N sequences / images"),
    frames_per_image: int = typer.Option(30, metavar="N", help="pseudo: frames per still image"),
    report: Optional[Path] = typer.Option(None, metavar="DIR", help="write a self-contained HTML report (index.html) here"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    split: str = typer.Option("val", metavar="SIDE", help="val: only clips the checkpoint never trained on (its "
                                                       "manifest and split.json); all: every clip"),
):
    """Clinical video evaluation: per-polyp sensitivity, time to first detection, false alarms per minute, flicker."""
    args = dict(locals())
    from .video_eval import run_eval_video

    run_eval_video(**args)


if __name__ == "__main__":
    app()
