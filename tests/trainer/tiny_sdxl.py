"""A tiny randomly initialised SDXL inpainting pipeline, saved in the diffusers folder layout.

Built the way diffusers' own tests build dummy components, so the real loading and generation
code paths run on CPU in well under a second per sample.
"""

from __future__ import annotations

import json
from pathlib import Path


def _write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A byte-level-BPE CLIP vocabulary of single letters plus a few merges (no download)."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789-,()."
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = [("p", "o"), ("po", "l"), ("i", "n"), ("a", "l")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
        vocab.setdefault(a + b + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_sdxl_inpaint(folder: Path, sample_size: int = 32) -> Path:
    """Save a tiny StableDiffusionXLInpaintPipeline to `folder`; images are sample_size * 2 pixels."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    max_len = 32
    tok_dir = Path(folder).with_name(Path(folder).name + "-tokenizer-src")
    _write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=max_len)
    text_cfg = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                    layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                    max_position_embeddings=max_len, hidden_act="gelu", projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=sample_size * 2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLInpaintPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                            requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
