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
                   x0_weight_cap: float = 0.0, reference: torch.Tensor | None = None,
                   reference_mask: torch.Tensor | None = None, high_noise_share: float = 1.0) -> torch.Tensor:
    """|| model(x_t, t) - target ||^2 with t ~ U{min_timestep..T-1}; target eps, v or x_0 per the parameterisation.

    min_timestep > 0 spends the training on high noise, where a sample's layout (and a video's track) is decided.
    high_noise_share < 1 keeps the rest of the batch on every t (the first round(share * B) samples get
    t >= min_timestep): weights shared by all noise levels learn the high end without forgetting the rest.
    x0_weight_cap > 0 weights each epsilon sample by clamp(1/SNR(t), 1, cap): the x_0 error from mid noise up.
    Plain epsilon loss weights the x_0 error by SNR(t) (~0.01 at t=800), so what only the caption can say at
    high noise (which way a clip moves) is nearly absent from its gradient.

    reference (B, R, *x0.shape[1:]), with reference_mask (B, R) marking the real entries: for each sample, clips
    that share its caption, itself among them. The target is then built from the posterior mean of x_0 over them
    (posterior_mean_x0) instead of from x0: Stable Target Field (Xu et al. 2023). Where the noise hides the clip
    that is the caption's mean clip, not one random clip of it, so what the caption decides (which way the clip
    goes) is no longer buried under clip-to-clip spread; where the clip shows, it is the clip itself.
    """
    b = x0.shape[0]
    if not 0 <= min_timestep < alphas_cumprod.numel():
        raise ValueError(f"min_timestep={min_timestep}: must be in [0, {alphas_cumprod.numel() - 1}]")
    if not 0.0 < high_noise_share <= 1.0:
        raise ValueError(f"high_noise_share={high_noise_share}: must be in (0, 1]")
    t = torch.randint(min_timestep, alphas_cumprod.numel(), (b,), generator=g)
    if high_noise_share < 1.0:
        anywhere = torch.randint(0, alphas_cumprod.numel(), (b,), generator=g)
        t = torch.where(torch.arange(b) < round(high_noise_share * b), t, anywhere)
    t = t.to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    x_t = C.add_noise(x0, noise, t, alphas_cumprod)
    a = C.extract(alphas_cumprod, t, x0.ndim)
    if reference is not None:
        x0 = posterior_mean_x0(x_t, a, reference, reference_mask)
        noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()  # the noise that takes this x_0 to x_t
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    else:
        target = x0
    if x0_weight_cap <= 0:
        return F.mse_loss(model(x_t, t, text).float(), target)
    if prediction_type != "epsilon":
        raise ValueError(f"x0_weight_cap applies to epsilon prediction, not {prediction_type!r}")
    weight = ((1 - a.flatten()) / a.flatten()).clamp(1.0, x0_weight_cap)
    per_sample = (model(x_t, t, text).float() - target).pow(2).flatten(1).mean(1)
    return (weight * per_sample).mean()


def posterior_mean_x0(x_t: torch.Tensor, a: torch.Tensor, reference: torch.Tensor,
                      reference_mask: torch.Tensor | None = None) -> torch.Tensor:
    """E[x_0 | x_t] when x_0 is one of each sample's reference clips, all equally likely beforehand.

    x_t (B, ...), a = alpha_bar(t) broadcastable to x_t, reference (B, R, ...), reference_mask (B, R) bool
    (None: every entry real). Weights are p(x_t | x_0 = r) = N(sqrt(a) r, 1 - a), normalised per sample: the
    Bayes-optimal denoiser over the reference set (uniform weights at zero SNR, the nearest clip at low noise).
    """
    if reference.shape[0] != x_t.shape[0] or reference.shape[2:] != x_t.shape[1:]:
        raise ValueError(f"reference {tuple(reference.shape)} does not match x_t {tuple(x_t.shape)}: "
                         "give (B, R, *x_t.shape[1:])")
    a = a.reshape(-1, 1).expand(x_t.shape[0], 1)  # (B, 1)
    scale = a.sqrt().reshape(-1, 1, *([1] * (reference.ndim - 2)))
    distance = (x_t[:, None] - scale * reference).pow(2).flatten(2).sum(-1)  # (B, R)
    log_weight = -distance / (2 * (1 - a))
    if reference_mask is not None:
        if reference_mask.shape != reference.shape[:2] or not bool(reference_mask.any(1).all()):
            raise ValueError("reference_mask must be (B, R) with at least one True per sample")
        log_weight = log_weight.masked_fill(~reference_mask, float("-inf"))
    weight = torch.softmax(log_weight.float(), dim=1).to(reference.dtype)
    return torch.einsum("br,br...->b...", weight, reference)


def same_caption_reference(captions: list) -> tuple[torch.Tensor, torch.Tensor]:
    """For diffusion_loss's reference: (N, R) indices of the samples sharing each sample's caption (itself
    first), padded with itself, and the (N, R) mask of the real ones. R = the largest group."""
    groups: dict = {}
    for i, caption in enumerate(captions):
        groups.setdefault(caption, []).append(i)
    width = max(len(g) for g in groups.values())
    index = torch.zeros(len(captions), width, dtype=torch.long)
    mask = torch.zeros(len(captions), width, dtype=torch.bool)
    for i, caption in enumerate(captions):
        row = [i] + [j for j in groups[caption] if j != i]
        index[i] = torch.tensor(row + [i] * (width - len(row)))
        mask[i, :len(row)] = True
    return index, mask


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
