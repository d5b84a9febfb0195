"""lcm_edge.scheduler against diffusers' LCMScheduler (the PyTorch reference).

Parity metric for step outputs: max|ours - diffusers| / max|diffusers| over the whole array,
per output (prev_sample, denoised) per step. Run with -s to see the worst figures.
"""

from __future__ import annotations

import ast
import inspect
import json
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

# The bit-exact reference: torch and diffusers are in the dev install ([dev] pulls [export]), and a missing one
# fails collection here rather than skipping the parity tests unseen.
import torch  # noqa: E402
from diffusers import LCMScheduler as DiffusersLCMScheduler  # noqa: E402

import lcm_edge.scheduler as scheduler_module  # noqa: E402
from lcm_edge.errors import BundleFormatError, InvalidArgumentError  # noqa: E402
from lcm_edge.scheduler import LCMScheduler, LCMStepOutput, SchedulerConfig, _fma_f32  # noqa: E402

SCHEDULER_RTOL = 1e-6  # max|ours - diffusers| / max|diffusers|, each output, each step
ALPHAS_RTOL = 1e-7  # elementwise relative, alphas_cumprod
SHAPE = (1, 4, 3, 8, 8)  # (batch, channels, frames, height, width) video latents

SCHEDULES = ("linear", "scaled_linear")
ORIGINAL_STEPS = (10, 50, 100)
STEPS = (1, 2, 4, 8)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
CUSTOM_TIMESTEPS = ([999, 500, 100], [899, 599, 299, 99])

# torch.linspace (the linear/scaled_linear betas) is a scalar loop that PyTorch's AVX2/AVX-512 kernels
# compile into fused multiply-adds, and lcm_edge mirrors that. The "DEFAULT" kernels (CPUs without
# AVX2, or ATEN_CPU_CAPABILITY=default) round twice, which moves alphas_cumprod by up to ~1.2e-7.
TORCH_LINSPACE_FUSED = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
needs_fused_linspace = pytest.mark.skipif(
    not TORCH_LINSPACE_FUSED, reason="torch's DEFAULT CPU kernels compute linspace without FMA"
)

WORST: dict[str, float] = {}


def _record(key: str, value: float) -> None:
    WORST[key] = max(WORST.get(key, 0.0), value)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    if WORST:
        print("\nscheduler vs diffusers, worst max|ours - diffusers| / max|diffusers|:")
        for key in sorted(WORST):
            print(f"  {key:<40} {WORST[key]:.3e}")


def diffusers_config(**overrides) -> dict:
    """Every schedule parameter stated; the rest left to diffusers' defaults."""
    config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "prediction_type": "epsilon",
        "timestep_scaling": 10.0,
    }
    config.update(overrides)
    return config


def make_pair(**overrides) -> tuple[LCMScheduler, DiffusersLCMScheduler]:
    theirs = DiffusersLCMScheduler(**diffusers_config(**overrides))
    ours = LCMScheduler(SchedulerConfig.from_dict(dict(theirs.config)))
    return ours, theirs


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a64 - b64)) / max(float(np.max(np.abs(b64))), 1e-30))


def run_both(ours, theirs, *, num_inference_steps=None, timesteps=None, seed=0, int_timesteps=False) -> float:
    """Sample with both schedulers on the same model outputs and the same noise; return the worst error."""
    if timesteps is None:
        schedule = ours.set_timesteps(num_inference_steps)
        theirs.set_timesteps(num_inference_steps)
    else:
        schedule = ours.set_timesteps(timesteps=timesteps)
        theirs.set_timesteps(timesteps=timesteps)
    np.testing.assert_array_equal(schedule, theirs.timesteps.numpy())

    rng = np.random.default_rng(seed)
    start = rng.standard_normal(SHAPE, dtype=np.float32)
    model_outputs = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in schedule]
    # diffusers draws torch.randn(shape, generator=g) once per non-final step: replay that stream.
    replay = torch.Generator().manual_seed(seed)
    noises = [torch.randn(SHAPE, generator=replay, dtype=torch.float32).numpy() for _ in schedule[:-1]]
    generator = torch.Generator().manual_seed(seed)

    x_ours, x_theirs = start, torch.from_numpy(start.copy())
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        noise = noises[i] if i < len(noises) else None
        out = ours.step(model_outputs[i], i, x_ours, noise)
        # Pipelines pass the schedule's own 0-d tensor; int_timesteps tries a plain Python int.
        ref = theirs.step(
            torch.from_numpy(model_outputs[i]), int(t) if int_timesteps else t, x_theirs, generator=generator
        )
        assert isinstance(out, LCMStepOutput)
        for name in ("prev_sample", "denoised"):
            a, b = getattr(out, name), getattr(ref, name).numpy()
            assert a.dtype == np.float32 and a.shape == SHAPE
            err = rel_err(a, b)
            assert err <= SCHEDULER_RTOL, f"step {i} (t={int(t)}) {name}: relative error {err:.3e}"
            worst = max(worst, err)
        x_ours, x_theirs = out.prev_sample, ref.prev_sample
    np.testing.assert_array_equal(out.prev_sample, out.denoised)  # the last step returns the estimate
    return worst


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


# ---------------------------------------------------------------------------------------------
# timesteps


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("ots", ORIGINAL_STEPS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_timesteps_match_diffusers(schedule, ots, steps):
    ours, theirs = make_pair(beta_schedule=schedule, original_inference_steps=ots)
    got = ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, theirs.timesteps.numpy())
    assert ours.timesteps is got and ours.num_inference_steps == steps


@pytest.mark.parametrize(
    "ots, expected", [(10, [999, 799, 499, 299]), (50, [999, 759, 499, 259]), (100, [999, 749, 499, 249])]
)
def test_known_timesteps(ots, expected):
    ours, _ = make_pair(original_inference_steps=ots)
    assert ours.set_timesteps(4).tolist() == expected


def test_original_inference_steps_override():
    ours, theirs = make_pair(original_inference_steps=50)
    got = ours.set_timesteps(4, original_inference_steps=100)
    theirs.set_timesteps(4, original_inference_steps=100)
    np.testing.assert_array_equal(got, theirs.timesteps.numpy())
    assert got.tolist() == [999, 749, 499, 249]


# ---------------------------------------------------------------------------------------------
# noise schedule


@pytest.mark.parametrize(
    "overrides",
    [
        {"beta_schedule": "linear"},
        {"beta_schedule": "scaled_linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"trained_betas": np.linspace(0.0001, 0.02, 1000).tolist()},
    ],
    ids=["linear", "scaled_linear", "squaredcos_cap_v2", "linear_ddpm", "trained_betas"],
)
def test_alphas_cumprod_match_diffusers(overrides):
    ours, theirs = make_pair(**overrides)
    assert ours.alphas_cumprod.dtype == np.float32
    rtol = ALPHAS_RTOL if TORCH_LINSPACE_FUSED else 2.5e-7
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=rtol, atol=0)
    assert ours.init_noise_sigma == 1.0
    assert ours.final_alpha_cumprod == np.float32(1.0)


def torch_sqrt(x):
    """torch's CPU float32 sqrt (MKL VML: within one ulp, not correctly rounded), for bit-exact checks."""
    arr = np.asarray(x)
    out = torch.from_numpy(arr.reshape(-1).copy()).sqrt().numpy().reshape(arr.shape)
    return out[()] if out.ndim == 0 else out


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_rescaled_zero_snr(schedule, monkeypatch):
    """Zero-terminal-SNR rescaling computes sqrt(alphas_cumprod) - (its last value), squares it and
    rebuilds the betas, so one-ulp differences in sqrt grow: np.sqrt is correctly rounded, torch's CPU
    sqrt is not. With torch's sqrt swapped in the arrays are bit-identical; with IEEE sqrt the measured
    gap is ~3.6e-7 of the max and ~3.8e-6 elementwise near t=999, so the 1e-7 gate cannot apply there.
    """
    ours, theirs = make_pair(beta_schedule=schedule, rescale_betas_zero_snr=True)
    got, ref = ours.alphas_cumprod, theirs.alphas_cumprod.numpy()
    assert got.dtype == np.float32 and got[-1] == 0.0 == ref[-1]
    _record(f"alphas_cumprod zero-SNR {schedule}", rel_err(got, ref))
    assert rel_err(got, ref) <= SCHEDULER_RTOL
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)

    if TORCH_LINSPACE_FUSED:
        monkeypatch.setattr(scheduler_module, "_sqrt", torch_sqrt)
        ours, _ = make_pair(beta_schedule=schedule, rescale_betas_zero_snr=True)
        np.testing.assert_array_equal(ours.alphas_cumprod, ref)


# ---------------------------------------------------------------------------------------------
# full trajectories


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("ots", ORIGINAL_STEPS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_trajectory_matches_diffusers(schedule, ots, steps, prediction_type):
    ours, theirs = make_pair(beta_schedule=schedule, original_inference_steps=ots, prediction_type=prediction_type)
    worst = run_both(ours, theirs, num_inference_steps=steps, seed=_seed(schedule, ots, steps, prediction_type))
    _record(prediction_type, worst)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("timesteps", CUSTOM_TIMESTEPS, ids=lambda ts: "-".join(map(str, ts)))
def test_custom_timesteps_trajectory_matches_diffusers(timesteps, prediction_type):
    ours, theirs = make_pair(prediction_type=prediction_type)
    worst = run_both(ours, theirs, timesteps=timesteps, seed=_seed(timesteps, prediction_type))
    _record(prediction_type, worst)


@pytest.mark.parametrize(
    "overrides",
    [
        {"clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "epsilon"},
        {"clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "sample"},
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
        {"set_alpha_to_one": False, "timestep_scaling": 5.0, "prediction_type": "epsilon"},
    ],
    ids=["clip-epsilon", "clip-sample", "cosine-v", "alpha0-scaling5"],
)
def test_other_configs_trajectory_match_diffusers(overrides):
    ours, theirs = make_pair(**overrides)
    worst = run_both(ours, theirs, num_inference_steps=4, seed=_seed(sorted(overrides.items())))
    _record(overrides["prediction_type"], worst)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_trajectory_matches_diffusers_with_int_timesteps(prediction_type):
    """diffusers rounds c_skip/c_out from float64 when handed a Python int; still within tolerance."""
    ours, theirs = make_pair(beta_schedule="linear", original_inference_steps=100, prediction_type=prediction_type)
    worst = run_both(ours, theirs, num_inference_steps=8, seed=_seed("int", prediction_type), int_timesteps=True)
    _record(f"{prediction_type} (diffusers given int t)", worst)


@pytest.mark.parametrize(
    "overrides",
    [
        {"beta_schedule": "linear", "original_inference_steps": 100, "prediction_type": "epsilon"},
        {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"},
        {"beta_schedule": "linear", "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5},
        {"clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "epsilon"},
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    ],
    ids=["linear-epsilon", "scaled-v", "linear-sample-clip", "clip-epsilon", "zero-snr-v"],
)
@needs_fused_linspace
def test_trajectory_bit_exact_with_torch_sqrt(overrides, monkeypatch):
    """Every remaining difference is sqrt rounding: with torch's sqrt the outputs are bit-identical."""
    monkeypatch.setattr(scheduler_module, "_sqrt", torch_sqrt)
    ours, theirs = make_pair(**overrides)
    assert run_both(ours, theirs, num_inference_steps=4, seed=_seed("exact", sorted(overrides.items()))) == 0.0


def test_noise_is_ignored_on_the_last_step():
    ours, _ = make_pair()
    ours.set_timesteps(2)
    rng = np.random.default_rng(0)
    out, x = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    a = ours.step(out, 1, x, None)
    b = ours.step(out, 1, x, rng.standard_normal(SHAPE, dtype=np.float32))
    np.testing.assert_array_equal(a.prev_sample, b.prev_sample)
    np.testing.assert_array_equal(a.prev_sample, a.denoised)


def test_boundary_condition_scalings_match_diffusers():
    ours, theirs = make_pair()
    ts = torch.arange(1000)
    ref = [theirs.get_scalings_for_boundary_condition_discrete(t) for t in ts]  # tensors, as pipelines pass
    c_skip = np.array([float(r[0]) for r in ref], np.float32)
    c_out = np.array([float(r[1]) for r in ref], np.float32)
    got = np.array([ours.boundary_condition_scalings(int(t)) for t in ts], np.float32)
    np.testing.assert_array_equal(got[:, 0], c_skip)  # divisions only: bit-exact
    # c_out = s / sqrt(...): torch's sqrt is up to one ulp off, which the division turns into <= 2 ulps.
    assert np.all(np.abs(got[:, 1] - c_out) <= 2 * np.spacing(c_out))
    assert ours.boundary_condition_scalings(0) == (1.0, 0.0)


def test_boundary_condition_scalings_bit_exact_with_torch_sqrt(monkeypatch):
    monkeypatch.setattr(scheduler_module, "_sqrt", torch_sqrt)
    ours, theirs = make_pair(timestep_scaling=7.5)
    for t in torch.arange(0, 1000, 7):
        ref = tuple(float(c) for c in theirs.get_scalings_for_boundary_condition_discrete(t))
        assert ours.boundary_condition_scalings(int(t)) == ref


def test_add_noise_matches_diffusers():
    ours, theirs = make_pair(beta_schedule="linear")
    rng = np.random.default_rng(1)
    x, noise = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    for t in (0, 259, 999):
        got = ours.add_noise(x, noise, t)
        ref = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.tensor([t])).numpy()
        assert got.dtype == np.float32
        assert rel_err(got, ref) <= SCHEDULER_RTOL


def test_linspace_fma_rounding_is_exact():
    """_fma_f32 rounds a*b + c once, including float32 ties that double rounding gets wrong."""
    rng = np.random.default_rng(2)
    a = rng.uniform(-2, 2, 300).astype(np.float32)
    b = rng.uniform(-2, 2, 300).astype(np.float32)
    c = rng.uniform(-2, 2, 300).astype(np.float32)
    # (1 + 2^-23)(2^-24 - 2^-47) + (1 + 2^-23) = 1 + 2^-23 + 2^-24 - 2^-70: just below a float32 midpoint
    # whose even neighbour is the upper one, so rounding via float64 picks the wrong side.
    a = np.append(a, np.float32(1 + 2.0**-23))
    b = np.append(b, np.float32(2.0**-24 - 2.0**-47))
    c = np.append(c, np.float32(1 + 2.0**-23))
    got = _fma_f32(a, b, c)
    for ai, bi, ci, gi in zip(a, b, c, got):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        lo, hi = np.nextafter(gi, np.float32(-np.inf)), np.nextafter(gi, np.float32(np.inf))
        err = abs(Fraction(float(gi)) - exact)
        assert err <= abs(Fraction(float(lo)) - exact) and err <= abs(Fraction(float(hi)) - exact)
    assert got[-1] == np.float32(1 + 2.0**-23)
    assert np.float32(np.float64(a[-1]) * np.float64(b[-1]) + np.float64(c[-1])) != got[-1]


def test_scheduler_module_does_not_import_torch():
    tree = ast.parse(Path(scheduler_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "dataclasses", "typing", "numpy"}, imported


# ---------------------------------------------------------------------------------------------
# config


LCM_INIT_KEYS = set(inspect.signature(DiffusersLCMScheduler.__init__).parameters) - {"self"}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"beta_schedule": "linear", "original_inference_steps": 100, "steps_offset": 1, "timestep_spacing": "trailing"},
        {"clip_sample": True, "clip_sample_range": 2.5, "set_alpha_to_one": False, "prediction_type": "v_prediction"},
        {"rescale_betas_zero_snr": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0},
        {"trained_betas": np.linspace(0.0001, 0.02, 1000).tolist()},
    ],
    ids=["defaults", "animatelcm-like", "clip", "zero-snr", "trained-betas"],
)
def test_config_round_trip(overrides, tmp_path):
    theirs = DiffusersLCMScheduler(**diffusers_config(**overrides))
    config = SchedulerConfig.from_dict(dict(theirs.config))

    d = config.to_dict()
    assert d["_class_name"] == "LCMScheduler"
    assert set(d) - {"_class_name"} == LCM_INIT_KEYS
    json.dumps(d)  # scheduler_config.json content
    reloaded = DiffusersLCMScheduler.from_config(d)
    for key in LCM_INIT_KEYS:
        assert reloaded.config[key] == theirs.config[key], key
    assert SchedulerConfig.from_dict(d) == config

    # The file diffusers itself writes (with _class_name and _diffusers_version) parses the same.
    theirs.save_config(tmp_path)
    on_disk = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert SchedulerConfig.from_dict(on_disk, source=str(tmp_path)) == config


def test_config_optional_keys_default_like_diffusers():
    config = SchedulerConfig.from_dict(diffusers_config())
    defaults = DiffusersLCMScheduler(**diffusers_config()).config
    for key, value in config.to_dict().items():
        if key != "_class_name":
            assert value == defaults[key], key


@pytest.mark.parametrize(
    "key",
    ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "original_inference_steps",
     "prediction_type", "timestep_scaling"],
)
def test_config_missing_key_is_rejected(key):
    d = diffusers_config()
    del d[key]
    with pytest.raises(BundleFormatError) as info:
        SchedulerConfig.from_dict(d, source="bundle/scheduler_config.json")
    assert key in info.value.problem
    assert info.value.path == "bundle/scheduler_config.json"


def test_config_unknown_key_is_rejected():
    # e.g. a PNDM leftover that LCMScheduler.from_config(pndm_config) keeps in its config.
    with pytest.raises(BundleFormatError, match="skip_prk_steps"):
        SchedulerConfig.from_dict(diffusers_config(skip_prk_steps=True))


def test_config_thresholding_is_rejected():
    with pytest.raises(BundleFormatError, match="thresholding.*not supported"):
        SchedulerConfig.from_dict(diffusers_config(thresholding=True))
    assert SchedulerConfig.from_dict(diffusers_config(thresholding=False)) == SchedulerConfig.from_dict(
        diffusers_config()
    )


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"_class_name": "DDIMScheduler"}, "_class_name"),
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
        ({"original_inference_steps": 1001}, "original_inference_steps"),
        ({"clip_sample": 1}, "clip_sample"),
        ({"trained_betas": [0.01] * 10}, "trained_betas"),
    ],
)
def test_config_bad_values_are_rejected(overrides, needle):
    with pytest.raises(BundleFormatError, match=needle):
        SchedulerConfig.from_dict(diffusers_config(**overrides))


def test_config_ignores_underscore_keys():
    d = diffusers_config(_diffusers_version="0.42.1", _use_default_values=["clip_sample"], _class_name="LCMScheduler")
    assert SchedulerConfig.from_dict(d) == SchedulerConfig.from_dict(diffusers_config())


# ---------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("steps", [0, 51, -1, 2.0, True])
def test_bad_num_inference_steps(steps):
    ours, _ = make_pair(original_inference_steps=50)
    with pytest.raises(InvalidArgumentError) as info:
        ours.set_timesteps(steps)
    assert info.value.argument == "num_inference_steps"
    assert "1..50" in str(info.value)


def test_too_many_steps_also_rejected_by_diffusers():
    _, theirs = make_pair(original_inference_steps=50)
    with pytest.raises(ValueError):
        theirs.set_timesteps(51)


@pytest.mark.parametrize(
    "timesteps, diffusers_raises",
    [([100, 500], True), ([500, 500, 100], True), ([1000, 500], True), ([500, -1], False), ([], False),
     ([999.0, 500.0], False)],
)
def test_bad_custom_timesteps(timesteps, diffusers_raises):
    ours, theirs = make_pair()
    with pytest.raises(InvalidArgumentError) as info:
        ours.set_timesteps(timesteps=timesteps)
    assert info.value.argument == "timesteps"
    if diffusers_raises:
        with pytest.raises(ValueError):
            theirs.set_timesteps(timesteps=timesteps)


def test_steps_and_timesteps_are_exclusive():
    ours, _ = make_pair()
    with pytest.raises(InvalidArgumentError) as info:
        ours.set_timesteps()
    assert info.value.argument == "num_inference_steps"
    with pytest.raises(InvalidArgumentError) as info:
        ours.set_timesteps(4, timesteps=[999, 499])
    assert info.value.argument == "timesteps"


def test_bad_original_inference_steps():
    ours, _ = make_pair()
    with pytest.raises(InvalidArgumentError) as info:
        ours.set_timesteps(4, original_inference_steps=1001)
    assert info.value.argument == "original_inference_steps"


def test_bad_step_arguments():
    ours, _ = make_pair()
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(InvalidArgumentError) as info:
        ours.step(x, 0, x, x)  # before set_timesteps
    assert info.value.argument == "step_index"

    ours.set_timesteps(4)
    cases = [
        ((x, 0, x, None), "noise"),  # missing on a non-final step
        ((x, 2, x, None), "noise"),
        ((x, 0, x, np.zeros((1, 4, 3, 8, 4), np.float32)), "noise"),
        ((x, 4, x, None), "step_index"),
        ((x, -1, x, x), "step_index"),
        ((np.zeros((1, 4, 2, 8, 8), np.float32), 0, x, x), "model_output"),
        ((x.tolist(), 0, x, x), "model_output"),
        ((x, 0, x.astype(np.int32), x), "sample"),
    ]
    for args, argument in cases:
        with pytest.raises(InvalidArgumentError) as info:
            ours.step(*args)
        assert info.value.argument == argument, args[1:2]
    ours.step(x, 3, x, None)  # the last step needs no noise


def test_bad_add_noise_arguments():
    ours, _ = make_pair()
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(InvalidArgumentError) as info:
        ours.add_noise(x, x, 1000)
    assert info.value.argument == "timestep"
    with pytest.raises(InvalidArgumentError) as info:
        ours.add_noise(x, x[..., :4], 10)
    assert info.value.argument == "noise"
