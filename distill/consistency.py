"""The consistency math of latent consistency distillation in torch, where training needs it on batches.

Luo et al., "Latent Consistency Models" (arXiv 2310.04378) and Wang et al., "AnimateLCM" (arXiv 2402.00769).
Every function is small and pure; the training loop (train.py) composes them. The noise schedule itself
(alphas_cumprod, LCM's sampling timesteps) comes from the runtime's scheduler (lcm_edge/scheduler.py, numpy),
which samples the student; tests/test_distill_consistency.py binds the batched torch steps to it: the same
boundary scalings, x_0, denoised sample and re-noised sample.

Notation: alpha_t = sqrt(alphas_cumprod[t]) (signal scale), sigma_t = sqrt(1 - alphas_cumprod[t]) (noise
scale), x_t = alpha_t * x_0 + sigma_t * eps. The DDIM solver grid is t_n = k * n - 1 for n = 1..N with
k = T // N (the "skipping-step" schedule, LCM §4.3); one solver step goes from t_{n+k} := grid[i] to
t_n := grid[i] - k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcm_edge.errors import InvalidArgumentError

SIGMA_DATA = 0.5  # consistency models' data standard deviation in the boundary condition


# ----------------------------------------------------------------------------------------------
# 1. Noise schedule


def _numpy_scheduler(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
                     rescale_betas_zero_snr: bool, original_inference_steps: int):
    """The runtime's scheduler (lcm_edge.scheduler, numpy): the one copy of the schedule math, so the student is
    trained on exactly the alphas_cumprod and timesteps it is sampled with. Nothing here needs autograd."""
    from lcm_edge.scheduler import BETA_SCHEDULES, LCMScheduler, SchedulerConfig

    if beta_schedule not in BETA_SCHEDULES:
        raise InvalidArgumentError("beta_schedule", f"{beta_schedule!r} is not supported",
                                   f"use one of {list(BETA_SCHEDULES)}")
    return LCMScheduler(SchedulerConfig.from_dict({
        "num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
        "beta_schedule": beta_schedule, "original_inference_steps": original_inference_steps,
        "prediction_type": "epsilon", "timestep_scaling": 10.0, "rescale_betas_zero_snr": rescale_betas_zero_snr,
    }, source="distill schedule"))


def make_alphas_cumprod(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
                        rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """alphas_cumprod (float32, CPU) as the runtime's scheduler (and diffusers' LCMScheduler) builds it."""
    scheduler = _numpy_scheduler(beta_schedule, beta_start, beta_end, num_train_timesteps, rescale_betas_zero_snr,
                                 num_train_timesteps)
    return torch.from_numpy(scheduler.alphas_cumprod.copy())


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """(b,) -> (b, 1, ..., 1) so per-sample scalars broadcast over image (4-D) or video (5-D) latents."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def extract(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[timesteps] shaped to broadcast against an `ndim`-D batch."""
    return append_dims(values.to(timesteps.device)[timesteps], ndim)


# ----------------------------------------------------------------------------------------------
# 2. Timestep schedules


def solver_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The DDIM solver grid, ascending: k * n - 1 for n = 1..N, k = T // N (LCM §4.3).

    It is the LCM sampler's `lcm_origin_timesteps` for original_inference_steps = N.
    """
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * k - 1


def two_level_solver_timesteps(num_train_timesteps: int, num_ddim_timesteps: int, fine_ddim_timesteps: int,
                               fine_below: int) -> torch.Tensor:
    """A solver grid, ascending: the N-point grid at and above `fine_below`, the finer one below it.

    Few links from pure noise (where a video's motion is decided) with a fine solve near the data. The coarse
    points are all on the fine grid (config validation: the fine count is a multiple of N), so the LCM sampler
    of original_inference_steps N only visits trained timesteps.
    """
    coarse = solver_timesteps(num_train_timesteps, num_ddim_timesteps)
    fine = solver_timesteps(num_train_timesteps, fine_ddim_timesteps)
    return torch.cat([fine[fine < fine_below], coarse[coarse >= fine_below]])


def grid_solver_step(index: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For indices into an ascending solver grid: (t_{n+k}, t_n) = (grid[i], grid[i - 1]), the start and end of
    one skipping solver step.

    Below the first grid point t_n = 0: there the consistency function is the identity up to alphas_cumprod[0]
    (the boundary condition), as in diffusers' LCM scripts. On a uniform grid t_n = t_{n+k} - k.
    """
    previous = torch.cat([grid.new_zeros(1), grid[:-1]])
    return grid[index], previous[index]


def draw_solver_steps(grid: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
    """Grid indices of `batch` solver steps, each drawn with probability proportional to the timesteps it spans.

    A refined part of the grid so takes no training away from the coarse part. On a uniform grid every step
    spans k and this is LCM's uniform draw (the same random numbers as before two-level grids existed).
    """
    spans = torch.diff(grid, prepend=grid.new_full((1,), -1))
    if bool((spans == spans[0]).all()):
        return torch.randint(0, len(grid), (batch,), generator=g)
    return torch.multinomial(spans.double(), batch, replacement=True, generator=g)


def lcm_inference_timesteps(num_inference_steps: int, num_train_timesteps: int,
                            original_inference_steps: int) -> torch.Tensor:
    """The timesteps LCM multistep sampling visits (the runtime's LCMScheduler.set_timesteps), descending."""
    scheduler = _numpy_scheduler("linear", 0.00085, 0.012, num_train_timesteps, False, original_inference_steps)
    return torch.from_numpy(scheduler.set_timesteps(num_inference_steps).copy())


# ----------------------------------------------------------------------------------------------
# 3. Parameterisations and the consistency function


def boundary_condition_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0,
                                sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of f(x, t) = c_skip(t) x + c_out(t) F(x, t), LCM §4.1.

    With s = timestep_scaling * t: c_skip = sd^2 / (s^2 + sd^2), c_out = s / sqrt(s^2 + sd^2). At t = 0
    c_skip = 1 and c_out = 0, so f(x, 0) = x: the boundary condition of a consistency model.
    """
    s = timesteps.to(torch.float32) * timestep_scaling
    sd2 = sigma_data**2
    c_skip = sd2 / (s * s + sd2)
    c_out = s / torch.sqrt(s * s + sd2)
    return c_skip, c_out


def predicted_original_sample(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                              sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x_0 implied by the model's output at x_t (alpha, sigma broadcast against the sample)."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise InvalidArgumentError("prediction_type", f"{prediction_type!r} is not supported",
                               "use 'epsilon', 'v_prediction' or 'sample'")


def predicted_noise(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                    sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """eps implied by the model's output at x_t: the DDIM solver needs it beside x_0."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    raise InvalidArgumentError("prediction_type", f"{prediction_type!r} is not supported",
                               "use 'epsilon', 'v_prediction' or 'sample'")


def consistency_function(model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                         alphas_cumprod: torch.Tensor, prediction_type: str,
                         timestep_scaling: float = 10.0) -> torch.Tensor:
    """f_theta(x_t, t) = c_skip x_t + c_out x_0(x_t): the student's (or target's) estimate of x_0.

    The numpy scheduler's `denoised` in step(); bound to it by the parity test.
    """
    acp = extract(alphas_cumprod, timesteps, sample.ndim)
    alpha, sigma = acp.sqrt(), (1.0 - acp).sqrt()
    x0 = predicted_original_sample(model_output, sample, alpha, sigma, prediction_type)
    c_skip, c_out = boundary_condition_scalings(timesteps, timestep_scaling)
    return c_out.reshape(acp.shape) * x0 + c_skip.reshape(acp.shape) * sample


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = sqrt(acp_t) x_0 + sqrt(1 - acp_t) eps."""
    acp = extract(alphas_cumprod, timesteps, x0.ndim).to(x0.dtype)
    return acp.sqrt() * x0 + (1.0 - acp).sqrt() * noise


# ----------------------------------------------------------------------------------------------
# 4. Solvers


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_cumprod_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x_0 and eps estimates to the earlier timestep."""
    return alpha_cumprod_prev.sqrt() * x0 + (1.0 - alpha_cumprod_prev).sqrt() * eps


def lcm_renoise(denoised: torch.Tensor, alpha_cumprod_prev: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Multistep consistency sampling (LCM Algorithm 3): re-noise the x_0 estimate to the next timestep."""
    return alpha_cumprod_prev.sqrt() * denoised + (1.0 - alpha_cumprod_prev).sqrt() * noise


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in LCM's form (1 + w) cond - w uncond = cond + w (cond - uncond)."""
    return cond + w * (cond - uncond)


# ----------------------------------------------------------------------------------------------
# 5. Losses and the target network


def huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber sqrt((f - f_target)^2 + c^2) - c, mean over all elements (LCM-LoRA, c = 0.001).

    Computed in float32 whatever the autocast dtype: c^2 = 1e-6 vanishes in bf16.
    """
    diff = pred.float() - target.float()
    return torch.mean(torch.sqrt(diff * diff + c * c) - c)


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    if loss_type == "huber":
        return huber_loss(pred, target, huber_c)
    if loss_type == "l2":
        return l2_loss(pred, target)
    raise InvalidArgumentError("loss_type", f"{loss_type!r} is not supported", "use 'huber' or 'l2'")


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], online: list[torch.Tensor], decay: float) -> None:
    """target <- decay * target + (1 - decay) * online, in place.

    lerp keeps a target entry that already equals the online one bit-identical, so frozen weights shared
    by both models never drift by rounding.
    """
    for t, o in zip(target, online, strict=True):
        t.lerp_(o.to(t.dtype), 1.0 - decay)
