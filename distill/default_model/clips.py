"""The default model's data: which caption combinations it trains on, its clips, captions and latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..synthetic import COLOURS, DIRECTIONS, SHAPES, ShapeClip, caption_for, synthetic_clips
from .bpe import train_bpe, write_tokenizer
from .pretrain import ToyArchitecture, encode_latents

# Held out of training: the "harder figure" of the evaluation (combinations never seen).
HELD_OUT = (("red", "triangle", "up"), ("green", "circle", "left"), ("blue", "square", "down"),
            ("yellow", "triangle", "right"), ("white", "circle", "up"))


def training_combinations() -> list[tuple[str, str, str]]:
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if (c, s, d) not in HELD_OUT]


def make_training_clips(count: int, arch: ToyArchitecture, seed: int) -> list[ShapeClip]:
    """`count` clips of the trained combinations (drawn from twice as many, the held-out ones dropped)."""
    clips = synthetic_clips(count * 2, seed=seed, size=arch.resolution, num_frames=arch.num_frames)
    return [c for c in clips if (c.colour, c.shape, c.direction) not in HELD_OUT][:count]


def prompt_form() -> str:
    """What the model can draw, in words (printed by `lcm-edge info`)."""
    return (f"{caption_for('{colour}', '{shape}', '{direction}')} with colour {'|'.join(COLOURS)}, "
            f"shape {'|'.join(SHAPES)}, direction {'|'.join(DIRECTIONS)}")


def caption_ids(tokenizer, captions: list[str], arch: ToyArchitecture) -> torch.Tensor:
    """(N, text_max_length) token ids, padded as the text encoder was trained."""
    return torch.tensor([tokenizer(c, padding="max_length", max_length=arch.text_max_length,
                                   truncation=True).input_ids for c in captions])


def train_tokenizer(folder: Path, captions: list[str], arch: ToyArchitecture):
    """The BPE on the training captions + the held-out ones (their words are the same), written and loaded."""
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(captions + [caption_for(*combo) for combo in HELD_OUT])
    write_tokenizer(folder, vocab, merges, arch.text_max_length)
    return CLIPTokenizer.from_pretrained(folder)


def clip_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, F, H, W, 3) clips as float (N, F, 3, H, W) in [-1, 1]."""
    return (torch.from_numpy(np.asarray(frames)).float() / 127.5 - 1.0).permute(0, 1, 4, 2, 3)


def encode_clips(vae, frames: torch.Tensor) -> torch.Tensor:
    """(N, F, 3, H, W) frames -> (N, C, F, h, w) video latents at unit spread (sets the VAE's scaling_factor)."""
    video_latents = encode_latents(vae, frames.flatten(0, 1)).unflatten(0, frames.shape[:2])  # (N, F, C, h, w)
    return video_latents.permute(0, 2, 1, 3, 4).contiguous()
