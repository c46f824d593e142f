"""The single-step latent diffusion segmenter (SynDiff / SDSeg), in one file.

Structure, as in the papers:
  tau(image) -> z_c                      trainable vision encoder (KL-f8 encoder design)
  E(mask) -> z0, D(z0) -> mask           frozen KL-f8 mask autoencoder
  f(concat(z_c, z_t), t) -> prediction   denoising U-Net (diffusers UNet2DModel)
Training: z_t = sqrt(a_t) z0 + sqrt(1 - a_t) n; loss = L1(n, n~) + lambda * L1(z0, z0~).
Inference: ONE U-Net pass at a fixed timestep from seeded Gaussian noise, decode with D.

Three deviations from the paper are configurable, and on by default in the `compact` preset
because without them a small model trained from scratch stays near Dice 0.3 (see docs/model.md):
  * prediction_type="v_prediction": the U-Net predicts v, from which n~ and z0~ both follow
    with bounded coefficients. With epsilon prediction z0~ = (z_t - sqrt(1-a) n~) / sqrt(a)
    multiplies every error in n~ by 1/sqrt(a) ~ 39 at t = 999, where single-step inference runs.
    The loss is unchanged: L1 on the noise plus lambda * L1 on the latent.
  * timestep_sampling="focused": 3 in 4 training draws use the inference timestep, the rest
    stay U(1, 1000), so the one timestep used at inference is not 1/1000 of the training signal.
  * mask_loss_weight=1: soft Dice + BCE on the decoded mask D(z0~), through the frozen decoder,
    added to the paper's two terms: a latent close in L1 can still decode to an empty mask.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.models.autoencoders.vae import Encoder
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_path

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MASK_LOGIT_SCALE = 4.0  # decoder output ~[-1, 1] -> logits; 0 stays the decision boundary


def soft_dice(prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample soft Dice of probabilities against a 0/1 mask, (N, C, H, W) -> (N,), smoothed by
    1 so two empty masks score 1 (the metric's empty-mask policy, metrics.py). The one copy: the
    mask loss here and the trainer's mask autoencoder both use it."""
    inter = (prob * mask).sum((1, 2, 3))
    return (2 * inter + 1) / (prob.sum((1, 2, 3)) + mask.sum((1, 2, 3)) + 1)


def soft_tversky(prob: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample soft Tversky index (N,): a missed polyp pixel weighs beta, a false one 1 - beta."""
    tp = (prob * mask).sum((1, 2, 3))
    fn = ((1 - prob) * mask).sum((1, 2, 3))
    fp = (prob * (1 - mask)).sum((1, 2, 3))
    return (tp + 1) / (tp + beta * fn + (1 - beta) * fp + 1)


def focal(prob: torch.Tensor, mask: torch.Tensor, bce: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-pixel focal BCE: pixels already right weigh (1 - p_true) ** gamma less."""
    p_true = torch.where(mask > 0.5, prob, 1 - prob)
    return (1 - p_true) ** gamma * bce


def dice_bce_loss(logits: torch.Tensor, mask: torch.Tensor, overlap_on_empty: bool = True) -> torch.Tensor:
    """(1 - soft Dice) + BCE: the mask term on D(z0~), and the encoder's coarse-mask term."""
    miss = 1 - soft_dice(torch.sigmoid(logits), mask)
    overlap = miss.mean() if overlap_on_empty else over_polyps(miss, mask)
    return overlap + F.binary_cross_entropy_with_logits(logits, mask)


def tversky_focal_loss(logits: torch.Tensor, mask: torch.Tensor, beta: float, gamma: float,
                       overlap_on_empty: bool = True) -> torch.Tensor:
    """(1 - soft Tversky) + focal BCE, per-sample means averaged. beta weighs missed polyp pixels."""
    prob = torch.sigmoid(logits)
    tversky = soft_tversky(prob, mask, beta)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    overlap = (1 - tversky).mean() if overlap_on_empty else over_polyps(1 - tversky, mask)
    return overlap + focal(prob, mask, bce, gamma).mean()


def tversky_focal_terms(logits: torch.Tensor, mask: torch.Tensor, bce: torch.Tensor, beta: float,
                        gamma: float) -> torch.Tensor:
    """Per-sample (1 - soft Tversky) + focal BCE, (N,), for losses weighted by sample."""
    prob = torch.sigmoid(logits)
    return 1 - soft_tversky(prob, mask, beta) + focal(prob, mask, bce, gamma).mean((1, 2, 3))


def over_polyps(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of a per-sample overlap loss over the samples whose mask holds a polyp.

    An overlap score of an empty target is 1 only for an almost empty prediction and about 0 for
    any other, so on polyp-free samples it rewards predicting nothing anywhere: with a quarter of
    the batch empty, the compact model learned exactly that (docs/runs/loco). Empty targets are
    left to the pixel-wise term and the latent loss, which penalise a false blob by its size. A
    batch of polyps only gives the plain mean."""
    has = mask.flatten(1).amax(1) > 0
    kept = (per_sample * has).sum() / has.sum().clamp(min=1)
    return torch.where(has.all(), per_sample.mean(), kept)


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, corrupt or does not match its config."""


def validation_message(exc: ValidationError) -> str:
    """One line naming the first offending key: `unknown key 'optim.lrr'`, `steps: ... (got 'abc')`."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    got = f" (got {value!r})" if err["type"] != "missing" and not isinstance(value, (dict, list)) else ""
    return f"{key}: {msg}{got}" if key else msg


class SegmenterConfig(BaseModel):
    """Every architectural and diffusion knob; saved as config.json beside the weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str = "compact"
    image_size: int = 256
    # Mask autoencoder (frozen in stage 2). The paper feeds the mask as 3 channels into SD's VAE.
    mask_channels: int = 1
    # The mask autoencoder folds stem x stem pixels into channels (pixel-unshuffle) on the way in
    # and unfolds them (sub-pixel convolution) on the way out: lossless, and it keeps the costly
    # full-resolution convolutions out of the decoder that runs on every frame.
    mask_stem: int = 2
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (8, 16, 32)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 4
    vae_mid_attention: bool = False
    latent_scaling_factor: float = 1.0
    # Per-channel mean of the mask latents, subtracted before scaling (diffusers' `shift_factor`,
    # per channel), so that a zero latent decodes to about the average mask. An autoencoder whose
    # zero latent decodes to polyp everywhere made stage 2 collapse to one empty mask for every
    # image (docs/runs/three-centres-10000). None: not centred, as every model before 2026-12-03.
    latent_shift: tuple[float, ...] | None = None
    # Vision encoder tau. `encoder_stem` folds stem x stem pixels into channels first
    # (pixel-unshuffle): it keeps every pixel but takes the costly full-resolution convs away.
    encoder_stem: int = 4
    encoder_block_out_channels: tuple[int, ...] = (32, 64)
    encoder_layers_per_block: int = 1
    encoder_norm_num_groups: int = 8
    encoder_mid_attention: bool = False
    encoder_double_z: bool = False
    cond_channels: int = 16
    # Denoising U-Net on concat(z_c, z_t).
    unet_block_out_channels: tuple[int, ...] = (32, 64, 96, 128)
    unet_down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    unet_up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    unet_layers_per_block: int = 1
    unet_norm_num_groups: int = 8
    unet_attention_head_dim: int = 32
    # Normalisation in the mask autoencoder, the encoder and the U-Net. "group": diffusers' GroupNorm,
    # statistics per frame (every model before 2026-12-04). "batch": BatchNorm, statistics of the
    # training batches frozen into running averages; at inference it is a per-channel scale and
    # shift that ORT folds into the convolution before it and keeps in its blocked (NCHWc) layout,
    # where GroupNorm costs a reorder pair and its own passes over every feature map (issue 25,
    # docs/runtime.md: the norm is what keeps the model below 0.7 of the CPU's ceiling).
    norm: Literal["group", "batch"] = "group"
    # Activation of every block (diffusers' act_fn) and of the presence head. "silu": every model
    # before 2026-12-04. "relu": ORT's blocked convolutions apply it inside the convolution, where
    # SiLU (x * sigmoid(x)) is a pass of its own over each feature map (tools/norm_headroom.py).
    act: Literal["silu", "relu"] = "silu"
    # Diffusion (SDSeg's schedule: linear betas 0.0015 -> 0.0155, T = 1000).
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0155
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    timestep_sampling: Literal["uniform", "focused"] = "focused"
    focus_prob: float = 0.75
    inference_timestep: int = 999
    latent_loss_weight: float = 1.0  # lambda
    mask_loss_weight: float = 1.0  # Dice + BCE on D(z0~) (docs/model.md); 0 is the paper's loss
    # dice_bce: soft Dice + BCE. tversky_focal: soft Tversky (a missed polyp pixel weighs
    # tversky_beta, a false one 1 - tversky_beta) + focal BCE (gamma): both weigh small, hard polyps
    # more than Dice + BCE, where a small polyp is a small share of the pixels.
    mask_loss_type: Literal["dice_bce", "tversky_focal"] = "dice_bce"
    tversky_beta: float = 0.7
    focal_gamma: float = 2.0
    # Whether polyp-free samples count in the overlap term (Dice / Tversky). True is the earlier
    # loss, kept so that every checkpoint trained with it rebuilds bit for bit; with polyp-free crops
    # in the batch it taught the model to predict nothing (docs/model.md, item 5): False.
    overlap_on_empty: bool = True
    # Operating point, per frame: a pixel is polyp at prob >= threshold, and a connected component
    # smaller than min_area (a fraction of the field of view) is not reported. Chosen for each
    # checkpoint on the curve of polyp-free alarms against sensitivity (`syndiff-train
    # operating-point`, docs/evaluation.md); 0 leaves every component, and the runtime's smoothing
    # then keeps its own default minimum.
    threshold: float = 0.5
    min_area: float = 0.0
    noise_seed: int = 0
    # Frame-level presence: a small head reads z_c and the predicted mask latent and gives p(polyp in
    # the frame); the probability map is then p(present) * p(pixel | present). Trained with BCE on
    # the draws at the inference timestep, while the mask losses count only the samples that hold a
    # polyp: polyp-free samples teach "nothing here" to the head, not to the mask, which had
    # collapsed to empty predictions when it was taught both (docs/model.md, item 6).
    presence_head: bool = False
    presence_channels: int = 32
    presence_loss_weight: float = 1.0
    # Auxiliary loss on z_c, for training only: a 1 x 1 convolution reads a coarse mask (one logit a
    # latent cell) from z_c, scored with soft Dice + BCE against the mask averaged to that grid, at
    # this weight. The encoder then learns to segment from the first step; without it the encoder's
    # output can go flat, the U-Net settles on one latent for every image and neither recovers (the
    # collapse of docs/runs/loco, items 9-10). Dice, not L1: an L1 target of a sparse mask is best
    # met by predicting "empty" everywhere. 0: no head, as every model before 2026-12-04.
    cond_loss_weight: float = 0.0
    # Test-time augmentation: average the probability of the frame and of its mirror image. One
    # batch of twice the frames through the U-Net, so about twice the model time; every backend
    # (eager, compiled, ONNX, TensorRT) runs it, since it is part of predict_proba.
    tta_flip: bool = False

    @model_validator(mode="after")
    def _check(self) -> "SegmenterConfig":
        if not 0 <= self.inference_timestep < self.num_train_timesteps:
            raise ValueError(f"inference_timestep must be in [0, {self.num_train_timesteps}), got {self.inference_timestep}")
        if not 0 <= self.min_area < 1:
            raise ValueError(f"min_area must be in [0, 1), got {self.min_area}")
        if not 0 <= self.focus_prob <= 1:
            raise ValueError(f"focus_prob must be in [0, 1], got {self.focus_prob}")
        if self.presence_head and (self.timestep_sampling != "focused" or self.focus_prob == 0):
            raise ValueError("presence_head learns only from draws at the inference timestep: "
                             "it needs timestep_sampling = 'focused' with focus_prob > 0")
        return self

    @property
    def latent_size(self) -> int:
        return self.image_size // (self.mask_stem * 2 ** (len(self.vae_block_out_channels) - 1))

    @classmethod
    def from_dict(cls, data: dict) -> "SegmenterConfig":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise CheckpointError(f"model config: {validation_message(exc)}") from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def scheduler(self) -> DDPMScheduler:
        """The training noise schedule (SDSeg's linear betas) as diffusers' DDPMScheduler."""
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                             beta_end=self.beta_end, beta_schedule="linear", prediction_type=self.prediction_type,
                             clip_sample=False)


def preset_config(name: str, **overrides) -> SegmenterConfig:
    """`compact`: <= 5M parameters for CPU and edge. `large`: 16M, for a GPU. `sd`: paper scale,
    SD's VAE architecture. `tiny`: for tests."""
    try:
        return _preset_config(name, **overrides)
    except ValidationError as exc:
        raise ValueError(f"preset {name!r}: {validation_message(exc)}") from None


def _preset_config(name: str, **overrides) -> SegmenterConfig:
    if name == "compact":
        return SegmenterConfig(**overrides)
    if name == "sd":
        base = dict(
            preset="sd", mask_channels=3, mask_stem=1, vae_block_out_channels=(128, 256, 512, 512), vae_layers_per_block=2,
            vae_norm_num_groups=32, vae_mid_attention=True, latent_scaling_factor=0.18215,
            encoder_stem=1, encoder_block_out_channels=(128, 256, 512, 512), encoder_layers_per_block=2,
            encoder_norm_num_groups=32, encoder_mid_attention=True, encoder_double_z=True, cond_channels=4,
            unet_block_out_channels=(192, 384, 384, 768), unet_layers_per_block=2, unet_norm_num_groups=32,
            unet_down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            unet_up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            unet_attention_head_dim=32, prediction_type="epsilon", timestep_sampling="uniform",
        )
        base.update(overrides)
        return SegmenterConfig(**base)
    if name == "tiny":  # tests and plumbing: same structure, a few thousand parameters, milliseconds a frame
        base = dict(
            preset="tiny", vae_block_out_channels=(4, 4, 8), vae_norm_num_groups=4, encoder_block_out_channels=(8, 8),
            encoder_norm_num_groups=4, cond_channels=4, unet_block_out_channels=(8, 16),
            unet_down_block_types=("DownBlock2D", "AttnDownBlock2D"), unet_up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            unet_norm_num_groups=4, unet_attention_head_dim=8,
        )
        base.update(overrides)
        return SegmenterConfig(**base)
    if name == "large":  # for GPU deployment: compact's mask autoencoder, a 4x wider encoder and U-Net
        base = dict(preset="large", encoder_block_out_channels=(64, 128), cond_channels=32,
                    unet_block_out_channels=(64, 128, 192, 256))
        base.update(overrides)
        return SegmenterConfig(**base)
    raise ValueError(f"unknown preset {name!r}: choose 'compact', 'large', 'sd' or 'tiny'")


class ChannelBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over dim 1 of a tensor of any rank: diffusers' resnets normalise (B, C, H, W), its
    attention blocks (B, C, H*W), through the one norm module they are built with."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"ChannelBatchNorm needs (batch, channels, ...), got {input.dim()} dims")


def use_batch_norm(module: nn.Module) -> None:
    """Replace every GroupNorm under `module` by a ChannelBatchNorm of the same channels and eps.
    Neither draws from the random generator, so the other weights' seeded values are unchanged."""
    replace_modules(module, nn.GroupNorm, lambda gn: ChannelBatchNorm(gn.num_channels, eps=gn.eps, affine=gn.affine))


def activation(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.SiLU()


def replace_modules(module: nn.Module, kind, make) -> None:
    """Every `kind` (a type or a tuple of types) under `module` replaced, in place, by `make(old)`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class VisionEncoder(nn.Module):
    """tau: image in [-1, 1] -> z_c at latent resolution (a KL-f8 encoder, optionally stem-folded)."""

    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        stem = cfg.encoder_stem
        self.stem = nn.PixelUnshuffle(stem) if stem > 1 else nn.Identity()
        n_down = int(math.log2(cfg.image_size // cfg.latent_size)) - int(math.log2(stem))
        if len(cfg.encoder_block_out_channels) != n_down + 1:
            raise ValueError(f"encoder needs {n_down + 1} blocks to reach the latent size with stem {stem}")
        self.encoder = Encoder(
            in_channels=3 * stem * stem,
            out_channels=cfg.latent_channels if cfg.encoder_double_z else cfg.cond_channels,
            down_block_types=("DownEncoderBlock2D",) * len(cfg.encoder_block_out_channels),
            block_out_channels=cfg.encoder_block_out_channels,
            layers_per_block=cfg.encoder_layers_per_block,
            norm_num_groups=cfg.encoder_norm_num_groups,
            double_z=cfg.encoder_double_z,
            mid_block_add_attention=cfg.encoder_mid_attention,
            act_fn=cfg.act,
        )
        enc_out = 2 * cfg.latent_channels if cfg.encoder_double_z else cfg.cond_channels
        self.proj = nn.Conv2d(enc_out, cfg.cond_channels, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(self.stem(image)))


class PresenceHead(nn.Module):
    """concat(z_c, z0~) -> one logit per frame: is there a polyp anywhere?

    Two convolutions at latent resolution, then average and max pooling: the max lets one small
    polyp decide the frame, the average weighs how much of the view looks like mucosa. Its cost is
    a few MFLOP against the model's GFLOP."""

    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        c = cfg.presence_channels
        self.features = nn.Sequential(
            nn.Conv2d(cfg.cond_channels + cfg.latent_channels, c, 3, padding=1), activation(cfg.act),
            nn.Conv2d(c, c, 3, padding=1), activation(cfg.act))
        self.out = nn.Linear(2 * c, 1)

    def forward(self, z_c: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        h = self.features(torch.cat([z_c, z0], 1))
        return self.out(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)).squeeze(1)


class Segmenter(nn.Module):
    def __init__(self, config: SegmenterConfig | None = None):
        super().__init__()
        cfg = self.config = config or SegmenterConfig()
        n_levels = len(cfg.vae_block_out_channels)
        s2 = cfg.mask_stem ** 2
        self.mask_fold = nn.PixelUnshuffle(cfg.mask_stem) if cfg.mask_stem > 1 else nn.Identity()
        self.mask_unfold = nn.PixelShuffle(cfg.mask_stem) if cfg.mask_stem > 1 else nn.Identity()
        self.mask_vae = AutoencoderKL(
            in_channels=cfg.mask_channels * s2, out_channels=cfg.mask_channels * s2,
            down_block_types=("DownEncoderBlock2D",) * n_levels, up_block_types=("UpDecoderBlock2D",) * n_levels,
            block_out_channels=cfg.vae_block_out_channels, layers_per_block=cfg.vae_layers_per_block,
            latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_norm_num_groups,
            sample_size=cfg.image_size, scaling_factor=cfg.latent_scaling_factor,
            mid_block_add_attention=cfg.vae_mid_attention, act_fn=cfg.act,
        )
        self.vision_encoder = VisionEncoder(cfg)
        self.unet = UNet2DModel(
            sample_size=cfg.latent_size, in_channels=cfg.cond_channels + cfg.latent_channels,
            out_channels=cfg.latent_channels, down_block_types=cfg.unet_down_block_types,
            up_block_types=cfg.unet_up_block_types, block_out_channels=cfg.unet_block_out_channels,
            layers_per_block=cfg.unet_layers_per_block, norm_num_groups=cfg.unet_norm_num_groups,
            attention_head_dim=cfg.unet_attention_head_dim, act_fn=cfg.act,
        )
        if cfg.norm == "batch":
            for part in (self.mask_vae, self.vision_encoder, self.unet):
                use_batch_norm(part)
        if cfg.act != "silu":  # diffusers hard-codes SiLU before each output convolution: those too
            replace_modules(self, nn.SiLU, lambda _: activation(cfg.act))
        # built after the others, so that adding it leaves their seeded initial weights unchanged
        self.presence = PresenceHead(cfg) if cfg.presence_head else None
        # and without a draw from the global generator: stage 1 and stage 2 then run as without it
        with torch.random.fork_rng(devices=[]):
            self.cond_head = nn.Conv2d(cfg.cond_channels, 1, 1) if cfg.cond_loss_weight > 0 else None
        self.scheduler = cfg.scheduler()
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)
        gen = torch.Generator().manual_seed(cfg.noise_seed)
        noise = torch.randn(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen)
        self.register_buffer("inference_noise", noise, persistent=False)

    # ---- latent space -------------------------------------------------------------------------
    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Binary mask (B,1,H,W) in {0,1} -> scaled latent z0 (the posterior mean, deterministic)."""
        x = mask * 2 - 1
        if self.config.mask_channels != 1:
            x = x.expand(-1, self.config.mask_channels, -1, -1)
        z = self.mask_vae.encode(self.mask_fold(x)).latent_dist.mode()
        if self.config.latent_shift is not None:
            z = z - self._shift(z)
        return z * self.config.latent_scaling_factor

    def _shift(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.config.latent_shift, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def decode_raw(self, z0: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> decoder output (B,1,H,W), channels averaged as in SDSeg; > 0 is polyp."""
        z = z0 / self.config.latent_scaling_factor
        if self.config.latent_shift is not None:
            z = z + self._shift(z)
        x = self.mask_unfold(self.mask_vae.decode(z).sample)
        return x.mean(1, keepdim=True)

    def decode_latent(self, z0: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> polyp probability (B,1,H,W) in [0, 1]."""
        return ((self.decode_raw(z0) + 1) / 2).clamp(0, 1)

    # ---- diffusion ----------------------------------------------------------------------------
    def _coeffs(self, t: torch.Tensor):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def estimates(self, model_output, z_t, t):
        """(n~, z0~) from the U-Net output, for every prediction type."""
        sa, s1a = self._coeffs(t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            noise = model_output
            z0 = (z_t - s1a * noise) / sa
        elif kind == "v_prediction":
            z0 = sa * z_t - s1a * model_output
            noise = s1a * z_t + sa * model_output
        else:  # sample
            z0 = model_output
            noise = (z_t - sa * z0) / s1a
        return noise, z0

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U(1, T-1) (the paper's 1..1000 in zero-based indices), optionally focused on inference t."""
        cfg = self.config
        device = self.alphas_cumprod.device
        t = torch.randint(1, cfg.num_train_timesteps, (batch,), generator=generator)
        if cfg.timestep_sampling == "focused":
            pick = torch.rand(batch, generator=generator) < cfg.focus_prob
            t = torch.where(pick, torch.full_like(t, cfg.inference_timestep), t)
        return t.to(device)

    def forward(self, image: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoise(image, z_t, t)[1]

    def denoise(self, image: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_c, U-Net output): the presence head reads z_c too."""
        z_c = self.vision_encoder(image)
        return z_c, self.unet(torch.cat([z_c, z_t], 1), t).sample

    def training_losses(self, image, mask, generator: torch.Generator | None = None, z0=None, t=None,
                        noise=None) -> dict:
        """The paper's loss: L1(n, n~) + lambda * L1(z0, z0~) (+ optional Dice on the decoded mask).

        With a presence head, the paper's terms and the mask term count only the samples that hold
        a polyp (the mask is conditional on presence), and BCE on the presence logit is added
        (`_conditional_losses`). `t` and `noise` are drawn from `generator` unless given (tests pass
        them to check the formula)."""
        cfg = self.config
        if z0 is None:
            with torch.no_grad():
                z0 = self.encode_mask(mask)
        if t is None:
            t = self.sample_timesteps(image.shape[0], generator)
        if noise is None:
            noise = torch.randn(z0.shape, generator=generator).to(z0)
        z_t = self.scheduler.add_noise(z0, noise, t)
        z_c, out = self.denoise(image, z_t, t)
        noise_hat, z0_hat = self.estimates(out, z_t, t)
        losses = (self._conditional_losses(z_c, noise_hat, noise, z0_hat, z0, mask, t) if self.presence is not None
                  else self._plain_losses(noise_hat, noise, z0_hat, z0, mask))
        if self.cond_head is not None:
            losses["cond"] = self._cond_loss(z_c, mask)
            losses["loss"] = losses["loss"] + cfg.cond_loss_weight * losses["cond"]
        return losses

    def _cond_loss(self, z_c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft Dice + BCE of the coarse mask read from z_c, against the mask's share of each cell."""
        logits = self.cond_head(z_c)
        return dice_bce_loss(logits, F.adaptive_avg_pool2d(mask, logits.shape[-2:]), self.config.overlap_on_empty)

    def _plain_losses(self, noise_hat, noise, z0_hat, z0, mask) -> dict:
        cfg = self.config
        loss_noise = F.l1_loss(noise_hat, noise)
        loss_latent = F.l1_loss(z0_hat, z0)
        losses = {"noise": loss_noise, "latent": loss_latent}
        loss = loss_noise + cfg.latent_loss_weight * loss_latent
        if cfg.mask_loss_weight > 0:
            # Through the frozen decoder D: a latent that is close in L1 can still decode to an empty
            # mask. A sigmoid of the raw output (not the clamped probability) keeps a gradient on
            # every pixel, also on a missed polyp far below the threshold.
            logits = MASK_LOGIT_SCALE * self.decode_raw(z0_hat)
            if cfg.mask_loss_type == "dice_bce":
                losses["mask"] = dice_bce_loss(logits, mask, cfg.overlap_on_empty)
            else:
                losses["mask"] = tversky_focal_loss(logits, mask, cfg.tversky_beta, cfg.focal_gamma,
                                                    cfg.overlap_on_empty)
            loss = loss + cfg.mask_loss_weight * losses["mask"]
        losses["loss"] = loss
        return losses

    def _conditional_losses(self, z_c, noise_hat, noise, z0_hat, z0, mask, t) -> dict:
        """With a presence head: the paper's terms and the mask term are means over the samples that
        hold a polyp (the mask is conditional on presence), BCE on the presence logit a mean over the
        draws at the inference timestep (at a small t the noisy latent still shows the true mask, and
        z0~ would give the answer away). Weights, not indexing: static shapes for torch.compile."""
        cfg = self.config
        has = (mask.flatten(1).amax(1) > 0).to(noise_hat.dtype)

        def over(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return (per_sample * weight).sum() / weight.sum().clamp(min=1)

        def per_sample(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).mean(1)

        losses = {"noise": over(per_sample((noise_hat - noise).abs()), has),
                  "latent": over(per_sample((z0_hat - z0).abs()), has)}
        loss = losses["noise"] + cfg.latent_loss_weight * losses["latent"]
        if cfg.mask_loss_weight > 0:
            logits = MASK_LOGIT_SCALE * self.decode_raw(z0_hat)
            bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
            if cfg.mask_loss_type == "dice_bce":
                terms = 1 - soft_dice(torch.sigmoid(logits), mask) + per_sample(bce)
            else:
                terms = tversky_focal_terms(logits, mask, bce, cfg.tversky_beta, cfg.focal_gamma)
            losses["mask"] = over(terms, has)
            loss = loss + cfg.mask_loss_weight * losses["mask"]
        # the head judges the predicted mask, it does not shape it: z0~ enters detached
        logit = self.presence(z_c, z0_hat.detach())
        at_inference = (t == cfg.inference_timestep).to(logit.dtype)
        losses["presence"] = over(F.binary_cross_entropy_with_logits(logit, has, reduction="none"), at_inference)
        losses["loss"] = loss + cfg.presence_loss_weight * losses["presence"]
        return losses

    # ---- inference ----------------------------------------------------------------------------
    def single_step(self, image: torch.Tensor, timestep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_c, z0~) of one U-Net pass at a fixed timestep from the seeded noise: the same frame,
        the same mask. Both, because the presence head reads them together."""
        t_val = self.config.inference_timestep if timestep is None else int(timestep)
        b = image.shape[0]
        z_t = self.inference_noise.expand(b, -1, -1, -1).to(image.dtype)
        t = torch.full((b,), t_val, dtype=torch.long, device=image.device)
        z_c, out = self.denoise(image, z_t, t)
        return z_c, self.estimates(out, z_t, t)[1]

    def _gated(self, z_c: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """p(pixel) = p(polyp in the frame) * p(pixel | polyp), or the map alone without a head."""
        prob = self.decode_latent(z0)
        if self.presence is None:
            return prob
        return prob * torch.sigmoid(self.presence(z_c, z0)).view(-1, 1, 1, 1)

    @torch.no_grad()
    def predict_presence(self, image: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Image (B,3,H,W) -> p(polyp in the frame) (B,), from the presence head (which it needs)."""
        if self.presence is None:
            raise ValueError("this model has no presence head (config presence_head = false)")
        return torch.sigmoid(self.presence(*self.single_step(image, timestep)))

    @torch.no_grad()
    def predict_proba(self, image: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Image (B,3,H,W) in [-1, 1] -> polyp probability (B,1,H,W)."""
        if not self.config.tta_flip:
            return self._gated(*self.single_step(image, timestep))
        b = image.shape[0]
        prob = self._gated(*self.single_step(torch.cat([image, image.flip(-1)]), timestep))
        return (prob[:b] + prob[b:].flip(-1)) / 2

    @torch.no_grad()
    def predict_proba_multistep(self, image: torch.Tensor, steps: int) -> torch.Tensor:
        """DDIM with `steps` U-Net passes from the same seeded noise, for comparison with one step."""
        cfg = self.config
        sched = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                              beta_end=cfg.beta_end, beta_schedule="linear", prediction_type=cfg.prediction_type,
                              clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        b = image.shape[0]
        z = self.inference_noise.expand(b, -1, -1, -1).to(image.dtype).clone()
        z_c = self.vision_encoder(image)
        for t in sched.timesteps:
            out = self.unet(torch.cat([z_c, z], 1), t.to(image.device).expand(b)).sample
            z = sched.step(out, t, z).prev_sample
        return self._gated(z_c, z)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write config.json + model.safetensors atomically (no pickle anywhere)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format_version": FORMAT_VERSION, "class": "Segmenter",
                  "config": self.config.to_dict(), **(extra or {})}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp_w, atomic_path(directory / CONFIG_NAME) as tmp_c:
            save_file(state, str(tmp_w), metadata={"format_version": str(FORMAT_VERSION)})
            tmp_c.write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, map_location: str = "cpu") -> "Segmenter":
        """Load a checkpoint folder; with no folder, the shipped default. Errors name the problem."""
        directory = Path(directory) if directory is not None else default_checkpoint_path()
        config = read_checkpoint_config(directory)
        model = cls(config)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {directory}: {WEIGHTS_NAME} is missing")
        try:
            with safe_open(str(weights), framework="pt", device=map_location) as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CheckpointError(f"checkpoint {weights}: not a readable safetensors file ({exc})") from None
        expected = model.state_dict()
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {weights} does not match its config: "
                                  f"{len(missing)} missing, {len(unexpected)} unexpected tensors "
                                  f"(e.g. {sorted(missing or unexpected)[0]})")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise CheckpointError(f"checkpoint {weights} does not match its config: {k} has shape "
                                      f"{tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
        model.load_state_dict(state)
        return model.eval()


def read_checkpoint_config(directory: str | Path) -> SegmenterConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_NAME} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("class") != "Segmenter" or "config" not in data:
        raise CheckpointError(f"checkpoint {path}: not a syndiff-stream Segmenter config")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {data.get('format_version')!r}, "
                              f"this syndiff-stream reads version {FORMAT_VERSION}")
    try:
        return SegmenterConfig.from_dict(data["config"])
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None


DEFAULT_CHECKPOINT = "compact16-stem4-bn-kvasir-clinicdb-neopolyp"


def default_checkpoint_path() -> Path:
    """The shipped default: built by the trainer's default recipe, whose record lies beside it.
    The earlier ones, `compact-kvasir-clinicdb` and `compact-kvasir`, stay in weights/ and load by path."""
    return Path(__file__).parent / "weights" / DEFAULT_CHECKPOINT


def init_from_sd_vae(model: Segmenter, vae_dir: str | Path) -> None:
    """Paper-scale init: mask autoencoder and vision encoder from a local SD VAE folder (diffusers layout)."""
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise CheckpointError(f"--init-vae {vae_dir}: expected a diffusers AutoencoderKL folder "
                              "(config.json + diffusion_pytorch_model.safetensors)")
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    model.mask_vae.load_state_dict(vae.state_dict())
    model.vision_encoder.encoder.load_state_dict(vae.encoder.state_dict())
    c = model.config.cond_channels
    with torch.no_grad():  # z_c = scaled posterior mean, as the paper's image latent
        w, b = vae.quant_conv.weight[:c], vae.quant_conv.bias[:c]
        model.vision_encoder.proj.weight.copy_(w * vae.config.scaling_factor)
        model.vision_encoder.proj.bias.copy_(b * vae.config.scaling_factor)
    model.config.latent_scaling_factor = float(vae.config.scaling_factor)
