"""Tiny random-weight SD-family components for the distill benchmarks and the distill tests (never a hub
download): the real diffusers/transformers classes at toy size, so every code path is the real one."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel

from lcm_edge.distill.default_model.bpe import train_bpe, write_tokenizer
from lcm_edge.distill.models import BaseModels


def char_tokenizer(folder: str | Path):
    """A real CLIPTokenizer with a character-level vocabulary: the CLIP-format BPE trained on no text
    (256 byte symbols, the same with </w>, bos/eos, no merges).

    Prompts tokenize letter by letter, so a tiny text encoder can still tell "red" from "blue".
    """
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe([])
    return CLIPTokenizer.from_pretrained(write_tokenizer(Path(folder), vocab, merges, max_length=77))


def tiny_components(tokenizer_dir: str | Path, *, seed: int = 0, channels: tuple[int, int] = (16, 32),
                    with_motion: bool = True) -> BaseModels:
    """A tiny SD-style model (random weights): 2-level UNet, 2x VAE, 2-layer CLIP, char tokenizer, motion module.

    Image 16 px -> latent 8 px. Same classes as SD1.5, so every code path is the real one.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1, sample_size=16, scaling_factor=1.0)
    tokenizer = char_tokenizer(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77))
    motion = None
    if with_motion:
        motion = MotionAdapter(block_out_channels=channels, motion_layers_per_block=1, motion_norm_num_groups=4,
                               motion_num_attention_heads=2, motion_max_seq_length=32)
    return BaseModels(unet=unet.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, vae=vae.eval(),
                      motion_adapter=motion)
