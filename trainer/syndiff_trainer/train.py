"""Two-stage training of the segmenter from a recipe: deterministic, resumable, self-recording.

Stage 1 (compact and tiny presets): the mask autoencoder learns to reconstruct masks alone, until
its reconstruction Dice reaches the target. Stage 2: vision encoder + U-Net learn the diffusion
loss with the mask autoencoder frozen. The `sd` preset skips stage 1: its autoencoder comes from
a Stable Diffusion VAE (`model.init_vae`), as in the paper.

Library building blocks: noise from diffusers' DDPMScheduler (inside the model), EMA from
diffusers' EMAModel, warm-up + cosine from diffusers' schedules.

A run folder says how it was made:
  recipe.toml     the resolved recipe (every knob)          manifest.json  files + content hashes
  run.json        library versions, threads, device, times   split.json     train/select/val stems
  log.jsonl       one JSON line per logged step: each loss term, lr, validation metrics, wall
                  time, and the EMA weights' digest at every validation (what `reproduce` checks)
  state/          everything needed to resume (safetensors + JSON)
  mask_ae/        stage 1 result   last/  EMA checkpoint at the latest validation
  best/           only with a `select` split: best EMA checkpoint on `select`
  model/          the result: last/ (or best/ on select), with the records above copied in
Batches, augmentation and noise are pure functions of (seed, step), so an interrupted run that
resumes gives the same weights as one that was not interrupted, and several processes under
`accelerate launch` (world.py) each draw their own slots of the same global batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from syndiff_stream.atomic import atomic_path, write_text
from syndiff_stream.metrics import dice
from syndiff_stream.model import (CheckpointError, Segmenter, SegmenterConfig, batch_norms, init_from_sd_vae,
                                  soft_dice)

from .data import (ArrayDataset, BatchSampler, apply_split, build_augmenter, grouped_split,
                   load_sources, manifest_mismatch, sample_seed, small_polyp_weights)
from .evaluate import predict_masks
from .machine import differences, machine_facts
from .negatives import crops_of, erase_polyps, load_crops
from .recipe import RECIPE_NAME, NegativesSpec, Recipe, RecipeError, load_recipe, recipe_diff
from .world import World

RECORDS = (RECIPE_NAME, "manifest.json", "split.json", "run.json", "log.jsonl")
LIBRARIES = ("torch", "diffusers", "numpy", "albumentations", "opencv-python-headless", "safetensors",
             "pydantic", "syndiff-stream", "syndiff-trainer")


class RunOptions(BaseModel):
    """How to run a recipe; none of these change the weights except in the last bits (float sums:
    `threads`, `grad_accum`, the number of processes) and `precision`. All are in run.json."""

    model_config = ConfigDict(extra="forbid")

    out: str
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    cache_dir: str | None = None
    stop_at: int | None = None  # stop stage 2 after this step (reproduce's spot check); resumable
    # micro-batches per step and process: the recipe's batch_size stays the global batch
    grad_accum: int = Field(1, ge=1)
    precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    # threads preparing batches ahead (a GPU outruns one); batches are the same for any number
    loader_workers: int = Field(1, ge=1)
    # torch.compile the loss's forward and backward: fewer, fused kernels where launches bound the
    # step (a lent GPU: docs/training.md); "reduce-overhead" adds CUDA graphs. Changes the last bits.
    compile: Literal["no", "default", "reduce-overhead"] = "no"
    # Wall-clock seconds the whole run may take (a lent GPU's minutes): see `plan_steps`.
    time_budget_s: float | None = Field(None, gt=0)


def autocast(device: torch.device, precision: str):
    """Mixed precision of stage 2's forward pass: bf16 (no loss scaling needed) or none."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


class TrainStep(torch.nn.Module):
    """Stage 2's loss as a module: DDP hooks a module's forward to average gradients across processes.
    `t` and `noise` are this micro-batch's slots of the global batch's draws."""

    def __init__(self, model: Segmenter):
        super().__init__()
        self.model = model

    def forward(self, image, mask, t, noise) -> dict:
        with torch.no_grad():
            z0 = self.model.encode_mask(mask)
        return self.model.training_losses(image, mask, z0=z0, t=t, noise=noise.to(z0))


NORM_BATCHES = 16  # batches of training draws that set a BatchNorm model's statistics before it is scored
NORM_STEP = 2 ** 40  # they are the sampler's batches at steps no run reaches: never trained on as such


def norm_batches(sampler: BatchSampler, model: Segmenter, recipe: Recipe, device) -> list[tuple]:
    """(image, mask, t, noise) of NORM_BATCHES batches, drawn as training draws its batches."""
    latent = tuple(model.inference_noise.shape[1:])
    batches = []
    for step in range(NORM_STEP, NORM_STEP + NORM_BATCHES):
        image, mask = sampler.batch(step)
        gen = torch.Generator().manual_seed(sample_seed(recipe.seed, 2, step))
        t = model.sample_timesteps(recipe.batch_size, gen)
        noise = torch.randn((recipe.batch_size, *latent), generator=gen)
        batches.append((image.to(device), mask.to(device), t.to(device), noise.to(device)))
    return batches


@torch.no_grad()
def recalibrate_batch_norms(model: Segmenter, batches: list[tuple]) -> None:
    """Recompute the running statistics of the encoder's and U-Net's BatchNorms for `model`'s weights.

    What is scored and saved is the EMA of the weights, an average over about a thousand steps;
    the running statistics the live model gathered belong to its own, newer weights, and would
    shift every normalised feature map (the precise-BN step of SWA's update_bn). The batches mix
    timesteps as training does: a sample at the inference timestep was normalised with such
    statistics. The frozen mask autoencoder keeps its stage-1 statistics. No-op for GroupNorm."""
    frozen = set(batch_norms(model.mask_vae))
    norms = [m for m in batch_norms(model) if m not in frozen]
    if not norms:
        return
    model.eval()
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
        norm.train()
    step = TrainStep(model)
    for image, mask, t, noise in batches:
        step(image, mask, t, noise)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict, in key order: equal digests, equal weights."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def library_versions(*extra: str) -> dict:
    """Python, platform and the versions of LIBRARIES (and of `extra` packages); None: not installed."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in (*LIBRARIES, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- evaluation used during training ---------------------------------------------------------

def validation_metrics(model: Segmenter, ds: ArrayDataset, prefix: str, free: ArrayDataset | None = None) -> dict:
    """Mean Dice over `ds` and per source: `{prefix}_dice`, `{prefix}_dice/<source>`; how much the
    predicted masks vary from image to image against the true masks, `{prefix}_spread`; with
    polyp-free crops `free`, the share of them on which something is predicted: `{prefix}_alarm`."""
    out = {}
    if len(ds):
        predicted = predict_masks(model, ds.images)
        scores = np.array([dice(p, m) for p, m in zip(predicted, ds.masks)])
        out[f"{prefix}_dice"] = float(scores.mean())
        out[f"{prefix}_spread"] = mask_spread(predicted, ds.masks)
        sources = np.array(ds.sources)
        for source in sorted(set(ds.sources)):
            out[f"{prefix}_dice/{source or 'all'}"] = float(scores[sources == source].mean())
    if free is not None and len(free):
        out[f"{prefix}_alarm"] = float(predict_masks(model, free.images).any(axis=(1, 2)).mean())
    return out


def mask_spread(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Per-pixel variance of the predicted masks across images over that of the true masks: about 1
    when predictions follow the images, 0 when stage 2 has collapsed to one mask for every image
    (nothing, or the same blob). The loss does not show such a collapse; this does
    (docs/runs/loco/presence/README.md)."""
    want = truth.astype(np.float32).var(axis=0).mean()
    return float(predicted.astype(np.float32).var(axis=0).mean() / want) if want > 0 else float("nan")


COLLAPSED_SPREAD = 0.05  # below this share of the truth's spread, every image gets about the same mask


@torch.no_grad()
def reconstruction_dice(model: Segmenter, masks: np.ndarray, device, batch_size: int = 32) -> float:
    model.eval()
    scores = []
    for i in range(0, len(masks), batch_size):
        m = torch.from_numpy(masks[i:i + batch_size]).unsqueeze(1).float().to(device)
        rec = model.decode_latent(model.encode_mask(m)).cpu().numpy()[:, 0]
        scores += [dice(r >= 0.5, t) for r, t in zip(rec, masks[i:i + batch_size])]
    return float(np.mean(scores))


# ---- stage 1 ---------------------------------------------------------------------------------

def train_mask_autoencoder(model: Segmenter, train: ArrayDataset, val: ArrayDataset, recipe: Recipe, device,
                           log, progress: bool, free: ArrayDataset | None = None) -> float:
    """Masks only: L1 reconstruction + soft Dice + a light KL term. Sets the latent scale factor.
    With polyp-free crops `free`, empty masks are drawn at the recipe's negative rate, so that the
    empty latent the segmenter learns to predict decodes to nothing."""
    spec, vae = recipe.stage1, model.mask_vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 0, spec.steps)
    augment = build_augmenter("standard" if recipe.augment.preset != "none" else "none")
    sampler = BatchSampler(train, spec.batch_size, sample_seed(recipe.seed, 1), augment,
                           negatives=free, negative_rate=recipe.negatives.rate)
    best = 0.0
    with _progress(progress) as bar:
        task = bar.add_task("stage 1: mask autoencoder", total=spec.steps, info="")
        for step in range(1, spec.steps + 1):
            _, mask = sampler.batch(step)
            mask = mask.to(device)
            gen = torch.Generator(device=device).manual_seed(sample_seed(recipe.seed, 1, step))
            post = vae.encode(model.mask_fold(mask * 2 - 1)).latent_dist
            rec = model.mask_unfold(vae.decode(post.sample(generator=gen)).sample)
            prob = ((rec + 1) / 2).clamp(0, 1)
            loss = F.l1_loss(rec, mask * 2 - 1) + (1 - soft_dice(prob, mask)).mean() + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == spec.steps:
                best = reconstruction_dice(model, val.masks if len(val) else train.masks[:64], device)
                vae.train()
                log({"stage": 1, "step": step, "loss": loss.item(), "recon_dice": best})
                bar.update(task, info=f"loss {loss.item():.4f} recon dice {best:.4f}")
                if best >= spec.target_dice and step >= spec.steps // 4:
                    bar.update(task, completed=spec.steps)
                    break
            bar.advance(task)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # LDM convention: scale latents to unit variance (centred first, if asked)
        m = torch.from_numpy(train.masks[:256]).unsqueeze(1).float().to(device)
        model.config.latent_scaling_factor, model.config.latent_shift = 1.0, None
        z = torch.cat([model.encode_mask(m[i:i + 32]) for i in range(0, len(m), 32)])
        if spec.center_latents:
            shift = z.mean((0, 2, 3))
            model.config.latent_shift = tuple(shift.tolist())
            z = z - shift.view(1, -1, 1, 1)
        model.config.latent_scaling_factor = float(1.0 / z.std())
    return best


# ---- resumable state -------------------------------------------------------------------------

def save_state(path: Path, module: torch.nn.Module, ema: EMAModel | None, opt, meta: dict) -> None:
    """What resuming needs (weights, EMA shadow, optimiser) as safetensors + JSON, written atomically;
    `meta` (step and the like) goes into the JSON. The segmenter's and the inpainter's runs share it."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)})
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for name, value in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    meta = {**meta, "ema_optimization_step": ema.optimization_step if ema is not None else None,
            "param_groups": opt_state["param_groups"]}
    with atomic_path(path / "state.safetensors") as tmp_t, atomic_path(path / "state.json") as tmp_j:
        save_file(tensors, str(tmp_t))
        tmp_j.write_text(json.dumps(meta, indent=1))


def load_state(path: Path, module: torch.nn.Module, ema: EMAModel | None, opt) -> dict:
    """Inverse of `save_state`; returns its meta."""
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        for i, p in enumerate(ema.shadow_params):
            p.copy_(tensors[f"ema.{i}"])
        ema.optimization_step = meta["ema_optimization_step"]
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# ---- preparing a run: every input checked before anything is written ----------------------------

def _check_inputs(recipe: Recipe) -> None:
    for label, value in (("model.init_vae", recipe.model.init_vae), ("model.init_from", recipe.model.init_from),
                         ("synthetic.path", recipe.synthetic.path), ("split.file", recipe.split.file)):
        if value and not Path(value).exists():
            raise RecipeError(f"{label}: {value} does not exist")
    if recipe.model.preset == "sd" and not recipe.model.init_vae:
        raise RecipeError("model.init_vae: the sd preset needs a local Stable Diffusion VAE folder")


def make_split(recipe: Recipe, ds: ArrayDataset) -> dict:
    spec = recipe.split
    if spec.policy == "file":
        split = json.loads(Path(spec.file).read_text())
        split.setdefault("select", [])
    else:
        split = grouped_split(ds, spec.val_fraction, spec.select_fraction, spec.seed,
                              holdout=spec.holdout if spec.policy == "holdout-source" else None)
    apply_split(ds, split)  # refuses leaks and unknown stems
    return split


def _build_model(recipe: Recipe, device) -> tuple[Segmenter, bool]:
    """(model, needs stage 1)."""
    torch.manual_seed(recipe.seed)
    if recipe.model.init_from:
        model = Segmenter.from_pretrained(recipe.model.init_from).to(device)
        owned = recipe.model_config_().to_dict()
        for key in ("latent_loss_weight", "mask_loss_weight", "mask_loss_type", "tversky_beta", "focal_gamma",
                    "timestep_sampling", "focus_prob", "inference_timestep"):
            setattr(model.config, key, owned[key])
        for key, value in recipe.model.overrides.items():
            setattr(model.config, key, value)
        return model, False
    model = Segmenter(recipe.model_config_()).to(device)
    if recipe.model.init_vae:
        init_from_sd_vae(model, recipe.model.init_vae)
        return model, False
    return model, True


def with_stage1(recipe: Recipe, device, mask_ae: Path) -> Segmenter:
    """The recipe's model (seeded as a fresh run builds it) with what stage 1 made in `mask_ae`:
    the mask autoencoder's weights and the latent scale and shift it measured (`train_mask_autoencoder`).

    Only these are taken: the rest of the folder is the initial weights of the run that wrote it,
    which this recipe rebuilds bit for bit, and a recipe that adds a module (a presence head) can
    still reuse another run's stage 1 when its autoencoder is the same."""
    model, _ = _build_model(recipe, device)
    stage1 = Segmenter.from_pretrained(mask_ae).to(device)
    try:
        model.mask_vae.load_state_dict(stage1.mask_vae.state_dict())
    except RuntimeError:
        raise RecipeError(f"{mask_ae}: its mask autoencoder does not match the recipe's model "
                          "(mask_stem, vae_* settings); delete the folder to train stage 1 again") from None
    model.config.latent_scaling_factor = stage1.config.latent_scaling_factor
    model.config.latent_shift = stage1.config.latent_shift
    return model


# ---- stage 2 ---------------------------------------------------------------------------------

def lr_schedule(opt, recipe: Recipe, step: int):
    """Warm-up then cosine (or constant) over the recipe's steps, positioned at `step` (a resumed
    or re-planned run continues where it is)."""
    if recipe.optim.schedule == "cosine":
        return get_cosine_schedule_with_warmup(opt, recipe.optim.warmup_steps, recipe.steps, last_epoch=step - 1)
    return get_constant_schedule_with_warmup(opt, recipe.optim.warmup_steps, last_epoch=step - 1)


class TimeBudget:
    """`--time-budget`: times stage 2 until the end of warm-up, then says how many steps fit."""

    def __init__(self, seconds: float):
        self.seconds, self.deadline = seconds, time.time() + seconds
        self.plan_at: int | None = None

    def start(self, recipe: Recipe, step: int) -> None:
        self.plan_at = max(1, recipe.optim.warmup_steps) if step < recipe.optim.warmup_steps else None
        self.clock_from = max(step + 1, (self.plan_at or 0) // 5)  # the first steps pay for allocation, compilation
        self.t0, self.step0 = time.time(), step

    def plan_due(self, step: int) -> bool:
        if step == self.clock_from and step < (self.plan_at or 0):
            self.t0, self.step0 = time.time(), step
        return step == self.plan_at

    def plan(self, recipe: Recipe, step: int, validate) -> int:
        """Steps that fit; `validate()` runs one validation, timed (what each will cost)."""
        sec_per_step = (time.time() - self.t0) / (step - self.step0)
        t = time.time()
        validate()
        return plan_steps(recipe, step, sec_per_step, time.time() - t, self.deadline - time.time())

    def out_of_time(self) -> bool:
        return time.time() > self.deadline


def plan_steps(recipe: Recipe, step: int, sec_per_step: float, sec_per_validation: float, seconds_left: float) -> int:
    """Stage-2 length that fits `seconds_left`, in whole validation intervals, never above the recipe's.

    Decided at the end of warm-up: until then the learning rate does not depend on the total, and
    batches and noise depend on (seed, step) alone, so the run is the one a recipe with that many
    steps would have made, and its recorded recipe says so (`reproduce` reruns it)."""
    per_interval = recipe.val_every * sec_per_step * 1.2 + sec_per_validation  # 20 %: neighbours may speed up or slow down
    intervals = int(max(0.0, seconds_left - (recipe.val_every - step % recipe.val_every) * sec_per_step) // per_interval)
    fitted = (step // recipe.val_every + intervals) * recipe.val_every
    return min(recipe.steps, max(fitted, recipe.optim.warmup_steps + 1, step + 1))


def fit(recipe: Recipe, opts: RunOptions) -> dict | None:
    """Train (or resume) a recipe into `opts.out`; returns where the model is and its scores (on
    the main process; None on the others under `accelerate launch`)."""
    out = Path(opts.out)
    _check_inputs(recipe)
    budget = TimeBudget(opts.time_budget_s) if opts.time_budget_s else None
    world = World.start(opts.device)
    if budget and world.size > 1:
        raise RecipeError("--time-budget: plans one process's run; under `accelerate launch` set steps instead")
    mine, micro = world.micro_batches(recipe.batch_size, opts.grad_accum)
    device = world.device
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with world.main_first():  # the main process reads the data and writes the records; the others then read them
        train, val, select, sources, free = _prepare(recipe, opts, out, world)
    log_file = (out / "log.jsonl").open("a") if world.is_main else None
    started = time.time()

    def log(row: dict) -> None:
        if log_file:
            log_file.write(json.dumps({"wall_s": round(time.time() - started, 1), **row}) + "\n")
            log_file.flush()

    say = print if world.is_main else (lambda *a: None)
    progress = opts.progress and world.is_main
    say(f"data: {len(train)} train, {len(select)} select, {len(val)} validation images "
        f"({', '.join(s.name for s in recipe.data)}); threads {torch.get_num_threads()}"
        + (f"; global batch {recipe.batch_size} = {world.size} processes x {len(micro)} micro-batches x "
           f"{micro[0].stop - micro[0].start}" if len(micro) > 1 or world.size > 1 else ""))

    state_dir = out / "state"
    resuming = (state_dir / "state.json").is_file()
    if resuming:
        meta = json.loads((state_dir / "state.json").read_text())
        model = Segmenter(SegmenterConfig.from_dict(meta["model_config"])).to(device)
    elif (out / "mask_ae" / "config.json").is_file():  # interrupted between stage 1 and stage 2, or given
        model = with_stage1(recipe, device, out / "mask_ae")
    else:
        model, needs_stage1 = _build_model(recipe, device)
        if needs_stage1:  # small: the main process trains it, the others load its result
            if world.is_main:
                rec = train_mask_autoencoder(model, train, select if len(select) else train.subset(range(min(64, len(train)))),
                                             recipe, device, log, progress,
                                             free["train"] if recipe.negatives.stage1 else None)
                model.save_pretrained(out / "mask_ae", extra={"stage": 1, "recon_dice": rec})
                say(f"stage 1: mask autoencoder reconstruction Dice {rec:.4f}")
            world.barrier()
            if not world.is_main:
                model = with_stage1(recipe, device, out / "mask_ae")

    model.mask_vae.eval().requires_grad_(False)
    if recipe.model.freeze_encoder:
        model.vision_encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(params, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay,
                            betas=recipe.optim.betas)
    # foreach: a few fused kernels instead of several per tensor; CPU runs keep the per-tensor
    # arithmetic their recorded digests were made with
    ema = EMAModel(params, decay=recipe.ema.decay, foreach=device.type == "cuda")
    step, best = 0, -1.0
    if resuming:
        meta = load_state(state_dir, model, ema, opt)
        step, best = meta["step"], meta["best"]
        say(f"resuming at step {step}")
    sched = lr_schedule(opt, recipe, step)

    calibration: list[tuple] = []

    def ema_model() -> Segmenter:
        m = copy.deepcopy(model)
        ema.copy_to([p for p in m.parameters() if p.requires_grad])
        if batch_norms(m):
            calibration[:] = calibration or norm_batches(sampler, m, recipe, device)
            recalibrate_batch_norms(m, calibration)
        return m.eval()

    sampler = BatchSampler(train, recipe.batch_size, recipe.seed, build_augmenter(recipe.augment.preset, colour=recipe.augment.colour),
                           draw_weights(recipe, sources.weights), image_weights=small_polyp_weights(train, recipe.sampling),
                           negatives=free["train"], negative_rate=recipe.negatives.rate,
                           negatives_from=recipe.negatives.start, negatives_ramp=recipe.negatives.ramp)
    net = world.wrap(TrainStep(model))
    if opts.compile != "no":
        net = torch.compile(net, mode=None if opts.compile == "default" else opts.compile, dynamic=False)
    amp = autocast(device, opts.precision)
    latent = tuple(model.inference_noise.shape[1:])
    stop = min(recipe.steps, opts.stop_at or recipe.steps)
    t_steps, n_steps = 0.0, 0
    if budget:
        budget.start(recipe, step)
    with _progress(progress) as bar, ThreadPoolExecutor(opts.loader_workers) as loader:
        task = bar.add_task("stage 2: segmenter", total=recipe.steps, completed=step, info="")
        # this process's slots of the next batches, prepared while the steps before them run
        ahead = {s: loader.submit(sampler.batch, s, mine) for s in range(step, min(stop, step + opts.loader_workers))}
        while step < stop:
            t0 = time.time()
            image, mask = ahead.pop(step).result()
            if step + opts.loader_workers < stop:
                ahead[step + opts.loader_workers] = loader.submit(sampler.batch, step + opts.loader_workers, mine)
            image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            model.train()
            model.mask_vae.eval()
            # Timesteps and noise of the whole global batch, in the order one process draws them;
            # each micro-batch takes its own slots.
            gen = torch.Generator().manual_seed(sample_seed(recipe.seed, 2, step))
            t_all = model.sample_timesteps(recipe.batch_size, gen)[mine]
            noise_all = torch.randn((recipe.batch_size, *latent), generator=gen)[mine]
            opt.zero_grad(set_to_none=True)
            parts = []
            for k, part in enumerate(micro):
                with world.no_sync(net, skip=k < len(micro) - 1):
                    with amp:
                        losses = net(image[part], mask[part], t_all[part], noise_all[part])
                    (losses["loss"] / len(micro) if len(micro) > 1 else losses["loss"]).backward()
                parts.append(losses)
            losses = world.mean({k: sum(p[k].detach() for p in parts) / len(parts) for k in parts[0]})
            torch.nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            ema.step(params)
            step += 1
            t_steps, n_steps = t_steps + time.time() - t0, n_steps + 1
            if budget and budget.plan_due(step):
                steps = budget.plan(recipe, step, lambda: validation_metrics(ema_model(), val, "val"))
                if steps != recipe.steps:
                    recipe = recipe.model_copy(update={"steps": steps})
                    write_text(out / RECIPE_NAME, recipe.to_toml())
                    sched = lr_schedule(opt, recipe, step)
                    log({"event": "time budget", "step": step, "steps": steps, "budget_s": budget.seconds})
                    say(f"time budget {budget.seconds:.0f} s: {steps} steps instead of the recipe's {stop}")
                    bar.update(task, total=steps)
                    stop = min(recipe.steps, opts.stop_at or recipe.steps)
            if budget and budget.out_of_time() and step < stop:  # the plan was wrong: keep what there is
                log({"event": "out of time", "step": step, "steps": recipe.steps})
                stop = step
            info = f"loss {losses['loss'].item():.4f}" if progress else ""  # .item() waits for the GPU
            row = None
            if step % recipe.log_every == 0:
                row = {"stage": 2, "step": step, "lr": lr, **{k: round(v.item(), 6) for k, v in losses.items()},
                       "sec_per_step": round(t_steps / max(1, n_steps), 4)}
            if world.is_main and (step % recipe.val_every == 0 or step == recipe.steps or step == stop):
                scored = ema_model()
                metrics = {**validation_metrics(scored, val, "val", free["val"]),
                           **validation_metrics(scored, select, "select", free["select"])}
                digest = weights_digest(scored)
                row = {**(row or {"stage": 2, "step": step, "lr": lr,
                                  **{k: round(v.item(), 6) for k, v in losses.items()}}),
                       **{k: round(v, 5) for k, v in metrics.items()}, "ema_sha256": digest}
                extra = {"step": step, "ema_sha256": digest, **{k: round(v, 5) for k, v in metrics.items()}}
                if "select_dice" in metrics and metrics["select_dice"] > best:
                    best = metrics["select_dice"]
                    scored.save_pretrained(out / "best", extra=extra)
                scored.save_pretrained(out / "last", extra=extra)
                save_state(state_dir, model, ema, opt,
                           {"step": step, "best": best, "model_config": model.config.to_dict()})
                info += f" val dice {metrics.get('val_dice', float('nan')):.4f}"
                if metrics.get("val_spread", 1.0) < COLLAPSED_SPREAD:
                    say(f"step {step}: stage 2 predicts about the same mask for every validation image "
                        f"(val_spread {metrics['val_spread']:.3f}): collapsed")
            if row:
                log(row)
            bar.update(task, completed=step, info=info)
    if log_file:
        log_file.close()
    world.barrier()  # every process done, the main one's last checkpoint written
    if not world.is_main:
        return None
    if step < recipe.steps:
        return {"stopped_at": step, "out": str(out), "last": str(out / "last")}
    return finish(out, recipe)


def run_data(recipe, out: Path, progress: bool, **cache) -> tuple:
    """(sources, split) of a run folder: a resumed run must find the data its manifest recorded and
    keeps its split; a new one splits the recipe's way. Any recipe with `data` and `split` (the
    segmenter's, the inpainter's)."""
    sources = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=progress, **cache)
    if (out / "manifest.json").is_file():
        why = manifest_mismatch(json.loads((out / "manifest.json").read_text()), sources.manifest)
        if why:
            raise RecipeError(f"{out} was trained on other data: {why}")
        split = json.loads((out / "split.json").read_text())
        apply_split(sources.ds, split)  # refuses leaks and unknown stems
    else:
        split = make_split(recipe, sources.ds)
    return sources, split


def _prepare(recipe: Recipe, opts: RunOptions, out: Path, world: World):
    """(train, val, select, sources) of a new or resumed run; a new run's records are written here,
    before training, so a crashed run still says what it was."""
    if not world.is_main and not (out / RECIPE_NAME).is_file():
        raise RecipeError(f"--out {out}: process {world.rank} does not see the main process's run folder; "
                          "on several nodes it must be on storage every node shares")
    if (out / RECIPE_NAME).is_file():  # an existing run: only the same recipe may continue it
        recorded = load_recipe(out / RECIPE_NAME)
        changed = recipe_diff(recorded, recipe)
        if changed:
            raise RecipeError(f"{out} holds a run of another recipe (differs in {', '.join(changed[:5])}); "
                              "resume it with its own recipe or choose a new --out")
    cache = {"cache_dir": Path(opts.cache_dir)} if opts.cache_dir else {}
    sources, split = run_data(recipe, out, opts.progress and world.is_main, **cache)
    ds = sources.ds
    train, val = apply_split(ds, split)
    select = apply_split(ds, split, "select")
    free = {"train": None, "val": None, "select": None}
    if recipe.negatives.rate > 0:  # polyp-free crops, each on its frame's side of the split
        crops = load_source_crops(recipe, opts.progress and world.is_main, **cache)
        free = {"train": crops_of(crops, train), "val": crops_of(crops, val), "select": crops_of(crops, select)}
        if recipe.negatives.erased:  # training frames only: a validation frame is never erased into training
            train, free["train"] = add_erased(train, free["train"], recipe.negatives)
    if recipe.synthetic.path:  # built on real frames: those of held-out images must stay out
        from .synthetic import load_synthetic, synthetic_count

        held_out = [s.split("/", 1)[-1] for s in split["val"] + split["select"]]
        count = synthetic_count(recipe.synthetic.count, recipe.synthetic.ratio, len(train))
        train = train.concat(load_synthetic(recipe.synthetic.path, count, recipe.image_size, recipe.seed,
                                            exclude=held_out).prefixed("synthetic"))
    if world.is_main and not (out / RECIPE_NAME).is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "manifest.json", json.dumps(sources.manifest, indent=1))
        write_text(out / "split.json", json.dumps(split, indent=1))
        write_text(out / "run.json", json.dumps({
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
            "threads": torch.get_num_threads(), "device": str(world.device), "processes": world.size,
            "grad_accum": opts.grad_accum, "precision": opts.precision, "compile": opts.compile,
            "machine": machine_facts(world.device), "libraries": library_versions(),
            "data": {"train": len(train), "select": len(select), "val": len(val),
                     **({f"{k}_polyp_free_crops": len(v) for k, v in free.items() if v is not None})}}, indent=1))
        write_text(out / RECIPE_NAME, recipe.to_toml())
    return train, val, select, sources, free


def draw_weights(recipe: Recipe, source_weights: dict[str, float]) -> dict[str, float]:
    """Each source's share of the draws: the data sources' weights, and the synthetic set's."""
    return {**source_weights, "synthetic": recipe.synthetic.weight}


def add_erased(frames: ArrayDataset, free: ArrayDataset, spec: NegativesSpec) -> tuple[ArrayDataset, ArrayDataset]:
    """(frames + their decoys, polyp-free samples + the frames erased): `negatives.erased`'s data."""
    erased, decoys = erase_polyps(frames, spec.seed, spec.margin)
    return frames.concat(decoys), free.concat(erased)


def load_source_crops(recipe: Recipe, progress: bool = False, cache_dir: Path | None = None,
                      only: tuple[str, ...] = (), spec: NegativesSpec | None = None) -> ArrayDataset:
    """Polyp-free crops of every source's frames (or of the `only` sources), prefixed like the
    frames, cut as `spec` says (default: the recipe's own [negatives])."""
    spec = spec or recipe.negatives
    parts = [load_crops(s.path, recipe.image_size, spec.per_image, spec.seed, spec.min_scale, spec.margin,
                        progress=progress, skip_unpaired=s.skip_unpaired,
                        **({"cache_dir": cache_dir} if cache_dir else {})).prefixed(s.name)
             for s in recipe.data if not only or s.name in only]
    crops = parts[0]
    for part in parts[1:]:
        crops = crops.concat(part)
    return crops


def finish(out: Path, recipe: Recipe) -> dict:
    """model/ = last/ (or best/ when a `select` split chose it), with the run's records copied in."""
    chosen = out / ("best" if recipe.split.select_fraction > 0 and (out / "best").is_dir() else "last")
    final = out / "model"
    tmp = out / ".model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(chosen, tmp)
    for name in RECORDS:
        if (out / name).is_file():
            shutil.copy2(out / name, tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    info = json.loads((final / "config.json").read_text())
    return {"model": str(final), "chosen": chosen.name, "step": info.get("step"),
            **{k: v for k, v in info.items() if k.startswith(("val_dice", "select_dice"))}}


def load_run_recipe(checkpoint: str | Path) -> Recipe:
    path = Path(checkpoint)
    if not (path / RECIPE_NAME).is_file():
        raise CheckpointError(f"{path}: no {RECIPE_NAME} (checkpoints from before recipes cannot be reproduced)")
    return load_recipe(path / RECIPE_NAME)


def reproduce(checkpoint: str | Path, opts: RunOptions) -> dict:
    """Rerun a checkpoint's recorded recipe on the recorded data, then compare weights.

    Checks the data against the recorded manifest before any work. With `stop_at`, stops at
    that step and compares the EMA digest the original log recorded there (a spot check)."""
    checkpoint = Path(checkpoint)
    recipe = load_run_recipe(checkpoint)
    if (checkpoint / "manifest.json").is_file():
        recorded = json.loads((checkpoint / "manifest.json").read_text())
        sources = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=False)
        why = manifest_mismatch(recorded, sources.manifest)
        if why:
            raise RecipeError(f"cannot reproduce {checkpoint}: {why}")
    out = Path(opts.out)
    run_json = json.loads((checkpoint / "run.json").read_text()) if (checkpoint / "run.json").is_file() else {}
    if opts.threads is None and run_json.get("threads"):
        opts = opts.model_copy(update={"threads": run_json["threads"]})
    result = fit(recipe, opts)
    logged = {}
    if (checkpoint / "log.jsonl").is_file():
        for line in (checkpoint / "log.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "ema_sha256" in row:
                logged[row["step"]] = row
    step = result.get("stopped_at") or json.loads((out / "model" / "config.json").read_text())["step"]
    mine = json.loads((out / "last" / "config.json").read_text())
    want = logged.get(step)
    report = {"checkpoint": str(checkpoint), "out": str(out), "step": step, "threads": torch.get_num_threads(),
              "recorded_threads": run_json.get("threads"), "ema_sha256": mine.get("ema_sha256")}
    if want is None:
        report["identical"] = None
        report["note"] = f"the original log recorded no digest at step {step}"
    else:
        report["identical"] = want["ema_sha256"] == mine.get("ema_sha256")
        report["recorded_val_dice"] = want.get("val_dice")
        report["val_dice"] = mine.get("val_dice")
    # what could make the weights differ: the facts of the two runs' records that are not the same
    report["differences"] = differences(run_json, json.loads((out / "run.json").read_text()))
    return report


def explain(report: dict) -> str:
    """One paragraph on a reproduce report whose weights differ: the machine facts that differ,
    or, when none do, that the record cannot tell why (docs/training.md, Reproducing)."""
    if report.get("differences"):
        return ("weights differ from the recorded run; what differs between the two runs' records: "
                + "; ".join(report["differences"]) + " (on another kind of machine the weights differ in the last "
                "bits and the scores within the spread in docs/training.md)")
    return ("weights differ from the recorded run, though every fact both records hold is the same here (CPU, "
            "vector extensions, kernels, threads, math libraries, device, library versions): something the record "
            "does not hold changed, such as the code itself or its dependencies' own dependencies")
