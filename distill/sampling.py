"""Samplers for evaluating teachers and students: deterministic DDIM (teacher, with guidance) and LCM
multistep sampling driven by the runtime's numpy scheduler (student).

Short pure functions in the k-diffusion style: a model function, starting latents, a schedule, and
injectable noise, so teacher and student can be compared from the same starting noise.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lcm_edge.scheduler import LCMScheduler

from . import consistency as C

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t (b,)) -> raw model output


def guided_model(model, text: torch.Tensor, uncond: torch.Tensor | None, w: float) -> ModelFn:
    """A teacher's model function with classifier-free guidance (1 + w) cond - w uncond (w = 0: none)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if uncond is None or w == 0:
            return model(x, t, text).float()
        b = x.shape[0]
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, uncond.expand(b, -1, -1)])).float()
        cond, unc = both.chunk(2)
        return C.guided(cond, unc, torch.tensor(w))

    return fn


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, latents: torch.Tensor, timesteps: list[int], alphas_cumprod: torch.Tensor,
                prediction_type: str) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) through `timesteps` (descending); the last step lands on x_0."""
    x = latents
    acp = alphas_cumprod.to(x.device)
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        a = C.extract(acp, tt, x.ndim)
        out = model_fn(x, tt)
        x0 = C.predicted_original_sample(out, x, a.sqrt(), (1 - a).sqrt(), prediction_type)
        if i + 1 == len(timesteps):
            return x0
        eps = C.predicted_noise(out, x, a.sqrt(), (1 - a).sqrt(), prediction_type)
        x = C.ddim_step(x0, eps, C.extract(acp, torch.full_like(tt, int(timesteps[i + 1])), x.ndim))
    return x


@torch.no_grad()
def sample_lcm(model_fn: ModelFn, latents: torch.Tensor, scheduler: LCMScheduler, num_steps: int,
               noise: Callable[[int], np.ndarray]) -> torch.Tensor:
    """LCM multistep sampling (Algorithm 3) with the runtime's numpy scheduler doing every scheduler step.

    `noise(i)` returns the standard normal re-noising draw of step i (shape of the latents, float32).
    """
    timesteps = scheduler.set_timesteps(num_steps)
    x = latents.float().cpu().numpy()
    device = latents.device
    denoised = x
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        out = model_fn(torch.from_numpy(x).to(device), tt).cpu().numpy()
        step = scheduler.step(out, i, x, noise(i) if i + 1 < len(timesteps) else None)
        x, denoised = step.prev_sample, step.denoised
    return torch.from_numpy(denoised).to(device)
