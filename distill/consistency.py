"""The consistency math of latent consistency distillation, in torch: the one source of truth for training.

Luo et al., "Latent Consistency Models" (arXiv 2310.04378) and Wang et al., "AnimateLCM" (arXiv 2402.00769).
Every function is small and pure; the training loop (train.py) composes them. The runtime samples the
student with lcm_edge/scheduler.py (numpy); tests/test_distill_consistency.py binds the two: the same
alphas_cumprod, boundary scalings, x_0, denoised sample, re-noised sample and timestep schedules.

Notation: alpha_t = sqrt(alphas_cumprod[t]) (signal scale), sigma_t = sqrt(1 - alphas_cumprod[t]) (noise
scale), x_t = alpha_t * x_0 + sigma_t * eps. The DDIM solver grid is t_n = k * n - 1 for n = 1..N with
k = T // N (the "skipping-step" schedule, LCM §4.3); one solver step goes from t_{n+k} := grid[i] to
t_n := grid[i] - k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lcm_edge.errors import InvalidArgumentError

SIGMA_DATA = 0.5  # consistency models' data standard deviation in the boundary condition


# ----------------------------------------------------------------------------------------------
# 1. Noise schedule


def make_alphas_cumprod(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
                        rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """alphas_cumprod (float32, CPU) exactly as diffusers' DDPMScheduler/LCMScheduler builds it."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta).
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                             dtype=torch.float32)
    else:
        raise InvalidArgumentError("beta_schedule", f"{beta_schedule!r} is not supported",
                                   "use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv 2305.08891) Algorithm 1: shift the schedule so the last step has zero signal."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


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
    """The timesteps LCM multistep sampling visits (diffusers' LCMScheduler.set_timesteps), descending."""
    origin = solver_timesteps(num_train_timesteps, original_inference_steps).flip(0)
    # np.floor(np.linspace(0, N, n, endpoint=False)) as numpy computes it: float64 i * (N / n), floored.
    step = original_inference_steps / num_inference_steps
    idx = torch.floor(torch.arange(num_inference_steps, dtype=torch.float64) * step).to(torch.int64)
    return origin[idx]


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
