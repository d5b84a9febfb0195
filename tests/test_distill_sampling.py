"""Evaluation samplers, the small-teacher pretraining loop, and the GPU smoke script's CPU refusal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lcm_edge.distill import consistency as C
from lcm_edge.distill.config import ScheduleConfig
from lcm_edge.distill.pretrain import diffusion_loss, posterior_mean_x0, pretrain, same_caption_reference
from lcm_edge.distill.sampling import guided_model, sample_ddim, sample_lcm
from lcm_edge.scheduler import LCMScheduler, SchedulerConfig

ACP = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000)
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exact_denoiser(x0: torch.Tensor, prediction_type: str):
    """The ideal model of a one-point data distribution at x0: its output implies exactly x0."""

    def fn(x, t):
        a = C.extract(ACP, t, x.ndim).double()
        eps = (x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
        if prediction_type == "epsilon":
            return eps.float()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0.double()).float()  # v

    return fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_and_lcm_samplers_recover_the_data_point_of_an_exact_denoiser(prediction_type):
    x0 = torch.randn(2, 4, 3, 4, 4)
    x_T = torch.randn_like(x0)
    fn = exact_denoiser(x0, prediction_type)
    schedule = ScheduleConfig("linear", 0.00085, 0.012, prediction_type)
    lcm = LCMScheduler(SchedulerConfig.from_dict(schedule.lcm_scheduler_config()))
    for n in (1, 4, 50):
        out = sample_ddim(fn, x_T, lcm.set_timesteps(n).tolist(), ACP, prediction_type)
        torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    rng = np.random.default_rng(0)
    for n in (1, 4):
        out = sample_lcm(fn, x_T, lcm, n, lambda i: rng.standard_normal(x0.shape).astype(np.float32))
        # c_skip(259) ~ 4e-8: the consistency output is x_0 up to a vanishing skip term.
        torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_guided_model_form():
    calls = []

    def model(x, t, text):
        calls.append(x.shape[0])
        return x + text[:, 0, 0].reshape(-1, 1, 1, 1)

    x = torch.zeros(2, 1, 1, 1)
    text, uncond = torch.full((2, 3, 4), 3.0), torch.full((1, 3, 4), 1.0)
    t = torch.tensor([5, 5])
    assert torch.equal(guided_model(model, text, None, 2.0)(x, t), torch.full((2, 1, 1, 1), 3.0))
    assert torch.equal(guided_model(model, text, uncond, 2.0)(x, t), torch.full((2, 1, 1, 1), 3.0 + 2 * (3 - 1)))
    assert calls == [2, 4]  # guidance batches cond and uncond into one call


def test_pretrain_reduces_the_diffusion_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(5, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 4, 3, padding=1))

    def model(x, t, text):  # a toy denoiser that sees the noise level
        level = (t.float() / 1000)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return net(torch.cat([x, level], 1))

    model.parameters = net.parameters
    model.train = net.train
    model.eval = net.eval
    x0 = torch.zeros(8, 4, 6, 6)
    x0[:, :, 2:4, 2:4] = 1.0

    def batches():
        while True:
            yield x0, torch.zeros(8, 1, 1)

    g = torch.Generator().manual_seed(1)
    before = np.mean([diffusion_loss(model, x0, None, ACP, "epsilon", g).item() for _ in range(20)])
    pretrain(model, batches(), ACP, steps=150, learning_rate=3e-3)
    after = np.mean([diffusion_loss(model, x0, None, ACP, "epsilon", g).item() for _ in range(20)])
    assert after < 0.7 * before


def test_diffusion_loss_timestep_floor_and_x0_weighting():
    seen = []

    def model(x, t, text):
        seen.append(t)
        return torch.zeros_like(x)  # predicts no noise: the per-sample loss is the noise's mean square

    x0 = torch.zeros(64, 2, 3, 3)
    plain = diffusion_loss(model, x0, None, ACP, "epsilon", torch.Generator().manual_seed(0), min_timestep=900)
    assert int(seen[-1].min()) >= 900
    weighted = diffusion_loss(model, x0, None, ACP, "epsilon", torch.Generator().manual_seed(0), min_timestep=900,
                              x0_weight_cap=20.0)
    snr = ACP[seen[-1]] / (1 - ACP[seen[-1]])
    assert (1 / snr).min() > 20  # at t >= 900 every weight is the cap
    assert torch.isclose(weighted, 20 * plain, rtol=1e-5)
    with pytest.raises(ValueError, match="min_timestep"):
        diffusion_loss(model, x0, None, ACP, "epsilon", torch.Generator(), min_timestep=len(ACP))
    with pytest.raises(ValueError, match="epsilon"):
        diffusion_loss(model, x0, None, ACP, "v_prediction", torch.Generator(), x0_weight_cap=5.0)


def test_diffusion_loss_high_noise_share_keeps_the_rest_on_every_timestep():
    seen = []

    def model(x, t, text):
        seen.append(t)
        return torch.zeros_like(x)

    x0 = torch.zeros(64, 2, 3, 3)
    whole = diffusion_loss(model, x0, None, ACP, "epsilon", torch.Generator().manual_seed(0), min_timestep=990)
    share_one = diffusion_loss(model, x0, None, ACP, "epsilon", torch.Generator().manual_seed(0), min_timestep=990,
                               high_noise_share=1.0)
    assert torch.equal(seen[0], seen[1]) and torch.equal(whole, share_one)  # 1.0 is the plain floor, draw for draw
    diffusion_loss(model, x0, None, ACP, "epsilon", torch.Generator().manual_seed(0), min_timestep=990,
                   high_noise_share=0.25)
    head, rest = seen[-1][:16], seen[-1][16:]
    assert int(head.min()) >= 990
    assert int(rest.min()) < 500 and int(rest.max()) >= 500  # the rest spans the schedule
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="high_noise_share"):
            diffusion_loss(model, x0, None, ACP, "epsilon", torch.Generator(), min_timestep=990,
                           high_noise_share=bad)


def test_posterior_mean_over_reference_clips():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 5, 3, 4, 4, generator=g)  # 2 samples, 5 reference clips each
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    noise = torch.randn(2, 3, 4, 4, generator=g)
    # Pure noise (alpha_bar 0): every real reference clip is equally likely, so the caption's mean clip.
    at_zero = posterior_mean_x0(noise, torch.zeros(2, 1, 1, 1), reference, mask)
    assert torch.allclose(at_zero[0], reference[0].mean(0), atol=1e-6)
    assert torch.allclose(at_zero[1], reference[1, :3].mean(0), atol=1e-6)
    # Little noise: the clip x_t came from (the first) and nothing else.
    a = torch.full((2, 1, 1, 1), 0.999)
    x_t = a.sqrt() * reference[:, 0] + (1 - a).sqrt() * noise
    assert torch.allclose(posterior_mean_x0(x_t, a, reference, mask), reference[:, 0], atol=1e-5)
    # In between: Bayes' rule over the clips, written out.
    a = torch.tensor(0.02)
    x_t = a.sqrt() * reference[:, 1] + (1 - a).sqrt() * noise
    log_p = torch.stack([-(x_t - a.sqrt() * reference[:, r]).pow(2).flatten(1).sum(1) / (2 * (1 - a))
                         for r in range(5)], 1).masked_fill(~mask, float("-inf"))
    expected = torch.einsum("br,br...->b...", torch.softmax(log_p, 1), reference)
    assert torch.allclose(posterior_mean_x0(x_t, a, reference, mask), expected, atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        posterior_mean_x0(x_t, a, reference[:, :, :2], mask)
    with pytest.raises(ValueError, match="reference_mask"):
        posterior_mean_x0(x_t, a, reference, torch.zeros(2, 5, dtype=torch.bool))


def test_same_caption_reference_and_the_stable_target():
    index, mask = same_caption_reference(["a", "b", "a", "a"])
    assert index.tolist() == [[0, 2, 3], [1, 1, 1], [2, 0, 3], [3, 0, 2]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [True] * 3, [True] * 3]
    seen = []

    def model(x, t, text):
        seen.append(t)
        return torch.zeros_like(x)

    x0 = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    # Each sample its own only reference: the plain loss, draw for draw.
    for prediction_type in ("epsilon", "v_prediction"):
        plain = diffusion_loss(model, x0, None, ACP, prediction_type, torch.Generator().manual_seed(0))
        alone = diffusion_loss(model, x0, None, ACP, prediction_type, torch.Generator().manual_seed(0),
                               reference=x0[:, None], reference_mask=torch.ones(4, 1, dtype=torch.bool))
        assert torch.isclose(plain, alone, rtol=1e-5)
    # At pure noise (zero terminal SNR, t = 999) the x_0 target is the group's mean, whichever clip was drawn.
    zero_snr = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000, True)
    captured = []

    def x0_model(x, t, text):
        out = torch.zeros_like(x, requires_grad=True)
        captured.append(out)
        return out

    loss = diffusion_loss(x0_model, x0, None, zero_snr, "sample", torch.Generator().manual_seed(0),
                          min_timestep=999, reference=x0[index], reference_mask=mask)
    loss.backward()  # d loss / d out = 2 (out - target) / n, out = 0: the target, read off the gradient
    target = -captured[0].grad * x0.numel() / 2
    assert torch.allclose(target[0], x0[[0, 2, 3]].mean(0), atol=1e-5)
    assert torch.allclose(target[1], x0[1], atol=1e-5)


def test_gpu_smoke_script_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the refusal path cannot be exercised here")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "distill_gpu_smoke.py")],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2
    assert "needs a CUDA GPU" in run.stderr and "Fix:" in run.stderr
