"""Tiny recipes for tests: the tiny preset at 64 px, a few steps, real data linked from shared/."""

from __future__ import annotations

from syndiff_trainer.recipe import Recipe, apply_sets, recipe_from_dict


def tiny_recipe(*sources, sets=(), **top) -> Recipe:
    """`sources`: (name, path, groups) tuples; `sets`: `--set`-style overrides."""
    data = {"version": 1, "name": "test", "seed": 0, "steps": 4, "batch_size": 2, "image_size": 64,
            "val_every": 2, "log_every": 1, "model": {"preset": "tiny"},
            "data": [{"name": n, "path": str(p), "groups": g} for n, p, g in sources],
            "split": {"policy": "grouped", "val_fraction": 0.25}, "optim": {"lr": 2e-3, "warmup_steps": 1},
            "augment": {"preset": "standard"}, "stage1": {"steps": 3, "batch_size": 4}, **top}
    return recipe_from_dict(apply_sets(data, list(sets)), "test recipe")
