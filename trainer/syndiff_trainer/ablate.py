"""Ablations of a recipe under grouped validation, as one resumable command.

`folds >= 2` is grouped k-fold cross-validation; `folds = 1` is the recipe's own grouped split,
the validation the shipped checkpoint's card reports, so a row reads against the default directly
(one run a row: what a CPU budget allows).

Every row changes what it names from the base recipe (`--set`-style overrides on the same folds,
the same seed and, where the row keeps the architecture, the same stage-1 mask autoencoder per
fold), so rows differ only in that. The paper's rows:
  real only | + text-guided synthetic (N) | + copy-paste (N) | traditional augmentation |
  frozen vision encoder | noise loss only (lambda = 0) | multi-step inference (T steps, DDIM)
and any number of custom rows (`--row "scope-aug: augment.preset=scope"`). Synthetic samples built
from a validation fold's frames or polyps are left out of that fold's training set. The last
checkpoint is scored (the fold is not used to pick a checkpoint). Writes ablation.md (mean ± std
over folds, and the pooled 95 % group-bootstrap CI) and ablation.json; finished runs are reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from syndiff_stream.atomic import write_text
from syndiff_stream.datasets import DatasetError
from syndiff_stream.model import Segmenter

from .data import ArrayDataset, apply_split, group_kfold, grouped_split, load_sources
from .evaluate import bootstrap_ci, evaluate
from .recipe import Recipe, RecipeError, apply_sets, recipe_from_dict
from .synthetic import load_synthetic, synthetic_view
from .train import RunOptions, fit


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    sets: tuple[str, ...] = ()
    eval_steps: int = 1
    reuse: str | None = None  # score the models of this row instead of training
    synthetic: str | None = None  # per-fold view of this synthetic folder (validation frames left out)
    synthetic_count: int | None = None
    tta_flip: bool = False  # score with flip test-time augmentation (an inference-only row)


@dataclass
class AblateConfig:
    recipe: Recipe
    out: str
    synthetic: str | None = None  # `synth --method inpaint` output
    copy_paste: str | None = None  # `synth --method copy-paste` output (baseline)
    counts: tuple[int, ...] = (20, 50, 100, 200)
    copy_paste_count: int = 100
    folds: int = 5
    limit: int | None = None  # about this many real images, whole groups, seeded: reduced scale on CPU
    multistep: int = 50
    base_augment: str = "none"  # the paper's rows: real only has no augmentation
    paper_rows: bool = True
    custom_rows: tuple[str, ...] = ()  # "name: key=value, key=value"
    only: tuple[str, ...] = ()  # run just these rows (names as in ablation.json)
    tta_row: bool = False  # add an inference-only row: the first row's models with flip TTA
    options: dict = field(default_factory=dict)  # RunOptions fields: device, threads, progress, cache_dir


def parse_row(text: str) -> Row:
    name, sep, body = text.partition(":")
    name = name.strip()
    if not sep or not name:
        raise RecipeError(f"--row {text!r}: expected 'name: key=value, key=value'")
    sets = tuple(s.strip() for s in body.split(",") if s.strip())
    if not sets:
        raise RecipeError(f"--row {text!r}: no key=value overrides")
    return Row(name, f"{name} ({', '.join(sets)})", sets)


def rows(cfg: AblateConfig) -> list[Row]:
    out: list[Row] = []
    if cfg.paper_rows:
        out.append(Row("real", "Real only"))
        if cfg.synthetic:
            out += [Row(f"text-guided-{n}", f"+ text-guided synthetic ({n})", synthetic=cfg.synthetic, synthetic_count=n)
                    for n in cfg.counts]
        if cfg.copy_paste:
            out.append(Row(f"copy-paste-{cfg.copy_paste_count}", f"+ copy-paste ({cfg.copy_paste_count})",
                           synthetic=cfg.copy_paste, synthetic_count=cfg.copy_paste_count))
        out += [Row("traditional", "Traditional augmentation", ("augment.preset=standard",)),
                Row("frozen-encoder", "Frozen vision encoder", ("model.freeze_encoder=true",)),
                Row("noise-only", "Noise loss only (lambda = 0)", ("loss.latent_weight=0",)),
                Row(f"multistep-{cfg.multistep}", f"Multi-step inference (T = {cfg.multistep})",
                    eval_steps=cfg.multistep, reuse="real")]
    else:
        out.append(Row("base", f"Base recipe ({cfg.recipe.name})"))
    out += [parse_row(r) for r in cfg.custom_rows]
    if cfg.tta_row:
        out.append(Row("flip-tta", f"Flip test-time augmentation (models of '{out[0].name}')", reuse=out[0].name,
                       tta_flip=True))
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise RecipeError(f"ablation row names must be unique, got {names}")
    if cfg.only:
        unknown = set(cfg.only) - set(names)
        if unknown:
            raise RecipeError(f"unknown ablation row(s) {sorted(unknown)}; have {', '.join(names)}")
        needed = set(cfg.only) | {r.reuse for r in out if r.name in cfg.only and r.reuse}
        out = [r for r in out if r.name in needed]
    return out


def _base_recipe(cfg: AblateConfig) -> Recipe:
    if not cfg.paper_rows:
        return cfg.recipe
    return cfg.recipe.model_copy(update={"augment": cfg.recipe.augment.model_copy(update={"preset": cfg.base_augment})})


def _limit(ds: ArrayDataset, limit: int | None, seed: int) -> ArrayDataset:
    if not limit or limit >= len(ds):
        return ds
    order = sorted(set(ds.groups))
    np.random.default_rng(seed).shuffle(order)
    keep, count = set(), 0
    sizes = {g: ds.groups.count(g) for g in order}
    for g in order:
        if count >= limit:
            break
        keep.add(g)
        count += sizes[g]
    return ds.subset([i for i, g in enumerate(ds.groups) if g in keep])


def run_ablation(cfg: AblateConfig) -> dict:
    for label, path in (("--synthetic", cfg.synthetic), ("--copy-paste", cfg.copy_paste)):
        if path and not Path(path).is_dir():  # checked before any training
            raise RecipeError(f"{label} {path}: folder does not exist")
    table_rows = rows(cfg)
    out = Path(cfg.out)
    base = _base_recipe(cfg)
    sources = load_sources(base.data, base.image_size, base.split.phash_threshold, progress=False)
    ds = _limit(sources.ds, cfg.limit, base.seed)
    if cfg.folds == 1:  # the recipe's grouped split: the default checkpoint's validation
        splits = [grouped_split(ds, base.split.val_fraction, 0.0, base.split.seed,
                                holdout=base.split.holdout if base.split.policy == "holdout-source" else None)]
    else:
        splits = group_kfold(ds, cfg.folds, base.split.seed)
    results: dict[str, list[dict]] = {r.name: [] for r in table_rows}
    skipped: dict[str, str] = {}
    first = table_rows[0].name
    for k, split in enumerate(splits):
        fold_dir = out / "folds" / f"fold{k}"
        split_file = fold_dir / "split.json"
        write_text(split_file, json.dumps(split, indent=1))
        val = apply_split(ds, split, "val")
        for row in table_rows:
            run_dir = out / "runs" / (row.reuse or row.name) / f"fold{k}"
            result_file = out / "runs" / row.name / f"fold{k}" / "result.json"
            if result_file.is_file():
                results[row.name].append(json.loads(result_file.read_text()))
                continue
            if row.name in skipped:
                continue
            if not row.reuse:
                sets = ["split.policy=\"file\"", f"split.file=\"{split_file}\"", "split.select_fraction=0", *row.sets]
                mask_ae = out / "runs" / first / f"fold{k}" / "mask_ae"
                if (row.name != first and (mask_ae / "config.json").is_file() and not base.model.init_from
                        and not _changes_architecture(row)):
                    sets.append(f"model.init_from=\"{mask_ae}\"")  # same stage-1 autoencoder as the first row
                if row.synthetic:
                    view = synthetic_view(row.synthetic, fold_dir / f"synthetic-{row.name}",
                                          [s.split("/", 1)[-1] for s in split["val"]])
                    try:
                        load_synthetic(view, row.synthetic_count, 8, base.seed)  # enough of them?
                    except DatasetError as exc:
                        skipped[row.name] = f"fold {k}: {exc}"
                        continue
                    sets += [f"synthetic.path=\"{view}\"", f"synthetic.count={row.synthetic_count}"]
                recipe = recipe_from_dict(apply_sets(base.model_dump(mode="json"), sets), f"ablation row {row.name}")
                fit(recipe, RunOptions(out=str(run_dir), **cfg.options))
            model = Segmenter.from_pretrained(run_dir / "last")
            model.config.tta_flip = row.tta_flip
            res = evaluate(model, val, steps=row.eval_steps, per_image=True)
            score = {"fold": k, **{key: res[key] for key in ("dice", "iou", "hd95", "nsd", "n", "steps", "dice_ci",
                                                              "ms_per_image", "small_polyps", "small_polyps_found")},
                     "by_source": {name: {key: r[key] for key in ("dice", "dice_ci", "n", "small_polyps",
                                                                  "small_polyps_found")}
                                   for name, r in res.get("by_source", {}).items()},
                     "images": [{"stem": r["stem"], "dice": r["dice"]} for r in res["images"]]}
            write_text(result_file, json.dumps(score, indent=1))
            results[row.name].append(score)
    group = dict(zip(ds.stems, ds.groups))
    summary = {"folds": cfg.folds, "images": len(ds), "steps": base.steps, "seed": base.seed, "recipe": base.name,
               "rows": [{"name": r.name, "label": r.label, "sets": list(r.sets), "folds": results[r.name],
                         **_mean_std(results[r.name], group), **({"skipped": skipped[r.name]} if r.name in skipped else {})}
                        for r in table_rows]}
    write_text(out / "ablation.json", json.dumps(summary, indent=1))
    write_text(out / "ablation.md", markdown_table(summary))
    return summary


def _changes_architecture(row: Row) -> bool:
    """Rows that change the network or its input size train their own stage 1."""
    return any(s.split("=", 1)[0].strip() in ("model.preset", "image_size") or s.startswith("model.overrides")
               for s in row.sets)


def _mean_std(scores: list[dict], group: dict[str, str]) -> dict:
    if not scores:
        return {}
    dice, iou = np.array([s["dice"] for s in scores]), np.array([s["iou"] for s in scores])
    images = [im for s in scores for im in s.get("images", [])]
    ci = bootstrap_ci([im["dice"] for im in images], [group.get(im["stem"], im["stem"]) for im in images]) \
        if images else (float("nan"), float("nan"))
    by_source: dict[str, dict] = {}
    for name in sorted({n for s in scores for n in s.get("by_source", {})}):
        stems = [im for im in images if im["stem"].split("/", 1)[0] == name]
        by_source[name] = {"dice_mean": float(np.mean([im["dice"] for im in stems])) if stems else float("nan"),
                           "dice_ci": list(bootstrap_ci([im["dice"] for im in stems],
                                                        [group.get(im["stem"], im["stem"]) for im in stems]))
                           if stems else [float("nan")] * 2}
    return {"dice_mean": float(dice.mean()), "dice_std": float(dice.std()), "dice_ci": list(ci),
            "iou_mean": float(iou.mean()), "iou_std": float(iou.std()), "by_source": by_source,
            "small_polyps": sum(s.get("small_polyps", 0) for s in scores),
            "small_polyps_found": sum(s.get("small_polyps_found", 0) for s in scores),
            "ms_per_image": float(np.mean([s["ms_per_image"] for s in scores if "ms_per_image" in s] or [float("nan")]))}


def markdown_table(summary: dict) -> str:
    how = ("the recipe's grouped split (the default checkpoint's validation)" if summary["folds"] == 1
           else f"grouped {summary['folds']}-fold cross-validation")
    sources = sorted({n for r in summary["rows"] for n in r.get("by_source", {})})
    lines = [f"# Ablations of {summary['recipe']}: {how}, "
             f"{summary['images']} real images, {summary['steps']} training steps, seed {summary['seed']}", "",
             "Each row changes one thing from the first. Dice: mean (± std over folds, with several); CI: 95 % bootstrap over "
             "groups of every held-out image; per source: mean (CI). Small polyps: found (>= half covered) of "
             "those under 2 % of the frame.", "",
             "| Configuration | Dice (%) | Dice 95 % CI (%) | " + "".join(f"{n} Dice (%) | " for n in sources)
             + "small polyps found | IoU (%) | folds |",
             "|---|---|---|" + "---|" * len(sources) + "---|---|---|"]
    for r in summary["rows"]:
        if r.get("folds"):
            per = "".join(f"{100 * r['by_source'][n]['dice_mean']:.1f} ({100 * r['by_source'][n]['dice_ci'][0]:.1f}-"
                          f"{100 * r['by_source'][n]['dice_ci'][1]:.1f}) | " if n in r.get("by_source", {}) else "- | "
                          for n in sources)
            many = summary["folds"] > 1  # one run has no spread to show
            spread = f" ± {100 * r['dice_std']:.1f}" if many else ""
            iou_spread = f" ± {100 * r['iou_std']:.1f}" if many else ""
            lines.append(f"| {r['label']} | {100 * r['dice_mean']:.1f}{spread} | "
                         f"{100 * r['dice_ci'][0]:.1f}-{100 * r['dice_ci'][1]:.1f} | {per}"
                         f"{r.get('small_polyps_found', 0)} of {r.get('small_polyps', 0)} | "
                         f"{100 * r['iou_mean']:.1f}{iou_spread} | {len(r['folds'])} |")
        else:
            lines.append(f"| {r['label']} | not run | not run | " + "not run | " * len(sources) + "not run | not run | 0 |")
    notes = [f"- {r['label']}: {r['skipped']}" for r in summary["rows"] if r.get("skipped")]
    return "\n".join(lines + ([""] + ["Not run:"] + notes if notes else [])) + "\n"
