"""Two-stage training of the segmenter, resumable at any step.

Stage 1 (compact preset only): the mask autoencoder learns to reconstruct masks alone, until its
reconstruction Dice reaches the target. Stage 2: vision encoder + U-Net learn the diffusion loss
with the mask autoencoder frozen. The `sd` preset skips stage 1: its autoencoder comes from a
Stable Diffusion VAE (`init_vae`), as in the paper.

A run folder holds: split.json, log.jsonl, state/ (everything needed to resume: weights, EMA,
optimiser moments, step, all in safetensors + JSON), best/ and last/ (EMA checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from syndiff_stream.metrics import dice
from syndiff_stream.model import Segmenter, SegmenterConfig, init_from_sd_vae, preset_config

from .data import ArrayDataset, BatchSampler, apply_split, build_augmenter, holdout_split, load_dataset


@dataclass
class FitConfig:
    data: str
    out: str
    preset: str = "compact"
    model_overrides: dict = field(default_factory=dict)
    init_vae: str | None = None  # sd preset: local SD VAE folder (diffusers layout)
    init_from: str | None = None  # start from a checkpoint (e.g. reuse its trained mask autoencoder)
    freeze_encoder: bool = False  # ablation: vision encoder kept at its initial weights
    steps: int = 20000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_steps: int = 300
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    augment: str = "standard"
    val_fraction: float = 0.1
    split_file: str | None = None
    val_every: int = 250
    seed: int = 0
    image_size: int = 256
    # stage 1
    mask_ae_steps: int = 3000
    mask_ae_lr: float = 2e-3
    mask_ae_batch_size: int = 16
    mask_ae_target_dice: float = 0.99
    # synthetic data (issue: text-guided augmentation): added to training only
    synthetic: str | None = None
    synthetic_count: int | None = None
    synthetic_ratio: float | None = None  # synthetic samples per real training image
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    cache_dir: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)


# ---- evaluation used during training ---------------------------------------------------------

@torch.no_grad()
def validation_dice(model: Segmenter, ds: ArrayDataset, device, batch_size: int = 16, timestep: int | None = None) -> float:
    model.eval()
    scores = []
    for i in range(0, len(ds), batch_size):
        x = torch.from_numpy(ds.images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
        prob = model.predict_proba(x, timestep).cpu().numpy()[:, 0]
        scores += [dice(p >= model.config.threshold, m) for p, m in zip(prob, ds.masks[i:i + batch_size])]
    return float(np.mean(scores))


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

def train_mask_autoencoder(model: Segmenter, train: ArrayDataset, val: ArrayDataset, cfg: FitConfig, device,
                           log) -> float:
    """Masks only: L1 reconstruction + soft Dice + a light KL term. Sets the latent scale factor."""
    vae = model.mask_vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.mask_ae_lr, weight_decay=0.0)
    augment = build_augmenter("standard" if cfg.augment != "none" else "none")
    sampler = BatchSampler(train, cfg.mask_ae_batch_size, cfg.seed + 1, augment)
    best = 0.0
    with _progress(cfg.progress) as bar:
        task = bar.add_task("stage 1: mask autoencoder", total=cfg.mask_ae_steps, info="")
        for step in range(1, cfg.mask_ae_steps + 1):
            _, mask = sampler.next()
            mask = mask.to(device)
            lr = cfg.mask_ae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.mask_ae_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            post = vae.encode(model.mask_fold(mask * 2 - 1)).latent_dist
            rec = model.mask_unfold(vae.decode(post.sample()).sample)
            prob = ((rec + 1) / 2).clamp(0, 1)
            inter = (prob * mask).sum((1, 2, 3))
            soft_dice = (2 * inter + 1) / (prob.sum((1, 2, 3)) + mask.sum((1, 2, 3)) + 1)
            loss = F.l1_loss(rec, mask * 2 - 1) + (1 - soft_dice).mean() + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == cfg.mask_ae_steps:
                best = reconstruction_dice(model, val.masks, device)
                vae.train()
                log({"stage": 1, "step": step, "loss": loss.item(), "recon_dice": best})
                bar.update(task, info=f"loss {loss.item():.4f} recon dice {best:.4f}")
                if best >= cfg.mask_ae_target_dice and step >= cfg.mask_ae_steps // 4:
                    bar.update(task, completed=cfg.mask_ae_steps)
                    break
            bar.advance(task)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # LDM convention: scale latents to unit variance
        m = torch.from_numpy(train.masks[:256]).unsqueeze(1).float().to(device)
        model.config.latent_scaling_factor = 1.0
        z = torch.cat([model.encode_mask(m[i:i + 32]) for i in range(0, len(m), 32)])
        model.config.latent_scaling_factor = float(1.0 / z.std())
    return best


# ---- resumable state -------------------------------------------------------------------------

def _save_state(path: Path, model, ema: dict, opt, step: int, best: float, extra: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.items()})
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for name, value in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    meta = {"step": step, "best_dice": best, "model_config": dataclasses.asdict(model.config),
            "param_groups": opt_state["param_groups"], **extra}
    save_file(tensors, str(path / "state.safetensors.tmp"))
    (path / "state.json.tmp").write_text(json.dumps(meta, indent=1))
    (path / "state.safetensors.tmp").replace(path / "state.safetensors")
    (path / "state.json.tmp").replace(path / "state.json")


def _load_state(path: Path, model, ema: dict, opt) -> dict:
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# ---- stage 2 ---------------------------------------------------------------------------------

def fit(cfg: FitConfig) -> dict:
    """Train (or resume) a segmenter; returns the best validation Dice and where it was written."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log_file = (out / "log.jsonl").open("a")

    def log(row: dict) -> None:
        log_file.write(json.dumps({"time": round(time.time(), 1), **row}) + "\n")
        log_file.flush()

    state_dir = out / "state"
    needs_stage1 = False
    resuming = (state_dir / "state.json").is_file()
    if resuming:
        meta = json.loads((state_dir / "state.json").read_text())
        model = Segmenter(SegmenterConfig.from_dict(meta["model_config"])).to(device)
    elif (out / "mask_ae" / "config.json").is_file():  # interrupted between stage 1 and stage 2
        model = Segmenter.from_pretrained(out / "mask_ae").to(device)
    elif cfg.init_from:
        model = Segmenter.from_pretrained(cfg.init_from).to(device)
        for k, v in cfg.model_overrides.items():
            setattr(model.config, k, v)
    else:
        model = Segmenter(preset_config(cfg.preset, **{"image_size": cfg.image_size, **cfg.model_overrides})).to(device)
        if cfg.init_vae:
            init_from_sd_vae(model, cfg.init_vae)
        elif cfg.preset == "sd":
            raise SystemExit("the sd preset needs --init-vae PATH (a local Stable Diffusion VAE folder)")
        else:
            needs_stage1 = True
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    ds = load_dataset(cfg.data, model.config.image_size, cache_dir=cache, progress=cfg.progress) if cache else \
        load_dataset(cfg.data, model.config.image_size, progress=cfg.progress)
    split_path = Path(cfg.split_file) if cfg.split_file else out / "split.json"
    if split_path.is_file():
        split = json.loads(split_path.read_text())
    else:
        split = holdout_split(ds.stems, cfg.val_fraction, cfg.seed)
        (out / "split.json").write_text(json.dumps(split, indent=1))
    train, val = apply_split(ds, split)
    if cfg.synthetic:  # built on real frames: those of validation images must stay out
        from .synthetic import load_synthetic, synthetic_count

        count = synthetic_count(cfg.synthetic_count, cfg.synthetic_ratio, len(train))
        train = train.concat(load_synthetic(cfg.synthetic, count, model.config.image_size, cfg.seed, exclude=split["val"]))
    print(f"data: {len(train)} train, {len(val)} validation images ({cfg.data})")

    if needs_stage1:
        rec = train_mask_autoencoder(model, train, val, cfg, device, log)
        model.save_pretrained(out / "mask_ae", extra={"stage": 1, "recon_dice": rec})
        print(f"stage 1: mask autoencoder reconstruction Dice {rec:.4f} on validation masks")
    model.mask_vae.eval().requires_grad_(False)
    if cfg.freeze_encoder:
        model.vision_encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best = 0, -1.0
    if resuming:
        meta = _load_state(state_dir, model, ema, opt)
        step, best = meta["step"], meta["best_dice"]
        print(f"resuming at step {step} (best validation Dice so far {best:.4f})")

    def lr_at(s: int) -> float:
        if s < cfg.warmup_steps:
            return cfg.lr * (s + 1) / cfg.warmup_steps
        frac = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def ema_model() -> Segmenter:
        m = Segmenter(model.config).to(device)
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            named = dict(m.named_parameters())
            for n, v in ema.items():
                named[n].copy_(v)
        return m.eval()

    sampler = BatchSampler(train, cfg.batch_size, cfg.seed, build_augmenter(cfg.augment), start_step=step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    started, start_step = time.time(), step
    with _progress(cfg.progress) as bar:
        task = bar.add_task("stage 2: segmenter", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            model.train()
            model.mask_vae.eval()
            image, mask = sampler.next()
            image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with amp:
                losses = model.training_losses(image, mask, generator=gen)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for n, p in zip(names, params):
                    ema[n].lerp_(p.detach(), 1 - decay)
            info = f"loss {losses['loss'].item():.4f}"
            if step % cfg.val_every == 0 or step == cfg.steps:
                scored = ema_model()
                val_dice = validation_dice(scored, val, device)
                row = {"stage": 2, "step": step, "lr": lr_at(step), "val_dice": val_dice,
                       **{k: v.item() for k, v in losses.items()},
                       "sec_per_step": (time.time() - started) / max(1, step - start_step)}
                log(row)
                if val_dice > best:
                    best = val_dice
                    scored.save_pretrained(out / "best", extra={"step": step, "val_dice": val_dice})
                scored.save_pretrained(out / "last", extra={"step": step, "val_dice": val_dice})
                _save_state(state_dir, model, ema, opt, step, best, {"fit_config": dataclasses.asdict(cfg)})
                info += f" val dice {val_dice:.4f} (best {best:.4f})"
            bar.update(task, advance=1, info=info)
    log_file.close()
    return {"best_dice": best, "best": str(out / "best"), "steps": step}
