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
from .negatives import crops_of
from .recipe import NegativesSpec, Recipe, RecipeError
from .train import RunOptions, fit, load_source_crops


def _fold_recipe(recipe: Recipe, split_file: Path) -> Recipe:
    return recipe.model_copy(update={"split": recipe.split.model_copy(update={"policy": "file", "file": str(split_file),
                                                                               "select_fraction": 0.0})})


def _train(recipe: Recipe, split: dict, run: Path, **options) -> None:
    """One fold: an ordinary run of the recipe on a split file (resumed if interrupted)."""
    if (run / "model").is_dir():
        return
    run.mkdir(parents=True, exist_ok=True)
    split_file = run.parent / f"{run.name}-split.json"
    write_text(split_file, json.dumps(split, indent=1))
    fit(_fold_recipe(recipe, split_file), RunOptions(out=str(run), **options))


def _train_and_score(recipe: Recipe, ds, split: dict, run: Path, **options) -> dict:
    result_file = run / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    _train(recipe, split, run, **options)
    result = evaluate(Segmenter.from_pretrained(run / "model"), apply_split(ds, split, "val"), per_image=True)
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


def _score_fold(run: Path, ds, split: dict, polyp_free: dict, crops) -> dict:
    """The fold's last checkpoint on its held-out images (per image, for pairing) and on every
    polyp-free set; a finished fold's result is reused, and completed when it lacks a set."""
    result_file = run / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    held = apply_split(ds, split, "val")
    sets = dict(polyp_free)
    if crops is not None:
        sets["crops of the held-out centre"] = crops_of(crops, held)
    if result is not None and "images" in result and set(sets) <= set(result.get("polyp_free", {})):
        return result
    result = evaluate(Segmenter.from_pretrained(run / "model"), held, per_image=True, polyp_free=sets)
    write_text(result_file, json.dumps(result, indent=1))
    return result


def run_cross_centre(recipe: Recipe, out: Path, only: tuple[str, ...] = (), polyp_free: dict | None = None,
                     against: Path | None = None, **options) -> str:
    """For each source: train on the others, score every image of it (what a new hospital sees),
    and its polyp-free crops, and each `polyp_free` set. `only` runs just the named held-out
    sources (several processes or machines can share the folder, one fold each); the table covers
    every fold finished so far. `against`: another cross-centre folder of the same sources, whose
    folds are compared image by image (`paired_loco`)."""
    names = [s.name for s in recipe.data]
    if len(names) < 2:
        raise RecipeError("cross-centre needs a recipe with at least two data sources")
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise RecipeError(f"--only {','.join(unknown)}: no such source (the recipe has {', '.join(names)})")
    if against is not None and not Path(against).is_dir():
        raise RecipeError(f"--against {against}: no such cross-centre folder")
    out = Path(out)
    cache_dir = Path(options["cache_dir"]) if options.get("cache_dir") else None
    sources = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=False,
                           **({"cache_dir": cache_dir} if cache_dir else {}))

    results = {}
    for held in names:
        run = out / f"holdout-{held}"
        split = grouped_split(sources.ds, 0.0, 0.0, recipe.split.seed, holdout=held)
        if only and held not in only:
            if not (run / "model").is_dir():
                continue
        else:
            _train(recipe, split, run, **options)
        # the held-out centre's crops, loaded only to score (a fold's training holds its own), cut
        # with the default crop settings: every recipe compared is scored on the same crops
        crops = load_source_crops(recipe, cache_dir=cache_dir, only=(held,), spec=NegativesSpec())
        results[held] = _score_fold(run, sources.ds, split, polyp_free or {}, crops)
    summary = {"folds": results, "summary": loco_summary(results)}
    if against is not None:
        summary["against"] = {"folder": str(against),
                              **paired_loco(results, _fold_results(Path(against), list(results)), sources.ds)}
    table = loco_table(recipe.name, names, summary)
    write_text(out / "results.json", json.dumps(summary, indent=1))
    write_text(out / "table.md", table)
    return table


def _fold_results(folder: Path, held: list[str]) -> dict:
    """Another cross-centre folder's per-fold results (with per-image rows) for these held-out sources."""
    out = {}
    for name in held:
        path = folder / f"holdout-{name}" / "result.json"
        if not path.is_file():
            raise RecipeError(f"--against {folder}: no finished fold holding out {name!r} ({path})")
        out[name] = json.loads(path.read_text())
        if "images" not in out[name]:
            raise RecipeError(f"--against {folder}: fold {name!r} has no per-image rows; run cross-centre there again")
    return out


def loco_summary(results: dict) -> dict:
    """What ranks recipes: the mean over held-out centres (each centre counts once, whatever its
    size) and the worst centre, of Dice and of polyps found; alarms on each polyp-free set."""
    if not results:
        return {}
    dice = {k: r["dice"] for k, r in results.items()}
    found = {k: r["polyps_found"] / max(1, r["polyps"]) for k, r in results.items()}
    worst = min(dice, key=dice.get)
    out = {"centres": len(results), "mean_dice": float(np.mean(list(dice.values()))), "worst_centre": worst,
           "worst_dice": dice[worst], "mean_polyps_found": float(np.mean(list(found.values())))}
    free_sets = sorted({n for r in results.values() for n in r.get("polyp_free", {})})
    out["mean_alarm_rate"] = {n: float(np.mean([r["polyp_free"][n]["alarm_rate"] for r in results.values()
                                                if n in r.get("polyp_free", {})])) for n in free_sets}
    return out


def paired_loco(results: dict, baseline: dict, ds, samples: int = 2000, seed: int = 0) -> dict:
    """Dice of these folds minus the baseline's, image by image on each held-out centre, with a
    95 % bootstrap interval over that centre's groups; and of the leave-one-centre-out mean, each
    resample drawing every centre's groups afresh (centres weigh equally, as in the mean)."""
    group = dict(zip(ds.stems, ds.groups))
    rng = np.random.default_rng(seed)
    per_centre, draws = {}, []
    for name, r in results.items():
        base = {row["stem"]: row["dice"] for row in baseline[name]["images"]}
        rows = [row for row in r["images"] if row["stem"] in base]
        diff = np.array([row["dice"] - base[row["stem"]] for row in rows])
        groups = np.array([group.get(row["stem"], row["stem"]) for row in rows])
        keys, inverse = np.unique(groups, return_inverse=True)
        sums = np.bincount(inverse, weights=diff, minlength=len(keys))
        counts = np.bincount(inverse, minlength=len(keys)).astype(float)
        pick = rng.integers(0, len(keys), size=(samples, len(keys)))
        means = sums[pick].sum(1) / counts[pick].sum(1)
        draws.append(means)
        per_centre[name] = {"n": int(len(diff)), "dice": float(diff.mean()), "baseline_dice": baseline[name]["dice"],
                            "dice_ci": [float(x) for x in np.percentile(means, [2.5, 97.5])]}
    mean_draws = np.mean(draws, axis=0)
    return {"by_centre": per_centre, "mean_dice": float(np.mean([c["dice"] for c in per_centre.values()])),
            "mean_dice_ci": [float(x) for x in np.percentile(mean_draws, [2.5, 97.5])],
            "baseline_mean_dice": float(np.mean([c["baseline_dice"] for c in per_centre.values()]))}


def mean_of_runs(runs: list[dict]) -> dict:
    """Several cross-centre runs of one recipe (seeds) as one: each image's Dice averaged over the
    runs that scored it (images every run scored), each centre's Dice over the runs."""
    out = {}
    for name in runs[0]:
        per_run = [{row["stem"]: row["dice"] for row in r[name]["images"]} for r in runs]
        stems = [s for s in per_run[0] if all(s in p for p in per_run[1:])]
        out[name] = {"dice": float(np.mean([r[name]["dice"] for r in runs])),
                     "images": [{"stem": s, "dice": float(np.mean([p[s] for p in per_run]))} for s in stems]}
    return out


def compare_loco(runs: list[Path], against: list[Path], recipe: Recipe, cache_dir: Path | None = None) -> dict:
    """A recipe's cross-centre folders (one per seed) against another's: each folder's Dice per
    held-out centre and mean, the spread between one recipe's seeds, and the difference of the
    seed-averaged Dice, paired image by image (`paired_loco`). With one seed each this is what
    `cross-centre --against` reports; with two or more, training noise enters the comparison
    instead of being paired away."""
    for folder in [*runs, *against]:
        if not Path(folder).is_dir():
            raise RecipeError(f"{folder}: no such cross-centre folder")
    held = [s.name for s in recipe.data if all((Path(f) / f"holdout-{s.name}" / "result.json").is_file()
                                                for f in [*runs, *against])]
    if not held:
        raise RecipeError("no held-out centre is finished in every folder compared")
    sources = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=False,
                           **({"cache_dir": cache_dir} if cache_dir else {}))
    a = [_fold_results(Path(f), held) for f in runs]
    b = [_fold_results(Path(f), held) for f in against]

    def seeds(results: list[dict]) -> dict:
        means = [float(np.mean([r[n]["dice"] for n in held])) for r in results]
        return {"dice": {n: [r[n]["dice"] for r in results] for n in held}, "mean_dice": means,
                "spread": {**{n: float(np.ptp([r[n]["dice"] for r in results])) for n in held},
                           "mean": float(np.ptp(means))}}

    return {"held_out": held, "runs": [str(f) for f in runs], "against": [str(f) for f in against],
            "recipe": seeds(a), "baseline": seeds(b), "paired": paired_loco(mean_of_runs(a), mean_of_runs(b), sources.ds)}


def compare_table(report: dict) -> str:
    """Markdown of `compare_loco`: each seed's Dice, the spread of seeds, the paired difference."""
    a, b, p = report["recipe"], report["baseline"], report["paired"]

    def cells(x: dict, key) -> str:
        values = x["dice"][key] if key != "mean" else x["mean_dice"]
        return " / ".join(f"{v:.3f}" for v in values) + (f" (spread {x['spread'][key]:.3f})" if len(values) > 1 else "")

    lines = [f"runs: {', '.join(report['runs'])}", f"against: {', '.join(report['against'])}", "",
             "| held out | Dice, each run | Dice, each run compared against | difference of the runs' mean, paired (95 % CI) |",
             "|---|---|---|---|"]
    for n in report["held_out"]:
        d = p["by_centre"][n]
        lines.append(f"| {n} | {cells(a, n)} | {cells(b, n)} | {d['dice']:+.3f} ({d['dice_ci'][0]:+.3f} to {d['dice_ci'][1]:+.3f}) |")
    lines.append(f"| **mean** | {cells(a, 'mean')} | {cells(b, 'mean')} | **{p['mean_dice']:+.3f} "
                 f"({p['mean_dice_ci'][0]:+.3f} to {p['mean_dice_ci'][1]:+.3f})** |")
    return "\n".join(lines) + "\n"


def loco_table(title: str, names: list[str], summary: dict) -> str:
    """Markdown: a row per held-out centre, the mean and the worst; polyp-free alarms; the paired
    difference to another folder's folds when there is one."""
    folds, s = summary["folds"], summary["summary"]
    free_sets = sorted({n for r in folds.values() for n in r.get("polyp_free", {})})
    lines = [f"### Leave-one-centre-out: {title}", "",
             "| held out | trained on | images | groups | Dice (95 % CI) | polyps found | small polyps found | "
             + "".join(f"alarm frames: {n} | " for n in free_sets),
             "|---|---|---|---|---|---|---|" + "---|" * len(free_sets)]
    for held, r in folds.items():
        cells = "".join(f"{100 * r['polyp_free'][n]['alarm_rate']:.1f} % | " if n in r.get("polyp_free", {}) else "- | "
                        for n in free_sets)
        lines.append(f"| {held} | {', '.join(n for n in names if n != held)} | {r['n']} | {r['groups']} | "
                     f"{r['dice']:.3f} ({r['dice_ci'][0]:.3f}-{r['dice_ci'][1]:.3f}) | {r['polyps_found']} of {r['polyps']} | "
                     f"{r.get('small_polyps_found', 0)} of {r.get('small_polyps', 0)} | {cells}")
    if s:
        cells = "".join(f"{100 * s['mean_alarm_rate'][n]:.1f} % | " for n in free_sets)
        lines.append(f"| **mean of {s['centres']}** | | | | **{s['mean_dice']:.3f}** | {100 * s['mean_polyps_found']:.1f} % | | {cells}")
        lines.append(f"| worst | {s['worst_centre']} | | | {s['worst_dice']:.3f} | | | " + "| " * len(free_sets))
    paired = summary.get("against")
    if paired:
        lines += ["", f"Against {paired['folder']} (the same held-out images, paired; 95 % CI over groups):", "",
                  "| held out | its Dice | Dice difference (95 % CI) |", "|---|---|---|"]
        for held, r in paired["by_centre"].items():
            lines.append(f"| {held} | {r['baseline_dice']:.3f} | {r['dice']:+.3f} ({r['dice_ci'][0]:+.3f} to {r['dice_ci'][1]:+.3f}) |")
        lines.append(f"| **mean** | {paired['baseline_mean_dice']:.3f} | **{paired['mean_dice']:+.3f} "
                     f"({paired['mean_dice_ci'][0]:+.3f} to {paired['mean_dice_ci'][1]:+.3f})** |")
    return "\n".join(lines) + "\n"


__all__ = ["run_kfold", "run_cross_centre", "source_table"]
