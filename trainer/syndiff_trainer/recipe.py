"""Training recipes: one versioned TOML file holding every knob of a run, validated by pydantic.

A recipe is the whole answer to "how was this model made": model preset and overrides, data
sources with sampling weights and grouping, split policy, steps, batch, optimiser and schedule,
augmentation, loss weights, timestep sampling, EMA, stage 1 and seeds. `fit` writes the resolved
recipe into every run folder; `reproduce` reads it back. Unknown or mistyped keys are an error
naming the key. Run options that do not change the result (output folder, progress bar, cache)
are not part of a recipe; the thread count is recorded beside it because it changes float sums.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from syndiff_stream.model import SegmenterConfig, preset_config, validation_message

RECIPE_VERSION = 1
RECIPE_NAME = "recipe.toml"
DEFAULT_RECIPE = "compact16-stem4-bn-kvasir-clinicdb-neopolyp"


class RecipeError(ValueError):
    """A recipe that cannot be used: names the file and the key at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    preset: Literal["compact", "large", "sd", "tiny"] = "compact"
    overrides: dict[str, Any] = Field(default_factory=dict)  # any SegmenterConfig field
    init_vae: str = ""  # sd preset: local Stable Diffusion VAE folder (diffusers layout)
    init_from: str = ""  # start from this checkpoint (reuses its mask autoencoder)
    freeze_encoder: bool = False  # ablation: the vision encoder keeps its initial weights


class SourceSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str
    weight: float = Field(1.0, gt=0)  # sampling weight: sources are drawn in proportion to it
    # How frames are grouped so that no group straddles a split: `sequences` reads
    # <path>/sequences.csv (frame,sequence), `phash` clusters near-copies by perceptual hash,
    # `none` makes every image its own group.
    groups: Literal["sequences", "phash", "none"] = "phash"
    skip_unpaired: bool = False  # leave out images without a mask (and masks without an image)


class SplitSpec(_Strict):
    # grouped: val_fraction of every source's groups held out; holdout-source: `holdout` is
    # validation only; file: a JSON {train, val[, select]} of prefixed stems.
    policy: Literal["grouped", "holdout-source", "file"] = "grouped"
    val_fraction: float = Field(0.15, ge=0, lt=1)
    # Groups held out to choose a checkpoint; 0 ships the last one, so the validation score is
    # never the score that chose it.
    select_fraction: float = Field(0.0, ge=0, lt=1)
    holdout: str = ""
    file: str = ""
    phash_threshold: int = Field(5, ge=0, le=64)
    seed: int = 0


class OptimSpec(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(300, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"  # diffusers' warm-up schedules
    grad_clip: float = Field(1.0, gt=0)


class AugmentSpec(_Strict):
    # none | standard (geometric + photometric) | scope (standard + scope and centre variation:
    # white balance, gamma, vignetting, specular highlights, blur, compression, resolution,
    # field-of-view shapes, on-screen text)
    preset: Literal["none", "standard", "scope"] = "standard"
    # mild: ColorJitter's small hue shift (and scope's white balance); strong adds wide hue and
    # saturation shifts, random channel mixing and grey, for centres whose scopes and light modes
    # (BLI, LCI, FICE) colour the mucosa differently (docs/runs/loco, item 8)
    colour: Literal["mild", "strong"] = "mild"


class LossSpec(_Strict):
    latent_weight: float = Field(1.0, ge=0)  # lambda in L1(n, n~) + lambda * L1(z0, z0~)
    mask_weight: float = Field(1.0, ge=0)  # Dice + BCE on D(z0~); 0 is the paper's loss
    mask_type: Literal["dice_bce", "tversky_focal"] = "dice_bce"
    tversky_beta: float = Field(0.7, ge=0, le=1)  # tversky_focal: weight of a missed polyp pixel
    focal_gamma: float = Field(2.0, ge=0)
    # polyp-free samples in the Dice / Tversky term: true is the earlier loss (checkpoints trained
    # with it rebuild bit for bit); with [negatives], false (docs/model.md, item 5)
    overlap_on_empty: bool = True
    # soft Dice + BCE of a coarse mask read from z_c by a 1 x 1 convolution (training only): the
    # encoder learns to segment from the first step, against the collapse to one latent for every
    # image (docs/model.md, item 7)
    cond_weight: float = Field(0.0, ge=0)


class TimestepSpec(_Strict):
    sampling: Literal["uniform", "focused"] = "focused"
    focus_prob: float = Field(0.75, ge=0, le=1)
    inference: int = Field(999, ge=0)


class EmaSpec(_Strict):
    decay: float = Field(0.999, ge=0, lt=1)


class Stage1Spec(_Strict):
    """Mask autoencoder (compact and tiny presets): trained on masks alone, then frozen."""

    steps: int = Field(600, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    target_dice: float = Field(0.99, gt=0, le=1)
    # Centre the latents per channel before scaling them (model.latent_shift). Off keeps earlier
    # recipes' models bit for bit; on, no stage 1 can hand stage 2 a zero latent that decodes to
    # polyp everywhere, the start from which three runs collapsed (docs/runs/three-centres-10000).
    center_latents: bool = False


class SamplingSpec(_Strict):
    """How training images are drawn, beyond the per-source weights."""

    # An image whose polyps are all small (< small_fraction of the frame) is drawn
    # (1 + small_polyp_boost) times as often: small polyps are what the model misses.
    small_polyp_boost: float = Field(0.0, ge=0)
    small_fraction: float = Field(0.02, gt=0, lt=1)


class NegativesSpec(_Strict):
    """Polyp-free crops of the training frames, with empty masks (negatives.py): how the model
    learns to say "nothing here". Cut once per frame at load time; drawn into every batch."""

    rate: float = Field(0.0, ge=0, lt=1)  # share of the samples drawn that are polyp-free crops; 0: none
    per_image: int = Field(2, ge=1)  # crops cut from each frame (fewer where its polyp leaves no room)
    min_scale: float = Field(0.3, gt=0, le=1)  # smallest crop side, as a fraction of the field of view's
    margin: float = Field(0.03, ge=0, lt=0.5)  # distance kept from every polyp pixel (fraction of the frame)
    seed: int = 0
    # Stage-2 step of the first crop, and the steps over which their share then rises to `rate`:
    # the model may learn to segment before it learns to say "nothing here" (docs/training.md).
    start: int = Field(0, ge=0)
    ramp: int = Field(0, ge=0)
    # Empty masks in stage 1 too. The mask autoencoder reconstructs an empty mask without them, and
    # with them zero and random latents decode to nothing: an untrained segmenter then predicts
    # nothing and may not climb out (docs/runs/loco/free-stage1-empties).
    stage1: bool = True
    # Whole training frames with the polyp filled in, among the polyp-free samples (crops are
    # close-ups; an empty colonoscopy frame is mostly a whole view), and as many decoys: frames with
    # the same fill where there is no polyp, among the frames, so that a fill does not mean "empty".
    # With per_image = 1 about half the polyp-free draws are erased frames.
    erased: bool = False


class SyntheticSpec(_Strict):
    path: str = ""  # folder written by `syndiff-train synth`; empty: none
    count: int | None = None
    ratio: float | None = None  # synthetic samples per real training image
    # How often a synthetic sample is drawn: the synthetic set is one more source, drawn at this
    # weight beside the data sources' own (1.0 each by default), whatever its size.
    weight: float = Field(1.0, gt=0)


def check_sources(data: list[SourceSpec], split: SplitSpec) -> None:
    """Source names unique, and a held-out source one of them: every recipe with data (the
    segmenter's, the inpainter's) checks this in its validator."""
    names = [s.name for s in data]
    if len(set(names)) != len(names):
        raise ValueError(f"data source names must be unique, got {names}")
    if split.policy == "holdout-source" and split.holdout not in names:
        raise ValueError(f"split.holdout {split.holdout!r} names no data source (have {names})")


class Recipe(_Strict):
    version: int = RECIPE_VERSION
    name: str = "run"
    seed: int = 0
    steps: int = Field(6000, ge=1)
    batch_size: int = Field(8, ge=1)
    image_size: int = Field(256, ge=32)
    val_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: list[SourceSpec] = Field(min_length=1)
    split: SplitSpec = Field(default_factory=SplitSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    timesteps: TimestepSpec = Field(default_factory=TimestepSpec)
    ema: EmaSpec = Field(default_factory=EmaSpec)
    stage1: Stage1Spec = Field(default_factory=Stage1Spec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    negatives: NegativesSpec = Field(default_factory=NegativesSpec)
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version}; this trainer reads version {RECIPE_VERSION}")
        check_sources(self.data, self.split)
        if self.loss.cond_weight > 0 and self.model.init_from:
            raise ValueError("loss.cond_weight adds a head that model.init_from's checkpoint lacks: "
                             "train it from scratch")
        if self.split.policy == "file" and not self.split.file:
            raise ValueError("split.policy 'file' needs split.file")
        clash = set(self.model.overrides) & set(RECIPE_OWNED)
        if clash:
            raise ValueError(f"model.overrides sets {sorted(clash)}, which the recipe's own sections set "
                             f"({', '.join(RECIPE_OWNED[k] for k in sorted(clash))})")
        self.model_config_()  # unknown preset or override keys fail here, not at step 1
        return self

    def model_config_(self) -> SegmenterConfig:
        """The SegmenterConfig this recipe trains: preset + overrides + loss and timestep sections."""
        owned = dict(image_size=self.image_size, latent_loss_weight=self.loss.latent_weight,
                     mask_loss_weight=self.loss.mask_weight, mask_loss_type=self.loss.mask_type,
                     tversky_beta=self.loss.tversky_beta, focal_gamma=self.loss.focal_gamma,
                     overlap_on_empty=self.loss.overlap_on_empty, cond_loss_weight=self.loss.cond_weight,
                     timestep_sampling=self.timesteps.sampling,
                     focus_prob=self.timesteps.focus_prob, inference_timestep=self.timesteps.inference)
        try:
            return preset_config(self.model.preset, **{**self.model.overrides, **owned})
        except ValueError as exc:
            raise ValueError(f"model: {exc}") from None

    def to_toml(self) -> str:
        data = self.model_dump(mode="json")
        return f"# syndiff-train recipe, version {RECIPE_VERSION}\n" + tomli_w.dumps(_drop_none(data))


# SegmenterConfig fields a recipe sets from its own sections (not from model.overrides).
RECIPE_OWNED = {"image_size": "image_size", "latent_loss_weight": "loss.latent_weight",
                "mask_loss_weight": "loss.mask_weight", "mask_loss_type": "loss.mask_type",
                "tversky_beta": "loss.tversky_beta", "focal_gamma": "loss.focal_gamma",
                "overlap_on_empty": "loss.overlap_on_empty", "cond_loss_weight": "loss.cond_weight",
                "timestep_sampling": "timesteps.sampling",
                "focus_prob": "timesteps.focus_prob", "inference_timestep": "timesteps.inference"}


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def shipped_recipes() -> list[str]:
    folder = resources.files("syndiff_trainer") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a shipped recipe (trainer/syndiff_trainer/recipes/; an unknown name lists them)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist")
        return path
    shipped = resources.files("syndiff_trainer") / "recipes" / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise RecipeError(f"no recipe file {name_or_path!r} and no shipped recipe of that name "
                          f"(shipped: {', '.join(shipped_recipes())})")
    return Path(str(shipped))


def parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, strings, lists, inline tables); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_sets(data: dict, sets: list[str]) -> dict:
    """Apply `key.sub=value` overrides (`data.0.weight=2`) to a raw recipe dict."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=5e-4")
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} has {len(node)} entries, no {part!r}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"--set {key}: no entry {last!r}")
            node[int(last)] = parse_value(value)
        else:
            node[last] = parse_value(value)
    return data


def load_recipe(source: str | Path, sets: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every error is one line naming the file and key."""
    path = recipe_path(source)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {path}: not valid TOML ({exc})") from None
    return recipe_from_dict(apply_sets(data, sets or []), str(path))


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    if data.get("kind", "segmenter") != "segmenter":  # e.g. an inpainter recipe (inpainter.py)
        raise RecipeError(f"{where}: a {data['kind']} recipe, not a segmenter's; "
                          f"train it with `syndiff-train {data['kind']} --recipe ...`")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{where}: {validation_message(exc)}") from None


def recipe_diff(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes."""
    def flat(value, prefix=""):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from flat(v, f"{prefix}{k}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, v in enumerate(value):
                yield from flat(v, f"{prefix}{i}.")
        else:
            yield prefix[:-1], value

    fa, fb = dict(flat(a.model_dump(mode="json"))), dict(flat(b.model_dump(mode="json")))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
