"""A small text-conditioned inpainting latent diffusion model, trained on the polyp frames of the
recipe's sources and written as a diffusers `StableDiffusionInpaintPipeline` folder, which
`syndiff-train synth --method inpaint --weights DIR` loads like any other (inpaint.py).

Built from diffusers and transformers parts:
  vae           AutoencoderKL, len(vae.block_out_channels) - 1 halvings (3 blocks: 4x), 4 latent channels
  unet          UNet2DConditionModel, in_channels 9 (4 noisy latent + 1 mask + 4 masked-frame latent),
                the first level convolutional, the others with cross-attention to the prompt
  text_encoder  CLIPTextModel (transformers), a few layers, hidden = the U-Net's cross-attention width
  tokenizer     a word-level tokenizer (tokenizers' WordLevel in a transformers fast tokenizer) whose
                vocabulary is every word `frame_prompts` can write for the recipe's centres: built here,
                nothing downloaded; an unknown word is `<|unk|>`
  scheduler     DDIMScheduler for sampling, the DDPMScheduler the model was trained with otherwise the same

Two stages, like the segmenter's: (1) the autoencoder on the training frames, L1 reconstruction
plus a small KL term; its latent scaling factor is then measured (1 / std of the latents, as SD's
0.18215 was). (2) With the autoencoder frozen, the U-Net and the text encoder learn Stable
Diffusion's inpainting objective: the mask is the polyp's, dilated, plus sometimes a random box;
the masked frame is the frame with the mask's pixels set to 0 (in [-1, 1]: the pipeline's
`image * (mask < 0.5)`), the U-Net sees noisy latent + mask at latent size + the masked frame's
latent and predicts the noise (or v); the prompt (frame_prompts.py) is replaced by "" at
`train.prompt_dropout` so classifier-free guidance has an unconditional model.

Determinism: batches and their dihedral flips come from data.BatchSampler (a pure function of
(seed, stage, step)), masks, prompt dropout, timesteps, noise and the autoencoder's posterior
samples from a generator seeded with (seed, stage, step). On a CPU the same recipe, data and thread
count give bit-identical weights; an interrupted run resumes from state/ to the same weights.

A run folder holds what the segmenter's does (train.py): recipe.toml, manifest.json (every file's
sha256), split.json (data.grouped_split: validation frames are never trained on), run.json
(command, threads, machine, library versions, data counts, prompt word counts), log.jsonl (losses,
seconds per step, CPU seconds per step, the weights' sha256 at every logged step),
frame_prompts.json (every frame's prompt), vae/ (stage 1),
state/ (resume) and model/: the pipeline folder, with prompts.json (the prompt bank of every prompt
it was taught; `synth` uses it) and the records copied in.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tomli_w
from pydantic import Field, ValidationError, model_validator

from syndiff_stream.atomic import write_text
from syndiff_stream.model import CheckpointError, validation_message
from syndiff_stream.preprocess import to_model_range

from .data import BatchSampler, apply_split, load_sources, manifest_mismatch, sample_seed
from .frame_prompts import all_prompts, frame_prompts, prompt_bank, read_classes
from .machine import differences, machine_facts
from .recipe import RECIPE_NAME, RecipeError, SourceSpec, SplitSpec, _drop_none, _Strict, apply_sets, check_sources, \
    recipe_diff, recipe_path
from .train import RunOptions, _progress, library_versions, load_state, run_data, save_state, weights_digest

KIND = "inpainter"
INPAINTER_VERSION = 1
DEFAULT_INPAINTER_RECIPE = "inpainter-small"
RECORDS = (RECIPE_NAME, "manifest.json", "split.json", "run.json", "log.jsonl", "frame_prompts.json")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")  # bos, eos (also padding), unknown word


# ---- the recipe ----------------------------------------------------------------------------------

class VaeSpec(_Strict):
    """AutoencoderKL and stage 1. len(block_out_channels) - 1 halvings: 3 blocks downsample 4x."""

    block_out_channels: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=2)
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(4, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    # self-attention in the mid block, at latent resolution (SD's autoencoders have it): on one CPU
    # thread it costs about a fifth of a step of the [32, 64, 128] autoencoder at 128 px
    mid_attention: bool = False
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)  # times the KL summed over the latent, as SD's autoencoders


class UnetSpec(_Strict):
    """UNet2DConditionModel: the first level convolutional, the others with cross-attention."""

    block_out_channels: list[int] = Field(default_factory=lambda: [48, 96, 192], min_length=2)
    layers_per_block: int = Field(1, ge=1)
    attention_heads: int = Field(4, ge=1)  # diffusers' `attention_head_dim`, which is the number of heads
    norm_num_groups: int = Field(16, ge=1)


class TextSpec(_Strict):
    """CLIPTextModel; its hidden size is the U-Net's cross-attention width."""

    hidden_size: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_length: int = Field(16, ge=8)  # tokens with the start and end ones; the longest prompt needs 11
    train: bool = True  # false: the text encoder keeps its random initial weights


class DiffusionSpec(_Strict):
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(0.00085, gt=0)
    beta_end: float = Field(0.012, gt=0)


class StageTwoSpec(_Strict):
    """Stage 2: the U-Net and the text encoder."""

    steps: int = Field(15000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)  # 0: no EMA, the last weights ship
    prompt_dropout: float = Field(0.1, ge=0, le=1)  # share of prompts replaced by "" (classifier-free guidance)
    val_every: int = Field(500, ge=1)
    val_limit: int = Field(64, ge=1)  # validation frames scored (evenly spread over the held-out side)


class MaskSpec(_Strict):
    """The region to inpaint in training: the polyp mask, dilated, plus sometimes a random box."""

    dilate: float = Field(0.03, ge=0, lt=0.5)  # fraction of the frame side
    box_prob: float = Field(0.25, ge=0, le=1)
    box_min: float = Field(0.1, gt=0, le=1)  # box side, fraction of the frame side
    box_max: float = Field(0.4, gt=0, le=1)


class InpainterRecipe(_Strict):
    version: int = INPAINTER_VERSION
    kind: Literal["inpainter"] = KIND
    name: str = "inpainter"
    seed: int = 0
    image_size: int = Field(128, ge=16)
    log_every: int = Field(25, ge=1)
    flips: bool = True  # dihedral augmentation (flips, 90-degree turns) of frame and mask; no colour changes
    data: list[SourceSpec] = Field(min_length=1)
    split: SplitSpec = Field(default_factory=SplitSpec)
    vae: VaeSpec = Field(default_factory=VaeSpec)
    unet: UnetSpec = Field(default_factory=UnetSpec)
    text: TextSpec = Field(default_factory=TextSpec)
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    train: StageTwoSpec = Field(default_factory=StageTwoSpec)
    mask: MaskSpec = Field(default_factory=MaskSpec)

    @model_validator(mode="after")
    def _check(self) -> "InpainterRecipe":
        if self.version != INPAINTER_VERSION:
            raise ValueError(f"inpainter recipe version {self.version}; this trainer reads version {INPAINTER_VERSION}")
        check_sources(self.data, self.split)
        for section, channels, groups in (("vae", self.vae.block_out_channels, self.vae.norm_num_groups),
                                          ("unet", self.unet.block_out_channels, self.unet.norm_num_groups)):
            bad = [c for c in channels if c % groups]
            if bad:
                raise ValueError(f"{section}.norm_num_groups {groups} does not divide "
                                 f"{section}.block_out_channels {bad}")
        bad = [c for c in self.unet.block_out_channels[1:] if c % self.unet.attention_heads]
        if bad:
            raise ValueError(f"unet.attention_heads {self.unet.attention_heads} does not divide the attention "
                             f"levels' channels {bad}")
        if self.text.hidden_size % self.text.heads:
            raise ValueError(f"text.heads {self.text.heads} does not divide text.hidden_size {self.text.hidden_size}")
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.block_out_channels) - 1)
        if self.image_size % multiple:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {multiple} (the autoencoder's "
                             "and the U-Net's downsampling)")
        if self.mask.box_min > self.mask.box_max:
            raise ValueError(f"mask.box_min {self.mask.box_min} is above mask.box_max {self.mask.box_max}")
        if self.diffusion.beta_end <= self.diffusion.beta_start:
            raise ValueError("diffusion.beta_end must be above diffusion.beta_start")
        return self

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    def to_toml(self) -> str:
        return f"# syndiff-train inpainter recipe, version {INPAINTER_VERSION}\n" + \
            tomli_w.dumps(_drop_none(self.model_dump(mode="json")))


def load_inpainter_recipe(source: str | Path, sets: list[str] | None = None) -> InpainterRecipe:
    """Read, override (`--set`) and validate an inpainter recipe (a path or a shipped name); one-line errors."""
    path = recipe_path(source)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {path}: not valid TOML ({exc})") from None
    if data.get("kind") != KIND:
        raise RecipeError(f"recipe {path} is not an inpainter recipe (it has no kind = \"{KIND}\"); "
                          f"`syndiff-train fit` trains segmenter recipes")
    return inpainter_recipe_from_dict(apply_sets(data, sets or []), str(path))


def inpainter_recipe_from_dict(data: dict, where: str = "recipe") -> InpainterRecipe:
    try:
        return InpainterRecipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{where}: {validation_message(exc)}") from None


def is_inpainter_run(folder: str | Path) -> bool:
    """Whether a run or model folder's recorded recipe is an inpainter recipe."""
    path = Path(folder) / RECIPE_NAME
    try:
        return path.is_file() and tomllib.loads(path.read_text()).get("kind") == KIND
    except tomllib.TOMLDecodeError:
        return False


# ---- the components --------------------------------------------------------------------------------

def build_tokenizer(words: list[str], max_length: int):
    """A word-level transformers fast tokenizer over `words` (plus the special tokens), CLIP's
    conventions: `<|startoftext|>` ... `<|endoftext|>`, padded with `<|endoftext|>`, lower case,
    split at white space and at punctuation other than hyphens ("non-neoplastic" is one word)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[2]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"[^\w\s-]"), behavior="isolated")])
    bos, eos = SPECIAL_TOKENS[:2]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, 0), (eos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=SPECIAL_TOKENS[2], model_max_length=max_length)


def prompt_words(prompts: list[str]) -> list[str]:
    """The words (pre-tokenized pieces) of some prompts, as `build_tokenizer`'s tokenizer splits them."""
    probe = build_tokenizer([], 8).backend_tokenizer
    return sorted({piece for p in prompts
                   for piece, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(p))})


def build_components(recipe: InpainterRecipe) -> dict:
    """vae, text_encoder, unet (freshly initialised from the recipe's seed, in that order), tokenizer
    and the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(prompt_words(all_prompts([s.name for s in recipe.data])), recipe.text.max_length)
    torch.manual_seed(recipe.seed)
    v, u, t = recipe.vae, recipe.unet, recipe.text
    n = len(v.block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=v.latent_channels,
                        block_out_channels=tuple(v.block_out_channels), down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=v.layers_per_block,
                        norm_num_groups=v.norm_num_groups, sample_size=recipe.image_size,
                        mid_block_add_attention=v.mid_attention)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.max_length,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu"))
    m = len(u.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=recipe.image_size // recipe.vae_scale_factor, in_channels=2 * v.latent_channels + 1,
        out_channels=v.latent_channels, block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block, norm_num_groups=u.norm_num_groups,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (m - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (m - 1) + ("UpBlock2D",),
        cross_attention_dim=t.hidden_size, attention_head_dim=u.attention_heads)
    d = recipe.diffusion
    noise_scheduler = DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start,
                                    beta_end=d.beta_end, beta_schedule=d.beta_schedule,
                                    prediction_type=d.prediction_type, clip_sample=False)
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet, "tokenizer": tokenizer,
            "noise_scheduler": noise_scheduler}


def sampling_scheduler(recipe: InpainterRecipe):
    """The DDIM scheduler the pipeline samples with: the training betas, SD's DDIM settings."""
    from diffusers import DDIMScheduler

    d = recipe.diffusion
    return DDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                         beta_schedule=d.beta_schedule, prediction_type=d.prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """Prompt embeddings exactly as StableDiffusionInpaintPipeline.encode_prompt makes them (no clip
    skip): max-length padding, truncation, the text encoder's last hidden state."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device), attention_mask=None)[0]


def inpaint_masks(polyp: torch.Tensor, spec: MaskSpec, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, S, S) polyp masks -> training masks: dilated by `spec.dilate` of the side, and with
    probability `box_prob` a random box added. Five numbers are drawn per sample whatever happens,
    so what follows in the generator does not depend on the masks."""
    b, _, s, _ = polyp.shape
    r = round(spec.dilate * s)
    mask = F.max_pool2d(polyp, 2 * r + 1, stride=1, padding=r) if r > 0 else polyp.clone()
    u = torch.rand(b, 5, generator=gen)
    for i in range(b):
        if u[i, 0] < spec.box_prob:
            h = max(1, min(s, round((spec.box_min + (spec.box_max - spec.box_min) * u[i, 1].item()) * s)))
            w = max(1, min(s, round((spec.box_min + (spec.box_max - spec.box_min) * u[i, 2].item()) * s)))
            y, x = int(u[i, 3].item() * (s - h + 1)), int(u[i, 4].item() * (s - w + 1))
            mask[i, :, y:y + h, x:x + w] = 1.0
    return (mask >= 0.5).float()


def dihedral_augmenter():
    """Flips and 90-degree turns of frame and mask (albumentations, seeded per sample by BatchSampler)."""
    import albumentations as A

    return A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)])


class Denoiser(torch.nn.Module):
    """Stage 2's loss: one batch of frames, polyp masks and prompts -> mean squared error of the
    U-Net's noise (or v) prediction, as SD inpainting is trained."""

    def __init__(self, parts: dict, recipe: InpainterRecipe):
        super().__init__()
        self.vae, self.unet, self.text_encoder = parts["vae"], parts["unet"], parts["text_encoder"]
        self.tokenizer, self.scheduler, self.recipe = parts["tokenizer"], parts["noise_scheduler"], recipe

    def forward(self, image, polyp, prompts: list[str], gen: torch.Generator, drop: bool = True) -> torch.Tensor:
        recipe, b = self.recipe, image.shape[0]
        mask = inpaint_masks(polyp, recipe.mask, gen)
        if drop:
            keep = torch.rand(b, generator=gen) >= recipe.train.prompt_dropout
            prompts = [p if k else "" for p, k in zip(prompts, keep.tolist())]
        t = torch.randint(0, recipe.diffusion.num_train_timesteps, (b,), generator=gen)
        sf = self.vae.config.scaling_factor
        with torch.no_grad():
            latents = self.vae.encode(image).latent_dist.sample(generator=gen) * sf
            masked = self.vae.encode(image * (mask < 0.5)).latent_dist.sample(generator=gen) * sf
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = t.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        small = F.interpolate(mask, size=latents.shape[-2:])  # nearest, as the pipeline resizes its mask
        emb = encode_prompts(self.tokenizer, self.text_encoder, prompts, latents.device)
        pred = self.unet(torch.cat([noisy, small, masked], 1), t, encoder_hidden_states=emb).sample
        if recipe.diffusion.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, t)
        return F.mse_loss(pred.float(), target.float())


# ---- the run ----------------------------------------------------------------------------------------

def _prepare(recipe: InpainterRecipe, opts: RunOptions, out: Path, device: str):
    """(train, val, prompts of the whole dataset by stem) of a new or resumed run; a new run's records
    are written here, before training."""
    if (out / RECIPE_NAME).is_file():
        if not is_inpainter_run(out):
            raise RecipeError(f"{out} holds a segmenter run; choose a new --out")
        changed = recipe_diff(load_inpainter_recipe(out / RECIPE_NAME), recipe)
        if changed:
            raise RecipeError(f"{out} holds a run of another recipe (differs in {', '.join(changed[:5])}); "
                              "resume it with its own recipe or choose a new --out")
    cache = {"cache_dir": Path(opts.cache_dir)} if opts.cache_dir else {}
    sources, split = run_data(recipe, out, opts.progress, **cache)  # grouped: no group on two sides
    ds = sources.ds
    train, val = apply_split(ds, split)  # `select`, if the recipe asks for one, is left out of both
    described = dict(zip(ds.stems, frame_prompts(ds, recipe.data)))
    if not (out / RECIPE_NAME).is_file():
        counts = {key: dict(sorted(Counter(str(described[s][key]) for s in train.stems).items()))
                  for key in ("size", "shape", "class", "polyps")}
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "manifest.json", json.dumps(sources.manifest, indent=1))
        write_text(out / "split.json", json.dumps(split, indent=1))
        write_text(out / "frame_prompts.json", json.dumps({s: d["prompt"] for s, d in described.items()}, indent=0))
        write_text(out / "run.json", json.dumps({
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv, "kind": KIND,
            "threads": torch.get_num_threads(), "device": device, "machine": machine_facts(torch.device(device)),
            "libraries": library_versions("transformers", "tokenizers"),
            "data": {"train": len(train), "select": len(split.get("select", [])), "val": len(val),
                     "train_prompt_words": counts}}, indent=1))
        write_text(out / RECIPE_NAME, recipe.to_toml())
    return train, val, {s: d["prompt"] for s, d in described.items()}, sources


def _trainable(parts: dict, recipe: InpainterRecipe) -> torch.nn.ModuleDict:
    mods = {"unet": parts["unet"]}
    if recipe.text.train:
        mods["text_encoder"] = parts["text_encoder"]
    return torch.nn.ModuleDict(mods)


def train_vae(parts: dict, train, val, recipe: InpainterRecipe, device, log, progress: bool) -> dict:
    """Stage 1: L1 reconstruction + kl_weight * KL on the training frames; then the latent scale."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    spec, vae = recipe.vae, parts["vae"]
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(50, spec.steps // 10), spec.steps)
    sampler = BatchSampler(train, spec.batch_size, sample_seed(recipe.seed, 1),
                           dihedral_augmenter() if recipe.flips else None, {s.name: s.weight for s in recipe.data})
    wall, cpu = 0.0, 0.0
    with _progress(progress) as bar:
        task = bar.add_task("stage 1: autoencoder", total=spec.steps, info="")
        for step in range(1, spec.steps + 1):
            t0, c0 = time.time(), time.process_time()
            image, _ = sampler.batch(step)
            image = image.to(device)
            gen = torch.Generator().manual_seed(sample_seed(recipe.seed, 1, step))
            post = vae.encode(image).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
            l1, kl = F.l1_loss(rec, image), post.kl().mean()
            loss = l1 + spec.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            wall, cpu = wall + time.time() - t0, cpu + time.process_time() - c0
            if step % recipe.log_every == 0 or step == spec.steps:
                log({"stage": 1, "step": step, "loss": round(loss.item(), 6), "l1": round(l1.item(), 6),
                     "kl": round(kl.item(), 3), "sec_per_step": round(wall / step, 4),
                     "cpu_s_per_step": round(cpu / step, 4), "sha256": weights_digest(vae)})
                bar.update(task, info=f"L1 {l1.item():.4f}")
            bar.advance(task)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # LDM convention: latents scaled to unit variance, measured on 256 frames of every source
        images = _as_input(train.images[_spread(len(train), 256)], device)
        z = torch.cat([vae.encode(images[i:i + 32]).latent_dist.mean for i in range(0, len(images), 32)])
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        held = _as_input(val.images[_spread(len(val), recipe.train.val_limit)], device) if len(val) else images[:32]
        val_l1 = float(np.mean([F.l1_loss(vae.decode(vae.encode(held[i:i + 32]).latent_dist.mean).sample,
                                          held[i:i + 32]).item() for i in range(0, len(held), 32)]))
    row = {"stage": 1, "step": spec.steps, "event": "done", "scaling_factor": round(vae.config.scaling_factor, 6),
           "val_l1": round(val_l1, 6), "sha256": weights_digest(vae)}
    log(row)
    return row


def _as_input(images_u8: np.ndarray, device) -> torch.Tensor:
    return to_model_range(torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float()).to(device)


def _spread(n: int, limit: int) -> np.ndarray:
    """Up to `limit` indices spread evenly over n (every source of the held-out side is reached)."""
    return np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int)) if n else np.zeros(0, int)


@torch.no_grad()
def validation_loss(net: Denoiser, val, prompts: dict, recipe: InpainterRecipe, device, empty: bool = False) -> float:
    """Stage 2's loss on held-out frames at fixed masks, timesteps and noise (seed, 3, batch): with their
    prompts, or with "" (`empty`): the gap is what the prompt tells the model."""
    pick = _spread(len(val), recipe.train.val_limit)
    net.eval()
    losses = []
    for k, i in enumerate(range(0, len(pick), recipe.train.batch_size)):
        idx = pick[i:i + recipe.train.batch_size]
        image = _as_input(val.images[idx], device)
        polyp = torch.from_numpy(val.masks[idx]).unsqueeze(1).float().to(device)
        texts = ["" if empty else prompts[val.stems[j]] for j in idx]
        gen = torch.Generator().manual_seed(sample_seed(recipe.seed, 3, k))
        losses.append(net(image, polyp, texts, gen, drop=False).item() * len(idx))
    return float(sum(losses) / max(1, len(pick)))


def fit_inpainter(recipe: InpainterRecipe, opts: RunOptions) -> dict:
    """Train (or resume) an inpainter recipe into `opts.out`; model/ is the pipeline folder.
    `opts.stop_at` stops stage 2 after that step (resumable); of RunOptions only out, device,
    threads, progress, cache_dir and stop_at apply."""
    import importlib.util

    from diffusers import AutoencoderKL
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from syndiff_stream.backends import pick_device

    if importlib.util.find_spec("transformers") is None:  # the text encoder and the tokenizer
        raise RecipeError("syndiff-train inpainter needs the `transformers` package: pip install -e './trainer[synth]'")
    out = Path(opts.out)
    device = pick_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    train, val, prompts, _ = _prepare(recipe, opts, out, device)
    if not len(train):
        raise RecipeError("the split leaves no training frames")
    log_file = (out / "log.jsonl").open("a")
    started = time.time()

    def log(row: dict) -> None:
        log_file.write(json.dumps({"wall_s": round(time.time() - started, 1), **row}) + "\n")
        log_file.flush()

    print(f"data: {len(train)} train, {len(val)} validation frames ({', '.join(s.name for s in recipe.data)}); "
          f"threads {torch.get_num_threads()}")
    parts = build_components(recipe)
    for name in ("vae", "text_encoder", "unet"):
        parts[name].to(device)
    if (out / "vae" / "config.json").is_file():  # stage 1 done (resumed run)
        parts["vae"] = AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True).to(device)
    else:
        row = train_vae(parts, train, val, recipe, device, log, opts.progress)
        parts["vae"].save_pretrained(out / "vae", safe_serialization=True)
        print(f"stage 1: autoencoder validation L1 {row['val_l1']:.4f}, latent scale {row['scaling_factor']:.4f}")
    parts["vae"].eval().requires_grad_(False)
    if not recipe.text.train:
        parts["text_encoder"].requires_grad_(False)

    spec = recipe.train
    trainable = _trainable(parts, recipe)
    params = [p for p in trainable.parameters() if p.requires_grad]
    torch.manual_seed(sample_seed(recipe.seed, 2))
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    ema = EMAModel(params, decay=spec.ema_decay) if spec.ema_decay > 0 else None
    step = 0
    if (out / "state" / "state.json").is_file():
        step = int(load_state(out / "state", trainable, ema, opt)["step"])
        print(f"resuming at step {step}")
    sched = get_cosine_schedule_with_warmup(opt, spec.warmup_steps, spec.steps, last_epoch=step - 1)
    net = Denoiser(parts, recipe)
    sampler = BatchSampler(train, spec.batch_size, sample_seed(recipe.seed, 2),
                           dihedral_augmenter() if recipe.flips else None, {s.name: s.weight for s in recipe.data})
    stop = min(spec.steps, opts.stop_at or spec.steps)

    def shipped() -> dict:
        """The weights that ship: the EMA's (or the last), as copies of the trained modules."""
        mods = copy.deepcopy(trainable)
        if ema is not None:
            ema.copy_to([p for p in mods.parameters() if p.requires_grad])
        return {**parts, **dict(mods.items())}

    wall, cpu, n = 0.0, 0.0, 0
    with _progress(opts.progress) as bar:
        task = bar.add_task("stage 2: U-Net + text encoder", total=spec.steps, completed=step, info="")
        while step < stop:
            t0, c0 = time.time(), time.process_time()
            image, polyp = sampler.batch(step)
            texts = [prompts[train.stems[i]] for i in sampler.indices(step)]
            gen = torch.Generator().manual_seed(sample_seed(recipe.seed, 2, step))
            net.train()
            parts["vae"].eval()
            loss = net(image.to(device), polyp.to(device), texts, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            if ema is not None:
                ema.step(params)
            step += 1
            wall, cpu, n = wall + time.time() - t0, cpu + time.process_time() - c0, n + 1
            row = None
            if step % recipe.log_every == 0 or step == stop:
                row = {"stage": 2, "step": step, "loss": round(loss.item(), 6), "lr": lr,
                       "sec_per_step": round(wall / n, 4), "cpu_s_per_step": round(cpu / n, 4),
                       "sha256": weights_digest(trainable)}
            if step % spec.val_every == 0 or step == stop:
                final = shipped()
                scored = Denoiser(final, recipe)
                row = {**(row or {"stage": 2, "step": step, "loss": round(loss.item(), 6), "lr": lr,
                                  "sha256": weights_digest(trainable)}),
                       "val_loss": round(validation_loss(scored, val, prompts, recipe, device), 6),
                       "val_loss_empty_prompt": round(validation_loss(scored, val, prompts, recipe, device, True), 6),
                       "shipped_sha256": weights_digest(_trainable(final, recipe))}
                save_state(out / "state", trainable, ema, opt, {"step": step})
            if row:
                log(row)
                bar.update(task, info=f"loss {loss.item():.4f}")
            bar.update(task, completed=step)
    log_file.close()
    if step < spec.steps:
        return {"stopped_at": step, "out": str(out)}
    return save_pipeline(out, shipped(), recipe, step)


def save_pipeline(out: Path, parts: dict, recipe: InpainterRecipe, step: int) -> dict:
    """model/: the StableDiffusionInpaintPipeline folder (save_pretrained, safetensors), its prompt
    bank (prompts.json), inpainter.json (step, digest, latent scale) and the run's records."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                          tokenizer=parts["tokenizer"], unet=parts["unet"],
                                          scheduler=sampling_scheduler(recipe), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    final, tmp = out / "model", out / ".model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    bank = prompt_bank([s.name for s in recipe.data], any(read_classes(s.path) for s in recipe.data))
    write_text(tmp / "prompts.json", json.dumps(bank, indent=1) + "\n")
    info = {"kind": KIND, "step": step, "shipped_sha256": weights_digest(_trainable(parts, recipe)),
            "vae_sha256": weights_digest(parts["vae"]), "scaling_factor": parts["vae"].config.scaling_factor,
            "resolution": recipe.image_size}
    write_text(tmp / "inpainter.json", json.dumps(info, indent=1) + "\n")
    for name in RECORDS:
        if (out / name).is_file():
            shutil.copy2(out / name, tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    return {"model": str(final), **info}


# ---- reproduce ----------------------------------------------------------------------------------------

def _logged(path: Path) -> dict:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "sha256" in row:
                rows[(row["stage"], row["step"], row.get("event"))] = row
    return rows


def reproduce_inpainter(checkpoint: str | Path, opts: RunOptions) -> dict:
    """Rerun a model's (or run's) recorded inpainter recipe on its recorded data, with its thread
    count, to the end or to `opts.stop_at`, and compare every logged loss and weights digest the two
    logs share (stage 1 and stage 2)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / RECIPE_NAME).is_file():
        raise CheckpointError(f"{checkpoint}: no {RECIPE_NAME}")
    recipe = load_inpainter_recipe(checkpoint / RECIPE_NAME)
    if (checkpoint / "manifest.json").is_file():
        sources = load_sources(recipe.data, recipe.image_size, recipe.split.phash_threshold, progress=False)
        why = manifest_mismatch(json.loads((checkpoint / "manifest.json").read_text()), sources.manifest)
        if why:
            raise RecipeError(f"cannot reproduce {checkpoint}: {why}")
    run_json = json.loads((checkpoint / "run.json").read_text()) if (checkpoint / "run.json").is_file() else {}
    if opts.threads is None and run_json.get("threads"):
        opts = opts.model_copy(update={"threads": run_json["threads"]})
    result = fit_inpainter(recipe, opts)
    out = Path(opts.out)
    recorded, mine = _logged(checkpoint / "log.jsonl"), _logged(out / "log.jsonl")
    shared = sorted(recorded.keys() & mine.keys(), key=lambda k: (k[0], k[1], k[2] or ""))
    keys = ("loss", "sha256", "shipped_sha256", "val_loss", "scaling_factor")

    def unequal(k) -> dict:  # a field only one of the two rows has (a stop step validates) is not compared
        a, b = recorded[k], mine[k]
        return {f: [a[f], b[f]] for f in keys if f in a and f in b and a[f] != b[f]}

    differ = [{"stage": k[0], "step": k[1], **unequal(k)} for k in shared if unequal(k)]
    last = shared[-1] if shared else None
    report = {"checkpoint": str(checkpoint), "out": str(out), "kind": KIND,
              "step": result.get("stopped_at") or result.get("step"), "compared_rows": len(shared),
              "threads": torch.get_num_threads(), "recorded_threads": run_json.get("threads"),
              "identical": (not differ) if shared else None,
              "sha256": mine[last]["sha256"] if last else None}
    if differ:
        report["first_difference"] = differ[0]
    if not shared:
        report["note"] = "the two logs share no logged step"
    report["differences"] = differences(run_json, json.loads((out / "run.json").read_text()))
    return report
