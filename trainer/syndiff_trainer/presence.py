"""A presence head for a finished segmenter: p(polyp in the frame), learned with everything else frozen.

Taught jointly (`presence.toml`), the head and the polyp-free samples cost the mask 5-19 points of
held-out Dice at the leave-one-centre-out budget, and the head separated another hospital's
polyp-free frames no better than one fitted afterwards on a segmenter that never saw an empty
frame (docs/runs/loco/presence/README.md). So it is fitted here, after training: the segmenter's
masks stay exactly as they were, and the map becomes p(frame) x p(pixel | polyp) (model.py,
`_gated`), which every backend and `operating-point` read unchanged.

It learns from the checkpoint's own training side (its `split.json`, so the images it was
validated on stay unseen) and from the sources its `recipe.toml` names: the frames and their
decoys say "polyp", polyp-free crops of the same frames and the frames with the polyp erased say
"nothing". Batches are half and half, augmented as the recipe augments, drawn from (seed, step).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from syndiff_stream.atomic import write_text
from syndiff_stream.model import CheckpointError, Segmenter

from .data import ArrayDataset, BatchSampler, apply_split, build_augmenter, load_sources, sample_seed
from .negatives import crops_of
from .recipe import RECIPE_NAME, Recipe, RecipeError, load_recipe
from .train import RECORDS, add_erased, load_source_crops

LOG_NAME = "presence_log.jsonl"
ARGS_NAME = "presence_head.json"


class PresenceOptions(BaseModel):
    """How the head is fitted; recorded in the output checkpoint's presence_head.json."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=2)  # half polyp frames, half polyp-free
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 0
    log_every: int = Field(50, ge=1)


def presence_data(model_dir: Path, progress: bool = False) -> tuple[ArrayDataset, ArrayDataset, Recipe, dict]:
    """(polyp frames, polyp-free samples, the run's recipe, counts) from the training side of the
    checkpoint's own split."""
    for name in (RECIPE_NAME, "split.json"):
        if not (model_dir / name).is_file():
            raise CheckpointError(f"checkpoint {model_dir}: {name} is missing (a presence head learns from the "
                                  "training side of the run that made the checkpoint)")
    recipe = load_recipe(model_dir / RECIPE_NAME)
    split = json.loads((model_dir / "split.json").read_text())
    sources = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=progress)
    frames = apply_split(sources.ds, split, "train")
    if not len(frames):
        raise RecipeError(f"{model_dir / 'split.json'}: no training image of the recipe's sources")
    spec = recipe.negatives.model_copy(update={"per_image": 1}) if recipe.negatives.rate == 0 else recipe.negatives
    crops = crops_of(load_source_crops(recipe, progress=progress, spec=spec), frames)
    polyp, free = add_erased(frames, crops, spec)
    counts = {"frames": len(frames), "decoys": len(polyp) - len(frames), "crops": len(crops),
              "erased": len(free) - len(crops), "sources": [s.name for s in recipe.data]}
    return polyp, free, recipe, counts


def with_head(seg: Segmenter, seed: int) -> Segmenter:
    """`seg` with a fresh presence head (seeded), every other weight copied."""
    try:
        cfg = type(seg.config).model_validate({**seg.config.to_dict(), "presence_head": True})
    except ValueError as exc:
        raise CheckpointError(f"this checkpoint cannot take a presence head: {str(exc).splitlines()[-1]}") from None
    torch.manual_seed(seed)
    out = Segmenter(cfg)
    missing, unexpected = out.load_state_dict(seg.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("presence.") for k in missing), (missing, unexpected)
    return out


def fit_presence_head(seg: Segmenter, polyp: ArrayDataset, free: ArrayDataset, options: PresenceOptions,
                      augment=None, log=None) -> Segmenter:
    """Fit a fresh head on frozen (z_c, z0~) at the inference timestep; returns the new model."""
    model = with_head(seg, options.seed).eval()
    head = model.presence  # the only weights the optimiser holds; the rest runs under no_grad
    half = options.batch_size // 2
    samplers = [BatchSampler(ds, half, sample_seed(options.seed, k), augment) for k, ds in enumerate((polyp, free))]
    opt = torch.optim.AdamW(head.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / options.steps)))
    target = torch.cat([torch.ones(half), torch.zeros(half)])
    t0, seen = time.time(), []
    for step in range(1, options.steps + 1):
        x = torch.cat([samplers[0].batch(step)[0], samplers[1].batch(step)[0]])
        with torch.no_grad():
            z_c, z0 = model.single_step(x)
        head.train()
        loss = F.binary_cross_entropy_with_logits(head(z_c, z0), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen.append(loss.item())
        if log and (step % options.log_every == 0 or step == options.steps):
            log({"step": step, "presence": round(float(np.mean(seen)), 6), "lr": opt.param_groups[0]["lr"],
                 "wall_s": round(time.time() - t0, 1)})
            seen = []
    return model.eval()


def presence_head(model_dir: str | Path, out: str | Path, options: PresenceOptions, progress: bool = False) -> dict:
    """The command: `model_dir` -> `out`, a checkpoint with the same segmenter and a fitted head,
    the source run's records, its arguments (presence_head.json) and log (presence_log.jsonl)."""
    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise RecipeError(f"--out {out}: write the new checkpoint beside the source, not over it")
    seg = Segmenter.from_pretrained(model_dir)
    if seg.presence is not None:
        raise CheckpointError(f"checkpoint {model_dir} has a presence head already")
    polyp, free, recipe, counts = presence_data(model_dir, progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_NAME).unlink(missing_ok=True)

    def log(row):
        with open(out / LOG_NAME, "a") as f:
            f.write(json.dumps(row) + "\n")

    model = fit_presence_head(seg, polyp, free, options, build_augmenter(recipe.augment.preset, seed=options.seed, colour=recipe.augment.colour), log)
    record = {"source": str(model_dir), "options": options.model_dump(), "data": counts,
              "threads": torch.get_num_threads()}
    model.save_pretrained(out, extra={"presence_head": record})
    for name in RECORDS:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    write_text(out / ARGS_NAME, json.dumps(record, indent=1) + "\n")
    return record
