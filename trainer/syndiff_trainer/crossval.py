"""Cross-validation of a recipe: grouped k-fold, and leave-one-source-out (cross-centre).

Every fold is an ordinary `fit` run of the recipe with a split file (whole groups per side), so
its folder records everything a single run does. The last checkpoint of each run is scored (no
selection on the scored fold). Finished folds are reused when the command is run again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from syndiff_stream.atomic import write_text
from syndiff_stream.model import Segmenter

from .data import apply_split, group_kfold, grouped_split, load_sources
from .evaluate import evaluate, source_table
from .recipe import Recipe, RecipeError
from .train import RunOptions, fit


def _fold_recipe(recipe: Recipe, split_file: Path) -> Recipe:
    return recipe.model_copy(update={"split": recipe.split.model_copy(update={"policy": "file", "file": str(split_file),
                                                                               "select_fraction": 0.0})})


def _train_and_score(recipe: Recipe, ds, split: dict, run: Path, **options) -> dict:
    result_file = run / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    run.mkdir(parents=True, exist_ok=True)
    split_file = run.parent / f"{run.name}-split.json"
    write_text(split_file, json.dumps(split, indent=1))
    fit(_fold_recipe(recipe, split_file), RunOptions(out=str(run), **options))
    result = evaluate(Segmenter.from_pretrained(run / "model"), apply_split(ds, split, "val"))
    write_text(result_file, json.dumps(result, indent=1))
    return result


def _mean_ci_row(label: str, results: list[dict], key: str = "dice") -> str:
    v = np.array([r[key] for r in results])
    return f"| {label} | {len(results)} | {v.mean():.3f} | {v.std():.3f} |"


def run_kfold(recipe: Recipe, out: Path, folds: int, **options) -> str:
    """Grouped k-fold: per fold the held-out groups' Dice (with its bootstrap CI and per-source rows)."""
    if folds < 2:
        raise RecipeError(f"--folds {folds}: need at least 2")
    out = Path(out)
    sources = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=False)
    results = []
    for k, split in enumerate(group_kfold(sources.ds, folds, recipe.split.seed)):
        results.append(_train_and_score(recipe, sources.ds, split, out / f"fold{k}", **options))
    lines = [f"### Grouped {folds}-fold cross-validation: {recipe.name}", "",
             "| fold | images | groups | Dice (95 % CI) | IoU |", "|---|---|---|---|---|"]
    for k, r in enumerate(results):
        lines.append(f"| {k} | {r['n']} | {r['groups']} | {r['dice']:.3f} ({r['dice_ci'][0]:.3f}-{r['dice_ci'][1]:.3f}) | "
                     f"{r['iou']:.3f} |")
    lines += ["", "| summary | folds | mean Dice | std over folds |", "|---|---|---|---|",
              _mean_ci_row("all sources", results)]
    for source in sorted(results[0].get("by_source", {})):
        lines.append(_mean_ci_row(source, [r["by_source"][source] for r in results if source in r.get("by_source", {})]))
    table = "\n".join(lines) + "\n"
    write_text(out / "results.json", json.dumps(results, indent=1))
    write_text(out / "table.md", table)
    return table


def run_cross_centre(recipe: Recipe, out: Path, **options) -> str:
    """For each source: train on the others, score every image of it (what a new hospital sees)."""
    names = [s.name for s in recipe.data]
    if len(names) < 2:
        raise RecipeError("cross-centre needs a recipe with at least two data sources")
    out = Path(out)
    sources = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=False)
    lines = [f"### Leave-one-source-out: {recipe.name}", "",
             "| held out | trained on | images | groups | Dice (95 % CI) | IoU (95 % CI) |", "|---|---|---|---|---|---|"]
    results = {}
    for held in names:
        split = grouped_split(sources.ds, 0.0, 0.0, recipe.split.seed, holdout=held)
        r = _train_and_score(recipe, sources.ds, split, out / f"holdout-{held}", **options)
        results[held] = r
        lines.append(f"| {held} | {', '.join(n for n in names if n != held)} | {r['n']} | {r['groups']} | "
                     f"{r['dice']:.3f} ({r['dice_ci'][0]:.3f}-{r['dice_ci'][1]:.3f}) | "
                     f"{r['iou']:.3f} ({r['iou_ci'][0]:.3f}-{r['iou_ci'][1]:.3f}) |")
    table = "\n".join(lines) + "\n"
    write_text(out / "results.json", json.dumps(results, indent=1))
    write_text(out / "table.md", table)
    return table


__all__ = ["run_kfold", "run_cross_centre", "source_table"]
