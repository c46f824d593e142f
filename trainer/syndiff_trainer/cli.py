"""`syndiff-train`: fit, evaluate and cross-validate the segmenter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

DATA_HELP = "dataset folder (Kvasir-SEG, CVC-ClinicDB, PraNet or paired images/masks layout)"


@app.callback()
def main() -> None:
    """Companion trainer for syndiff-stream."""


def _overrides(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def fit(
    data: Path = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="run folder: split, log, resumable state, best/ and last/ checkpoints"),
    preset: str = typer.Option("compact", help="compact (<= 5M parameters) or sd (paper scale)"),
    init_vae: Optional[Path] = typer.Option(None, help="sd preset: local Stable Diffusion VAE folder (diffusers layout)"),
    init_from: Optional[Path] = typer.Option(None, help="start from this checkpoint (reuses its mask autoencoder)"),
    steps: int = typer.Option(20000, help="optimiser steps in stage 2"),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(1e-3, help="peak AdamW learning rate (cosine decay, linear warm-up)"),
    warmup_steps: int = typer.Option(300),
    ema_decay: float = typer.Option(0.999),
    augment: str = typer.Option("standard", help="standard (geometric + photometric) or none"),
    val_fraction: float = typer.Option(0.1, help="held-out validation fraction when no split file is given"),
    split_file: Optional[Path] = typer.Option(None, help="JSON {train: [stems], val: [stems]}"),
    val_every: int = typer.Option(250),
    image_size: int = typer.Option(256, help="model input size (square)"),
    mask_ae_steps: int = typer.Option(600, help="stage 1 steps (stops early once reconstruction Dice >= 0.99)"),
    latent_loss_weight: Optional[float] = typer.Option(None, help="lambda in L1(n, n~) + lambda * L1(z0, z0~)"),
    mask_loss_weight: Optional[float] = typer.Option(None, help="extra Dice loss on the decoded mask (0 = paper)"),
    prediction_type: Optional[str] = typer.Option(None, help="epsilon (paper), v_prediction or sample"),
    timestep_sampling: Optional[str] = typer.Option(None, help="uniform (paper) or focused on the inference timestep"),
    inference_timestep: Optional[int] = typer.Option(None),
    focus_prob: Optional[float] = typer.Option(None, help="focused sampling: share of draws at the inference timestep"),
    freeze_encoder: bool = typer.Option(False, help="ablation: keep the vision encoder at its initial weights"),
    synthetic: Optional[Path] = typer.Option(None, help="folder written by `syndiff-train synth` (training only)"),
    synthetic_count: Optional[int] = typer.Option(None, help="how many accepted synthetic samples to mix in"),
    synthetic_ratio: Optional[float] = typer.Option(None, help="synthetic samples per real training image (instead of --synthetic-count)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch"),
):
    """Train the segmenter (stage 1 mask autoencoder, stage 2 encoder + U-Net); resumes if OUT has state."""
    from .train import FitConfig, fit as run_fit

    overrides = _overrides(dict(latent_loss_weight=latent_loss_weight, mask_loss_weight=mask_loss_weight,
                                prediction_type=prediction_type, timestep_sampling=timestep_sampling,
                                inference_timestep=inference_timestep, focus_prob=focus_prob))
    cfg = FitConfig(data=str(data), out=str(out), preset=preset, model_overrides=overrides,
                    init_vae=str(init_vae) if init_vae else None, init_from=str(init_from) if init_from else None,
                    freeze_encoder=freeze_encoder, steps=steps, batch_size=batch_size, lr=lr,
                    warmup_steps=warmup_steps, ema_decay=ema_decay, augment=augment, val_fraction=val_fraction,
                    split_file=str(split_file) if split_file else None, val_every=val_every, image_size=image_size,
                    mask_ae_steps=mask_ae_steps, synthetic=str(synthetic) if synthetic else None,
                    synthetic_count=synthetic_count, synthetic_ratio=synthetic_ratio, seed=seed, device=device, threads=threads)
    result = run_fit(cfg)
    typer.echo(json.dumps(result))


def _load_model(path: Optional[Path]):
    from syndiff_stream.model import CheckpointError, Segmenter

    try:
        return Segmenter.from_pretrained(path)
    except CheckpointError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)


def _load_eval_data(data: Path, split_file: Optional[Path], split: str, subset: Optional[str], limit: Optional[int],
                    size: int):
    from syndiff_stream.datasets import DatasetError

    from .data import apply_split, load_dataset

    try:
        ds = load_dataset(data, size, subset=subset, progress=False)
        if split_file is not None:
            train, val = apply_split(ds, json.loads(split_file.read_text()))
            ds = val if split == "val" else train
    except (DatasetError, OSError, json.JSONDecodeError, KeyError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    return ds.subset(range(min(limit, len(ds)))) if limit else ds


@app.command("eval")
def eval_(
    data: Path = typer.Option(..., help=DATA_HELP),
    model: Optional[Path] = typer.Option(None, help="checkpoint folder; default: the shipped compact model"),
    split_file: Optional[Path] = typer.Option(None, help="score only one side of this split (e.g. a run's split.json)"),
    split: str = typer.Option("val", help="which side of --split-file: val or train"),
    subset: Optional[str] = typer.Option(None, help="PraNet layout: the TestDataset/<name> to score"),
    steps: int = typer.Option(1, help="1 = single step; T > 1 = DDIM with T U-Net passes"),
    timestep: Optional[int] = typer.Option(None, help="single-step inference timestep (default: the model's)"),
    limit: Optional[int] = typer.Option(None, help="score only the first N images"),
    per_image: bool = typer.Option(False, help="add per-image rows"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    threads: Optional[int] = typer.Option(None),
):
    """Score a checkpoint: Dice, IoU, HD95, NSD (mean and std)."""
    import torch

    from .evaluate import evaluate

    if threads:
        torch.set_num_threads(threads)
    seg = _load_model(model)
    ds = _load_eval_data(data, split_file, split, subset, limit, seg.config.image_size)
    result = evaluate(seg, ds, steps=steps, timestep=timestep, per_image=per_image)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{result['n']} images, {steps} step(s) at t={result['timestep']}: "
               f"Dice {result['dice']:.4f} ± {result['dice_std']:.4f}, IoU {result['iou']:.4f} ± {result['iou_std']:.4f}, "
               f"HD95 {result['hd95']:.2f} px, NSD {result['nsd']:.4f}, {result['ms_per_image']:.1f} ms/image")


@app.command()
def kfold(
    data: Path = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="folder: one run per fold, results.json and table.md"),
    folds: int = typer.Option(5),
    steps: int = typer.Option(20000),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(1e-3),
    limit: Optional[int] = typer.Option(None, help="use only the first N images (quick runs)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    threads: Optional[int] = typer.Option(None),
):
    """k-fold cross-validation: train one model per fold, score its held-out fold, write a mean ± std table."""
    from .data import kfold_splits, load_dataset
    from .evaluate import evaluate, fold_table
    from .train import FitConfig, fit as run_fit

    from syndiff_stream.model import Segmenter

    ds = load_dataset(data, 256, progress=False)
    stems = ds.stems[:limit] if limit else ds.stems
    results = []
    for i, split in enumerate(kfold_splits(stems, folds, seed)):
        run = out / f"fold{i}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "split.json").write_text(json.dumps(split, indent=1))
        run_fit(FitConfig(data=str(data), out=str(run), split_file=str(run / "split.json"), steps=steps,
                          batch_size=batch_size, lr=lr, seed=seed, device=device, threads=threads,
                          val_every=max(1, min(250, steps))))
        from .data import apply_split

        _, val = apply_split(ds, split)
        res = evaluate(Segmenter.from_pretrained(run / "best"), val)
        results.append(res)
        typer.echo(f"fold {i}: Dice {res['dice']:.4f} IoU {res['iou']:.4f}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = fold_table(results, f"{folds}-fold cross-validation on {data.name}")
    (out / "table.md").write_text(table)
    typer.echo(table)


@app.command()
def synth(
    data: Path = typer.Option(..., help=DATA_HELP + ": base frames (unless --normal-frames) and real mask shapes"),
    out: Path = typer.Option(..., help="output dataset: images/ + masks/ (accepted), rejected/, manifest.jsonl"),
    count: int = typer.Option(..., help="accepted samples wanted"),
    weights: Optional[Path] = typer.Option(None, help="local diffusers inpainting folder (SDXL inpainting or other)"),
    method: str = typer.Option("inpaint", help="inpaint (text-guided diffusion) or copy-paste (baseline)"),
    prompts: Optional[Path] = typer.Option(None, help="prompt bank (.json like the shipped one, or .txt one per line)"),
    normal_frames: Optional[Path] = typer.Option(None, help="folder of polyp-free frames to inpaint into"),
    mask_source: str = typer.Option("mixed", help="mixed, real (re-placed annotations) or parametric (ellipse/blob)"),
    resolution: Optional[int] = typer.Option(None, help="generation size (default: the pipeline's native size)"),
    steps: int = typer.Option(30, help="denoising steps"),
    guidance_scale: float = typer.Option(7.5, help="classifier-free guidance scale"),
    strength: float = typer.Option(0.99, help="inpainting strength (1.0: ignore the masked pixels)"),
    blend: str = typer.Option("seamless", help="copy-paste blending: seamless (Poisson) or feather"),
    gate_model: Optional[Path] = typer.Option(None, help="Segmenter checkpoint for the quality gate "
                                                         "(default: the shipped checkpoint)"),
    gate_threshold: float = typer.Option(0.7, help="keep samples with IoU(intended, predicted) >= this"),
    no_gate: bool = typer.Option(False, "--no-gate", help="accept every sample (no quality gate)"),
    max_attempts: Optional[int] = typer.Option(None, help="stop after this many samples (default 4 x count)"),
    seed: int = typer.Option(0, help="same seed, same samples"),
    batch_size: int = typer.Option(1, help="samples per pipeline call"),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]"),
    fp16: bool = typer.Option(False, "--fp16", help="half precision weights (GPU)"),
    cpu_offload: bool = typer.Option(False, "--cpu-offload", help="enable_model_cpu_offload (needs accelerate)"),
    attention_slicing: bool = typer.Option(False, "--attention-slicing", help="lower peak memory, slower"),
    keep_rejected: bool = typer.Option(True, help="write rejected samples under rejected/ for audit"),
):
    """Text-guided synthetic polyps with a quality gate (DiffAug); resumable, same seed -> same samples."""
    from .synthetic import SynthConfig, run_synth

    cfg = SynthConfig(data=str(data), out=str(out), count=count, method=method,
                      weights=str(weights) if weights else None, prompts=str(prompts) if prompts else None,
                      normal_frames=str(normal_frames) if normal_frames else None, mask_source=mask_source,
                      resolution=resolution, steps=steps, guidance_scale=guidance_scale, strength=strength,
                      blend=blend, gate=not no_gate, gate_model=str(gate_model) if gate_model else None,
                      gate_threshold=gate_threshold, max_attempts=max_attempts, seed=seed, batch_size=batch_size,
                      device=device, fp16=fp16, cpu_offload=cpu_offload, attention_slicing=attention_slicing,
                      keep_rejected=keep_rejected)
    try:
        summary = run_synth(cfg)
    except (ValueError, FileNotFoundError) as exc:  # WeightsError, DatasetError, bad prompt file: one line
        raise SystemExit(f"synth: {exc}") from None
    typer.echo(json.dumps(summary))


@app.command()
def ablate(
    data: Path = typer.Option(..., help=DATA_HELP),
    out: Path = typer.Option(..., help="folder for fold runs, ablation.md and ablation.json (resumable)"),
    synthetic: Optional[Path] = typer.Option(None, help="`synth` output for the text-guided rows"),
    counts: str = typer.Option("20,50,100,200", help="synthetic sample counts, comma-separated"),
    copy_paste: Optional[Path] = typer.Option(None, help="`synth --method copy-paste` output (baseline row)"),
    copy_paste_count: int = typer.Option(100),
    folds: int = typer.Option(5, help="k of k-fold cross-validation"),
    limit: Optional[int] = typer.Option(None, help="use this many real images (reduced scale, e.g. 40 on CPU)"),
    steps: int = typer.Option(20000, help="stage 2 steps per run (e.g. 50 on CPU)"),
    mask_ae_steps: int = typer.Option(600, help="stage 1 steps, once per fold"),
    multistep: int = typer.Option(50, help="DDIM steps for the multi-step inference row"),
    base_augment: str = typer.Option("none", help="augmentation of every row but 'traditional'"),
    only: Optional[str] = typer.Option(None, help="comma-separated row names to run (default: all)"),
    preset: str = typer.Option("compact"),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch"),
    cache_dir: Optional[Path] = typer.Option(None, help="decoded-dataset cache (default ~/.cache/syndiff-stream)"),
):
    """The papers' ablations with k-fold: Markdown table of mean +- std Dice and IoU."""
    from .ablate import AblateConfig, run_ablation

    fit_extra = _overrides(dict(preset=preset, batch_size=batch_size, lr=lr, mask_ae_steps=mask_ae_steps,
                                device=device, threads=threads, cache_dir=str(cache_dir) if cache_dir else None))
    cfg = AblateConfig(data=str(data), out=str(out), synthetic=str(synthetic) if synthetic else None,
                       copy_paste=str(copy_paste) if copy_paste else None,
                       counts=tuple(int(c) for c in counts.split(",") if c.strip()), copy_paste_count=copy_paste_count,
                       folds=folds, limit=limit, steps=steps, multistep=multistep, base_augment=base_augment,
                       only=tuple(o.strip() for o in only.split(",")) if only else (), seed=seed, fit=fit_extra)
    summary = run_ablation(cfg)
    typer.echo((out / "ablation.md").read_text())
    typer.echo(json.dumps({"out": str(out), "rows": len(summary["rows"])}))


@app.command("eval-video")
def eval_video(
    source: str = typer.Argument(..., help="video file (with --masks), folder with sequences.csv, or pseudo:FOLDER"),
    masks: Optional[Path] = typer.Option(None, help="video input: folder of one mask per frame, in frame order"),
    fps: Optional[float] = typer.Option(None, help="frame rate the frames are played at (sequences, pseudo: 25; video: its own)"),
    model: Optional[Path] = typer.Option(None, help="checkpoint folder; default: the shipped compact model"),
    backend: str = typer.Option("auto", help="eager | compile | onnx | tensorrt | auto, as in syndiff-stream run"),
    device: str = typer.Option("auto"),
    threads: Optional[int] = typer.Option(None),
    profile: Optional[Path] = typer.Option(None, help="calibration profile, as in run (preprocessing, threshold, smoothing, gating)"),
    smooth: bool = typer.Option(True, help="temporal smoothing, as in run"),
    gate_persist: Optional[int] = typer.Option(None, help="report a polyp from its Nth consecutive frame (default: as run)"),
    gate_hold: Optional[int] = typer.Option(None, help="keep a reported polyp M frames after it vanishes (default: as run)"),
    polyps: str = typer.Option("auto", help="truth polyps: overlap (tracks), clip (one per clip), auto (clip for sequences)"),
    hit_iou: float = typer.Option(0.1, help="a polyp is hit when the predictions touching it reach this IoU"),
    min_hits: int = typer.Option(1, help="... and detected when hit in this many consecutive frames"),
    fa_frames: int = typer.Option(1, help="a false alarm lasting this many frames is one event"),
    sweep: str = typer.Option("1-8", help="gating persistence values to trade off (e.g. 1-8 or 1,3,5; '' for none)"),
    sweep_hold: str = typer.Option("", help="gating hold values for the trade-off, e.g. 0,5 (default: --gate-hold)"),
    limit: Optional[int] = typer.Option(None, help="only the first N sequences / images"),
    frames_per_image: int = typer.Option(30, help="pseudo: frames per still image"),
    report: Optional[Path] = typer.Option(None, help="write a self-contained HTML report (index.html) here"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Clinical video evaluation: per-polyp sensitivity, time to first detection, false alarms per minute, flicker."""
    args = dict(locals())
    from .video_eval import run_eval_video

    run_eval_video(**args)


if __name__ == "__main__":
    app()
