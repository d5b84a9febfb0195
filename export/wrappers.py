"""Explicit export modules around diffusers/transformers models: one positional signature
per graph, plain tensors out. Never monkey-patch a model's forward."""

from __future__ import annotations

import torch
from torch import nn


class TextEncoderWrapper(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, return_dict=True).last_hidden_state


class UNetWrapper(nn.Module):
    """UNetMotionModel with text embeddings per video, not per frame.

    diffusers' pipeline repeats the prompt embedding for every frame before the UNet; doing
    it inside the graph (expand + reshape, traceable with a dynamic frame axis) keeps the
    runtime's input (batch, tokens, hidden) and avoids copying it `frames` times in numpy.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        batch, frames = sample.shape[0], sample.shape[2]
        tokens, hidden = encoder_hidden_states.shape[1], encoder_hidden_states.shape[2]
        per_frame = encoder_hidden_states[:, None].expand(batch, frames, tokens, hidden)
        per_frame = per_frame.reshape(batch * frames, tokens, hidden)
        return self.unet(sample, timestep, encoder_hidden_states=per_frame, return_dict=True).sample


class VaeDecoderWrapper(nn.Module):
    """Latents already divided by the scaling factor in, images in [-1, 1] out."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=True).sample
