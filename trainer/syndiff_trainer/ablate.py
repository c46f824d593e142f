"""The papers' ablations under k-fold cross-validation, as one resumable command.

Every row changes ONE thing from "Real only" (same folds, same seed, same stage-1 mask
autoencoder per fold, so rows differ only in what they name):
  real only | + text-guided synthetic (N samples) | + copy-paste (N) | traditional augmentation |
  frozen vision encoder | noise loss only (lambda = 0) | multi-step inference (T steps, DDIM)
Synthetic samples built from a validation fold's frames or polyps are left out of that fold's
training set. The last checkpoint is scored (the fold is not used to pick a checkpoint).
Writes ablation.md (mean +- std over folds) and ablation.json; finished fold runs are reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from syndiff_stream.datasets import DatasetError, find_pairs
from syndiff_stream.model import Segmenter

from .data import apply_split, kfold_splits, load_dataset
from .evaluate import evaluate
from .synthetic import load_synthetic, synthetic_view
from .train import FitConfig, fit


@dataclass
class AblateConfig:
    data: str
    out: str
    synthetic: str | None = None  # `synth --method inpaint` output
    copy_paste: str | None = None  # `synth --method copy-paste` output (baseline)
    counts: tuple[int, ...] = (20, 50, 100, 200)
    copy_paste_count: int = 100
    folds: int = 5
    limit: int | None = None  # use this many real images (seeded choice): reduced scale on CPU
    steps: int = 20000
    multistep: int = 50
    base_augment: str = "none"
    only: tuple[str, ...] = ()  # run just these rows (names as in ablation.json)
    seed: int = 0
    fit: dict = field(default_factory=dict)  # more FitConfig fields: batch_size, lr, preset, device, ...


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    fit: dict
    eval_steps: int = 1
    reuse: str | None = None  # score the models of this row instead of training


def rows(cfg: AblateConfig) -> list[Row]:
    out = [Row("real", "Real only", {})]
    if cfg.synthetic:
        out += [Row(f"text-guided-{n}", f"+ text-guided synthetic ({n})",
                    {"synthetic": cfg.synthetic, "synthetic_count": n}) for n in cfg.counts]
    if cfg.copy_paste:
        out.append(Row(f"copy-paste-{cfg.copy_paste_count}", f"+ copy-paste ({cfg.copy_paste_count})",
                       {"synthetic": cfg.copy_paste, "synthetic_count": cfg.copy_paste_count}))
    out += [Row("traditional", "Traditional augmentation", {"augment": "standard"}),
            Row("frozen-encoder", "Frozen vision encoder", {"freeze_encoder": True}),
            Row("noise-only", "Noise loss only (lambda = 0)", {"model_overrides": {"latent_loss_weight": 0.0}}),
            Row(f"multistep-{cfg.multistep}", f"Multi-step inference (T = {cfg.multistep})", {},
                eval_steps=cfg.multistep, reuse="real")]
    if cfg.only:
        unknown = set(cfg.only) - {r.name for r in out}
        if unknown:
            raise SystemExit(f"unknown ablation row(s) {sorted(unknown)}; have {', '.join(r.name for r in out)}")
        needed = set(cfg.only) | {r.reuse for r in out if r.name in cfg.only and r.reuse}
        out = [r for r in out if r.name in needed]
    return out


def _score(model_dir: Path, val, steps: int) -> dict:
    result = evaluate(Segmenter.from_pretrained(model_dir), val, steps=steps)
    return {k: result[k] for k in ("dice", "iou", "hd95", "nsd", "n", "steps")}


def run_ablation(cfg: AblateConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = sorted(p.stem for p in find_pairs(cfg.data))
    if cfg.limit:
        stems = sorted(np.random.default_rng(cfg.seed).permutation(stems)[:cfg.limit].tolist())
    splits = kfold_splits(stems, cfg.folds, cfg.seed)
    size = cfg.fit.get("image_size", 256)
    cache = {"cache_dir": Path(cfg.fit["cache_dir"])} if cfg.fit.get("cache_dir") else {}
    ds = load_dataset(cfg.data, size, progress=cfg.fit.get("progress", True), **cache)
    table_rows = rows(cfg)
    results: dict[str, list[dict]] = {r.name: [] for r in table_rows}
    skipped: dict[str, str] = {}
    for k, split in enumerate(splits):
        fold_dir = out / "folds" / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        split_file = fold_dir / "split.json"
        split_file.write_text(json.dumps(split, indent=1))
        _, val = apply_split(ds, split)
        for row in table_rows:
            run_dir = out / "runs" / (row.reuse or row.name) / f"fold{k}"
            result_file = out / "runs" / row.name / f"fold{k}" / "result.json"
            if result_file.is_file():
                results[row.name].append(json.loads(result_file.read_text()))
                continue
            if row.name in skipped:
                continue
            if not row.reuse:
                overrides = {**cfg.fit.get("model_overrides", {}), **row.fit.get("model_overrides", {})}
                fit_kwargs = {**cfg.fit, **row.fit, "model_overrides": overrides}
                if "synthetic" in row.fit:  # a per-fold view without samples made from validation frames
                    view = synthetic_view(row.fit["synthetic"], fold_dir / f"synthetic-{row.name}", split["val"])
                    try:
                        load_synthetic(view, row.fit["synthetic_count"], 8, cfg.seed)  # enough of them?
                    except DatasetError as exc:
                        skipped[row.name] = f"fold {k}: {exc}"
                        continue
                    fit_kwargs["synthetic"] = str(view)
                mask_ae = out / "runs" / "real" / f"fold{k}" / "mask_ae"
                if row.name != "real" and (mask_ae / "config.json").is_file() and "init_from" not in fit_kwargs:
                    fit_kwargs["init_from"] = str(mask_ae)  # same stage-1 autoencoder and init as "real only"
                fit_kwargs.setdefault("augment", cfg.base_augment)
                fit_kwargs.setdefault("warmup_steps", max(1, min(300, cfg.steps // 10)))
                fit(FitConfig(data=cfg.data, out=str(run_dir), split_file=str(split_file), steps=cfg.steps,
                              val_every=cfg.steps, seed=cfg.seed, **fit_kwargs))
            score = {"fold": k, **_score(run_dir / "last", val, row.eval_steps)}
            result_file.parent.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(score, indent=1))
            results[row.name].append(score)
    summary = {"folds": cfg.folds, "images": len(stems), "steps": cfg.steps, "seed": cfg.seed,
               "rows": [{"name": r.name, "label": r.label, "folds": results[r.name], **_mean_std(results[r.name]),
                         **({"skipped": skipped[r.name]} if r.name in skipped else {})} for r in table_rows]}
    (out / "ablation.json").write_text(json.dumps(summary, indent=1))
    (out / "ablation.md").write_text(markdown_table(summary))
    return summary


def _mean_std(scores: list[dict]) -> dict:
    if not scores:
        return {}
    dice, iou = np.array([s["dice"] for s in scores]), np.array([s["iou"] for s in scores])
    return {"dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
            "iou_mean": float(iou.mean()), "iou_std": float(iou.std())}


def markdown_table(summary: dict) -> str:
    lines = [f"# Ablations: {summary['folds']}-fold cross-validation, {summary['images']} real images, "
             f"{summary['steps']} training steps, seed {summary['seed']}", "",
             "Each row changes one thing from \"Real only\". Mean ± std over folds.", "",
             "| Configuration | Dice (%) | IoU (%) | folds |", "|---|---|---|---|"]
    for r in summary["rows"]:
        if r.get("folds"):
            lines.append(f"| {r['label']} | {100 * r['dice_mean']:.1f} ± {100 * r['dice_std']:.1f} | "
                         f"{100 * r['iou_mean']:.1f} ± {100 * r['iou_std']:.1f} | {len(r['folds'])} |")
        else:
            lines.append(f"| {r['label']} | not run | not run | 0 |")
    notes = [f"- {r['label']}: {r['skipped']}" for r in summary["rows"] if r.get("skipped")]
    return "\n".join(lines + ([""] + ["Not run:"] + notes if notes else [])) + "\n"
