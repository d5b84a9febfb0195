"""Parity: the torch consistency math of training (distill/consistency.py) against the runtime's numpy
LCM scheduler (lcm_edge/scheduler.py) and, for the schedule they share, diffusers; plus the losses and the EMA
update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm_edge.distill import consistency as C
from lcm_edge.distill.config import ScheduleConfig
from lcm_edge.scheduler import LCMScheduler, SchedulerConfig

SCHEDULES = [
    ("linear", 0.00085, 0.012, False),  # AnimateLCM / AnimateDiff
    ("scaled_linear", 0.00085, 0.012, False),  # SD1.5
    ("squaredcos_cap_v2", 0.0001, 0.02, False),
    ("scaled_linear", 0.00085, 0.012, True),  # zero terminal SNR (v-prediction models)
]


def numpy_scheduler(beta_schedule, beta_start, beta_end, zero_snr=False, prediction_type="epsilon", ots=50):
    schedule = ScheduleConfig(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                              prediction_type=prediction_type, num_ddim_timesteps=ots,
                              rescale_betas_zero_snr=zero_snr)
    return LCMScheduler(SchedulerConfig.from_dict(schedule.lcm_scheduler_config()))


def diffusers_scheduler(beta_schedule, beta_start, beta_end, zero_snr=False, ots=50):
    from diffusers import LCMScheduler as DiffusersLCM

    return DiffusersLCM(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                        rescale_betas_zero_snr=zero_snr, original_inference_steps=ots)


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end,zero_snr", SCHEDULES)
def test_training_alphas_cumprod_are_diffusers(beta_schedule, beta_start, beta_end, zero_snr):
    ours = C.make_alphas_cumprod(beta_schedule, beta_start, beta_end, 1000, zero_snr)
    theirs = diffusers_scheduler(beta_schedule, beta_start, beta_end, zero_snr).alphas_cumprod.numpy()
    assert ours.dtype == torch.float32
    if zero_snr:
        # Ours takes a correctly rounded sqrt, torch's CPU sqrt is not always; the zero-SNR rescale's cancellation
        # turns that one ulp into ~1e-6 relative (lcm_edge/scheduler.py, _sqrt).
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=2e-5, atol=1e-9)
    else:
        np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("ots", [50, 100, 25, 10])
def test_solver_grid_and_inference_timesteps_are_diffusers(ots):
    theirs = diffusers_scheduler("linear", 0.00085, 0.012, ots=ots)
    # The solver grid is the sampler's lcm_origin_timesteps: all of them when n = ots.
    theirs.set_timesteps(ots)
    np.testing.assert_array_equal(C.solver_timesteps(1000, ots).numpy()[::-1], theirs.timesteps.numpy())
    for n in range(1, ots + 1):
        theirs.set_timesteps(n)
        np.testing.assert_array_equal(C.lcm_inference_timesteps(n, 1000, ots).numpy(), theirs.timesteps.numpy(),
                                      err_msg=f"n={n}, ots={ots}")
    # Pinned from docs/animatelcm.md.
    if ots == 50:
        assert C.lcm_inference_timesteps(4, 1000, 50).tolist() == [999, 759, 499, 259]
    if ots == 100:
        assert C.lcm_inference_timesteps(4, 1000, 100).tolist() == [999, 749, 499, 249]


def test_solver_step_skips_k_and_clamps_at_zero():
    start, end = C.grid_solver_step(torch.tensor([0, 1, 49]), C.solver_timesteps(1000, 50))
    assert start.tolist() == [19, 39, 999]
    assert end.tolist() == [0, 19, 979]


def test_two_level_grid_refines_below_the_boundary_and_keeps_the_sampler_timesteps():
    grid = C.two_level_solver_timesteps(1000, 10, 50, 500)
    assert grid.tolist() == list(range(19, 500, 20)) + [599, 699, 799, 899, 999]
    # Every timestep the LCM sampler of original_inference_steps 10 visits is a trained grid point.
    for n in range(1, 11):
        assert set(C.lcm_inference_timesteps(n, 1000, 10).tolist()) <= set(grid.tolist())
    start, end = C.grid_solver_step(torch.tensor([0, 1, 24, 25, 29]), grid)
    assert start.tolist() == [19, 39, 499, 599, 999] and end.tolist() == [0, 19, 479, 499, 899]


def test_uniform_grid_steps_and_draws_are_as_before():
    """grid_solver_step / draw_solver_steps on a uniform grid: LCM's skip-k step (t_n = t_{n+k} - k, clamped at 0)
    and uniform draw, with the same random numbers."""
    grid = C.solver_timesteps(1000, 50)
    index = C.draw_solver_steps(grid, 64, torch.Generator().manual_seed(3))
    assert torch.equal(index, torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(3)))
    start, end = C.grid_solver_step(index, grid)
    assert torch.equal(start, grid[index]) and torch.equal(end, (start - 20).clamp(min=0))


def test_two_level_draws_weight_each_step_by_the_timesteps_it_spans():
    grid = C.two_level_solver_timesteps(1000, 10, 50, 200)  # 10 fine steps of 20 below 200, 8 of 100 above
    start, _ = C.grid_solver_step(C.draw_solver_steps(grid, 40_000, torch.Generator().manual_seed(0)), grid)
    # Uniform in timesteps: 0.2 of the draws below 200 (uniform over grid points would give 10/18 = 0.56).
    assert abs((start < 200).double().mean().item() - 0.2) < 0.01
    assert abs((start == 999).double().mean().item() - 0.1) < 0.01


def test_boundary_scalings_match_numpy_and_satisfy_boundary_condition():
    np_sched = numpy_scheduler("linear", 0.00085, 0.012)
    t = torch.arange(1000)
    c_skip, c_out = C.boundary_condition_scalings(t, 10.0)
    ref = np.array([np_sched.boundary_condition_scalings(int(i)) for i in range(1000)], dtype=np.float32)
    np.testing.assert_allclose(c_skip.numpy(), ref[:, 0], rtol=0, atol=0)
    np.testing.assert_allclose(c_out.numpy(), ref[:, 1], rtol=2e-7, atol=0)  # sqrt: <= 1 ulp
    assert c_skip[0] == 1.0 and c_out[0] == 0.0  # f(x, 0) = x
    # The facts' closed form with s = 10 t.
    s = 10.0 * 999
    assert c_skip[999].item() == pytest.approx(0.25 / (s * s + 0.25), rel=1e-6)
    assert c_out[999].item() == pytest.approx(s / (s * s + 0.25) ** 0.5, rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_denoised_and_renoised_sample_match_numpy_step(prediction_type, beta_schedule):
    """The consistency function (training target and student output) equals the sampler's `denoised`,
    and the re-noising equals its `prev_sample`, for every step of a 4- and an 8-step schedule."""
    np_sched = numpy_scheduler(beta_schedule, 0.00085, 0.012, prediction_type=prediction_type)
    acp = C.make_alphas_cumprod(beta_schedule, 0.00085, 0.012, 1000)
    rng = np.random.default_rng(0)
    worst = 0.0
    for n in (4, 8):
        timesteps = np_sched.set_timesteps(n)
        for i, t in enumerate(timesteps):
            shape = (2, 4, 3, 8, 8)  # a video batch: (b, c, f, h, w)
            sample = rng.standard_normal(shape).astype(np.float32)
            model_output = rng.standard_normal(shape).astype(np.float32)
            noise = rng.standard_normal(shape).astype(np.float32)
            ref = np_sched.step(model_output, i, sample, noise)

            tt = torch.full((2,), int(t))
            denoised = C.consistency_function(torch.from_numpy(model_output), torch.from_numpy(sample), tt, acp,
                                              prediction_type, 10.0)
            np.testing.assert_allclose(denoised.numpy(), ref.denoised, rtol=1e-5, atol=1e-5)
            worst = max(worst, _rel(denoised.numpy(), ref.denoised))
            if i + 1 < len(timesteps):
                a_prev = C.extract(acp, torch.full((2,), int(timesteps[i + 1])), 5)
                prev = C.lcm_renoise(denoised, a_prev, torch.from_numpy(noise))
                np.testing.assert_allclose(prev.numpy(), ref.prev_sample, rtol=1e-5, atol=1e-5)
                worst = max(worst, _rel(prev.numpy(), ref.prev_sample))
            else:
                np.testing.assert_array_equal(ref.prev_sample, ref.denoised)
    print(f"max |torch - numpy| / max |numpy| over denoised/prev_sample ({prediction_type}, {beta_schedule}): "
          f"{worst:.3g}")
    assert worst < 1e-6


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_add_noise_matches_numpy_scheduler():
    np_sched = numpy_scheduler("linear", 0.00085, 0.012)
    acp = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    for t in (0, 19, 499, 999):
        ours = C.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.tensor([t]), acp).numpy()
        np.testing.assert_allclose(ours, np_sched.add_noise(x0, eps, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_and_eps_parameterisations_are_consistent(prediction_type):
    """x_t = alpha x_0 + sigma eps must hold for the (x_0, eps) pair any parameterisation implies: the
    DDIM solver step relies on it."""
    acp = C.make_alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000)
    t = torch.tensor([10, 500, 990])
    a = C.extract(acp, t, 4).double()
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    x_t = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    out = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    x0 = C.predicted_original_sample(out, x_t, alpha, sigma, prediction_type)
    eps = C.predicted_noise(out, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x_t)
    # DDIM to the same timestep is the identity.
    torch.testing.assert_close(C.ddim_step(x0, eps, a), x_t)


def test_ddim_step_recovers_the_trajectory_of_an_exact_denoiser():
    """With the exact (x_0, eps), one DDIM step lands on alpha' x_0 + sigma' eps: the PF-ODE solution."""
    acp = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000).double()
    x0, eps = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    a_prev = C.extract(acp, torch.tensor([479, 19]), 4)
    torch.testing.assert_close(C.ddim_step(x0, eps, a_prev), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)


def test_guidance_form():
    cond, uncond, w = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([7.0])
    assert C.guided(cond, uncond, w).item() == pytest.approx((1 + 7) * 2 - 7 * 1)


def test_huber_loss_values():
    pred = torch.tensor([0.0, 3.0])
    target = torch.tensor([0.0, -1.0])
    c = 0.001
    expected = ((0.0) + ((16 + c * c) ** 0.5 - c)) / 2
    assert C.huber_loss(pred, target, c).item() == pytest.approx(expected, rel=1e-6)
    # Quadratic near zero (~ d^2 / 2c), linear far away, and never negative.
    small = C.huber_loss(torch.tensor([1e-4]), torch.tensor([0.0]), c).item()
    assert small == pytest.approx((1e-8 + 1e-6) ** 0.5 - 1e-3, rel=1e-3)
    assert C.huber_loss(torch.randn(100), torch.randn(100), c).item() > 0
    with pytest.raises(ValueError, match="loss_type"):
        C.consistency_loss(pred, target, "l1", c)


def test_ema_update_rate_and_fixed_point():
    target = [torch.zeros(5), torch.full((3,), 2.0)]
    online = [torch.ones(5), torch.full((3,), 2.0)]
    for _ in range(10):
        C.ema_update_(target, online, 0.9)
    torch.testing.assert_close(target[0], torch.full((5,), 1 - 0.9**10))
    assert torch.equal(target[1], online[1])  # equal entries stay bit-identical


def test_unknown_prediction_type_and_schedule_are_typed_errors():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        C.predicted_original_sample(x, x, x, x, "x0")
    with pytest.raises(ValueError, match="beta_schedule"):
        C.make_alphas_cumprod("cosine", 0.1, 0.2, 10)
