"""Tiny random-weight components for tests: built from configs, tokenizer written to a temp dir."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer)

WORDS = ["a", "cat", "dog", "photo", "of", "red", "blue", "green", "house", "tree"]


def write_clip_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a handful of whole words and single letters (no merges)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _clip_config(hidden: int = 16, projection: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                          vocab_size=100, max_position_embeddings=77, projection_dim=projection,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                         sample_size=16).eval()


def tiny_sd(tmp_path, scheduler=None) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4).eval()
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_clip_config()).eval()
    pipe = StableDiffusionPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=text_encoder, tokenizer=write_clip_tokenizer(tmp_path / "tok"),
        scheduler=scheduler or DDIMScheduler(clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(tmp_path, scheduler=None) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=40,
        cross_attention_dim=32, norm_num_groups=4).eval()
    torch.manual_seed(2)
    te1 = CLIPTextModel(_clip_config()).eval()
    torch.manual_seed(3)
    te2 = CLIPTextModelWithProjection(_clip_config(projection=16)).eval()
    tok = write_clip_tokenizer(tmp_path / "tok")
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
        scheduler=scheduler or DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012, timestep_spacing="leading",
                                                           steps_offset=1),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_class_unet(num_classes: int = 10, sample_size: int = 8) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1,
                       norm_num_groups=8, attention_head_dim=8).eval()


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    # DiTPipeline hard-codes 1000 as the null class, so the tiny model keeps 1000 classes.
    return DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=1000,
                                 norm_type="ada_norm_zero").eval()
