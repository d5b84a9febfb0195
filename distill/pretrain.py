"""Plain diffusion training (the DDPM loss), to make small teachers for experiments on synthetic data.

Not part of AnimateLCM: its teachers are SD1.5 and AnimateDiff. The CPU benchmark
(benchmarks/distill_learns.py) and later small-model work train a tiny teacher with this first, so that
there is something meaningful to distil.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from . import consistency as C
from .errors import TrainingDivergedError


def diffusion_loss(model, x0: torch.Tensor, text: torch.Tensor, alphas_cumprod: torch.Tensor,
                   prediction_type: str, g: torch.Generator, min_timestep: int = 0,
                   x0_weight_cap: float = 0.0) -> torch.Tensor:
    """|| model(x_t, t) - target ||^2 with t ~ U{min_timestep..T-1}; target eps, v or x_0 per the parameterisation.

    min_timestep > 0 spends the training on high noise, where a sample's layout (and a video's track) is decided.
    x0_weight_cap > 0 weights each epsilon sample by clamp(1/SNR(t), 1, cap): the x_0 error from mid noise up.
    Plain epsilon loss weights the x_0 error by SNR(t) (~0.01 at t=800), so what only the caption can say at
    high noise (which way a clip moves) is nearly absent from its gradient.
    """
    b = x0.shape[0]
    if not 0 <= min_timestep < alphas_cumprod.numel():
        raise ValueError(f"min_timestep={min_timestep}: must be in [0, {alphas_cumprod.numel() - 1}]")
    t = torch.randint(min_timestep, alphas_cumprod.numel(), (b,), generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    x_t = C.add_noise(x0, noise, t, alphas_cumprod)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        a = C.extract(alphas_cumprod, t, x0.ndim)
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    else:
        target = x0
    if x0_weight_cap <= 0:
        return F.mse_loss(model(x_t, t, text).float(), target)
    if prediction_type != "epsilon":
        raise ValueError(f"x0_weight_cap applies to epsilon prediction, not {prediction_type!r}")
    a = C.extract(alphas_cumprod, t, 1)
    weight = ((1 - a) / a).clamp(1.0, x0_weight_cap)
    per_sample = (model(x_t, t, text).float() - target).pow(2).flatten(1).mean(1)
    return (weight * per_sample).mean()


def pretrain(model, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], alphas_cumprod: torch.Tensor, *,
             steps: int, learning_rate: float, prediction_type: str = "epsilon", seed: int = 0,
             callback: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `model`'s trainable parameters for `steps` AdamW steps on (x0, text embeddings) batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(1, steps + 1):
        x0, text = next(batches)
        loss = diffusion_loss(model, x0, text, alphas_cumprod, prediction_type, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = loss.item()
        if value != value or abs(value) == float("inf"):
            raise TrainingDivergedError(step, value, "lower the learning rate")
        losses.append(value)
        if callback is not None:
            callback(step, value)
    model.eval()
    return losses
