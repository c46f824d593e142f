"""Text-guided inpainting from a LOCAL diffusers folder (SDXL inpainting as in the paper, or any
diffusers inpainting pipeline, e.g. an SD-2 inpainting model fine-tuned on polyps).

Nothing is downloaded: the folder must hold what `save_pretrained` writes, and an incomplete one
fails before loading with a message that names the expected layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EXPECTED_LAYOUT = ("expected a diffusers pipeline folder as written by save_pretrained: model_index.json, "
                   "unet/, vae/, text_encoder/, tokenizer/, scheduler/ (SDXL adds text_encoder_2/, tokenizer_2/), "
                   "each with its config and *.safetensors weights")
_WEIGHTLESS = ("tokenizer", "scheduler", "feature_extractor", "image_processor")


class WeightsError(ValueError):
    """A weights folder that cannot be loaded; the message names the expected layout."""


def check_pipeline_folder(folder: str | Path) -> str:
    """Validate the folder layout without loading anything; returns model_index's `_class_name`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"inpainting weights folder {folder} does not exist; {EXPECTED_LAYOUT}")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise WeightsError(f"{folder}: model_index.json is missing; {EXPECTED_LAYOUT}")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{index_path}: not valid JSON ({exc}); {EXPECTED_LAYOUT}") from None
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise WeightsError(f"{folder}: component folder {name}/ is missing; {EXPECTED_LAYOUT}")
        if not name.startswith(_WEIGHTLESS) and not any(sub.glob("*.safetensors")):
            raise WeightsError(f"{folder}: {name}/ has no *.safetensors weights (pickle .bin files are not "
                               f"loaded); {EXPECTED_LAYOUT}")
    return str(index.get("_class_name", ""))


def load_inpaint_pipeline(folder: str | Path, device: str = "cpu", fp16: bool = False, cpu_offload: bool = False,
                          attention_slicing: bool = False):
    """Any diffusers inpainting pipeline (or a text-to-image folder AutoPipeline maps to inpainting)."""
    import warnings

    import torch
    from diffusers import AutoPipelineForInpainting

    class_name = check_pipeline_folder(folder)
    import importlib.util

    if importlib.util.find_spec("transformers") is None:  # the text encoders of every SD pipeline
        raise WeightsError(f"{folder}: loading an inpainting pipeline needs the `transformers` package: "
                           "pip install -e './trainer[synth]'")
    dtype = torch.float16 if fp16 else torch.float32
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones know only it
            warnings.simplefilter("ignore", FutureWarning)
            pipe = AutoPipelineForInpainting.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True,
                                                             local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise WeightsError(f"{folder}: cannot load {class_name or 'pipeline'} for inpainting "
                           f"({str(exc).splitlines()[0]}); {EXPECTED_LAYOUT}") from None
    pipe.set_progress_bar_config(disable=True)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if cpu_offload:
        try:
            pipe.enable_model_cpu_offload(device=device)
        except (ImportError, RuntimeError, ValueError) as exc:
            raise WeightsError(f"--cpu-offload needs `pip install accelerate` and a GPU ({exc})") from None
    else:
        pipe.to(device)
    return pipe


def native_resolution(pipe) -> int:
    """The pipeline's training resolution: 1024 for SDXL, 512 for SD-2 inpainting."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


class Inpainter:
    """Generation stage: (frames, masks, prompts, seeds) -> inpainted frames, one batched pipeline call.

    Each sample has its own CPU generator, so a sample depends on its seed, not on its batch."""

    def __init__(self, pipe, steps: int, guidance_scale: float, strength: float):
        self.pipe, self.steps, self.guidance_scale, self.strength = pipe, steps, guidance_scale, strength

    def __call__(self, frames: list[np.ndarray], masks: list[np.ndarray], prompts: list[str],
                 negative_prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        import torch
        from PIL import Image

        h, w = frames[0].shape[:2]
        out = self.pipe(
            prompt=prompts, negative_prompt=negative_prompts,
            image=[Image.fromarray(f) for f in frames],
            mask_image=[Image.fromarray(m.astype(np.uint8) * 255) for m in masks],
            height=h, width=w, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
            strength=self.strength, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
        ).images
        return [np.clip(np.round(np.asarray(img, np.float32) * 255), 0, 255).astype(np.uint8) for img in out]
