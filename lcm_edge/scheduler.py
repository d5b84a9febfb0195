"""Latent Consistency Model multistep sampler, numpy only.

Luo et al., "Latent Consistency Models", arXiv 2310.04378: the skipping-step training
schedule (§4.3), the consistency parameterization with boundary conditions c_skip / c_out
(§4.1) and multistep consistency sampling (Algorithm 3).

The arithmetic mirrors diffusers' `LCMScheduler` in float32, operation for operation, so a
run here can be checked against a PyTorch run that was fed the same noise. The contract is
two calls: `set_timesteps()` once, then `step()` for every index of the schedule. Noise is an
argument of `step()` (not drawn inside) so the caller owns the random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import BundleFormatError, InvalidArgumentError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# LCMScheduler init keys that change the math and have no safe default: a bundle must state them.
_REQUIRED_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "original_inference_steps",
    "prediction_type",
    "timestep_scaling",
)
# Keys that default to diffusers' own defaults when absent (thresholding is accepted only as False).
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "trained_betas": None,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "rescale_betas_zero_snr": False,
    "thresholding": False,
}
# Keys LCMScheduler accepts but never reads (steps_offset and timestep_spacing are unused by its
# set_timesteps; the other two only matter with thresholding). Carried through so to_dict() round-trips.
_INERT_DEFAULTS: dict[str, Any] = {
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
_KNOWN_KEYS = frozenset(_REQUIRED_KEYS) | frozenset(_OPTIONAL_DEFAULTS) | frozenset(_INERT_DEFAULTS)

# Boundary-condition constant of consistency models (Song et al. 2023), fixed at 0.5 in LCM.
_SIGMA_DATA = 0.5

_FIX_CONFIG = (
    "re-export the bundle so scheduler_config.json is a diffusers LCMScheduler config "
    "(SchedulerConfig.to_dict() writes every key)"
)


# Diffusion models train on 1000 timesteps; the schedule tables are this long, so a hostile config must not
# size them (2**31 would allocate 16 GB before anything else failed).
MAX_TRAIN_TIMESTEPS = 100_000


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int
    beta_start: float
    beta_end: float
    beta_schedule: str  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    trained_betas: tuple[float, ...] | None
    original_inference_steps: int
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    timestep_scaling: float
    set_alpha_to_one: bool
    clip_sample: bool
    clip_sample_range: float
    rescale_betas_zero_snr: bool
    # Inert: stored only so to_dict() reproduces the source config; the sampler never reads them.
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "scheduler_config") -> SchedulerConfig:
        """Parse the content of a diffusers LCMScheduler `scheduler_config.json`, strictly."""

        def bad(problem: str, fix: str = _FIX_CONFIG) -> BundleFormatError:
            return BundleFormatError(path=source, problem=problem, fix=fix)

        if not isinstance(d, Mapping):
            raise bad(f"scheduler config must be a JSON object, got {type(d).__name__}")

        class_name = d.get("_class_name")
        if class_name is not None and class_name != "LCMScheduler":
            raise bad(
                f"_class_name is {class_name!r}; only 'LCMScheduler' is supported",
                "export the bundle with an LCMScheduler (LCMScheduler.from_config(pipe.scheduler.config))",
            )
        # "_"-prefixed keys are diffusers bookkeeping (_class_name, _diffusers_version, ...).
        keys = {k: v for k, v in d.items() if not (isinstance(k, str) and k.startswith("_"))}

        unknown = sorted(str(k) for k in keys if k not in _KNOWN_KEYS)
        if unknown:
            raise bad(
                f"unknown key(s) {unknown}; not LCMScheduler parameters",
                "remove them, or re-export the bundle so scheduler_config.json holds only LCMScheduler keys",
            )
        missing = [k for k in _REQUIRED_KEYS if k not in keys]
        if missing:
            raise bad(f"missing required key(s) {missing}")

        def integer(key: str, lo: int, hi: int | None = None) -> int:
            v = keys[key]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise bad(f"{key} must be an integer, got {v!r}")
            v = int(v)
            if v < lo or (hi is not None and v > hi):
                allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                raise bad(f"{key} is {v}, allowed {allowed}")
            return v

        def number(key: str, *, positive: bool = False) -> float:
            v = keys[key]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise bad(f"{key} must be a number, got {v!r}")
            try:
                v = float(v)
            except OverflowError:  # an int beyond float range is no finite number either
                v = math.inf
            if not math.isfinite(v) or (positive and v <= 0.0):
                raise bad(f"{key} is {v}, must be {'a finite number > 0' if positive else 'finite'}")
            return v

        def flag(key: str) -> bool:
            v = keys.get(key, _OPTIONAL_DEFAULTS.get(key))
            if not isinstance(v, (bool, np.bool_)):
                raise bad(f"{key} must be true or false, got {v!r}")
            return bool(v)

        def choice(key: str, allowed: tuple[str, ...]) -> str:
            v = keys[key]
            if v not in allowed:
                raise bad(f"{key} {v!r} is not supported; supported: {list(allowed)}")
            return v

        if flag("thresholding"):
            raise bad(
                "thresholding=true (dynamic thresholding) is not supported by lcm_edge; it is meant for "
                "pixel-space models, not latent video",
                "set thresholding to false in scheduler_config.json",
            )

        num_train_timesteps = integer("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS)
        beta_start = number("beta_start")
        beta_end = number("beta_end")
        beta_schedule = choice("beta_schedule", BETA_SCHEDULES)
        original_inference_steps = integer("original_inference_steps", 1, num_train_timesteps)
        prediction_type = choice("prediction_type", PREDICTION_TYPES)
        timestep_scaling = number("timestep_scaling", positive=True)

        trained = keys.get("trained_betas")
        trained_betas: tuple[float, ...] | None = None
        if trained is not None:
            if isinstance(trained, (str, bytes)) or not hasattr(trained, "__len__"):
                raise bad(f"trained_betas must be a list of numbers or null, got {type(trained).__name__}")
            values = []
            for b in trained:
                if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)):
                    raise bad(f"trained_betas must hold numbers, found {b!r}")
                b = float(b)
                if not 0.0 <= b <= 1.0:
                    raise bad(f"trained_betas holds {b}, betas must lie in [0, 1]")
                values.append(b)
            if len(values) != num_train_timesteps:
                raise bad(
                    f"trained_betas has {len(values)} values but num_train_timesteps is {num_train_timesteps}"
                )
            trained_betas = tuple(values)

        if "clip_sample_range" in keys:
            clip_sample_range = number("clip_sample_range", positive=True)
        else:
            clip_sample_range = float(_OPTIONAL_DEFAULTS["clip_sample_range"])

        inert = dict(_INERT_DEFAULTS)
        if "steps_offset" in keys:
            inert["steps_offset"] = integer("steps_offset", 0)
        if "timestep_spacing" in keys:
            if not isinstance(keys["timestep_spacing"], str):
                raise bad(f"timestep_spacing must be a string, got {keys['timestep_spacing']!r}")
            inert["timestep_spacing"] = keys["timestep_spacing"]
        for key in ("dynamic_thresholding_ratio", "sample_max_value"):
            if key in keys:
                inert[key] = number(key)

        return cls(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            original_inference_steps=original_inference_steps,
            prediction_type=prediction_type,
            timestep_scaling=timestep_scaling,
            set_alpha_to_one=flag("set_alpha_to_one"),
            clip_sample=flag("clip_sample"),
            clip_sample_range=clip_sample_range,
            rescale_betas_zero_snr=flag("rescale_betas_zero_snr"),
            **inert,
        )

    def to_dict(self) -> dict:
        """diffusers-compatible scheduler_config.json content: `LCMScheduler.from_config(d)` rebuilds it."""
        return {
            "_class_name": "LCMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "trained_betas": list(self.trained_betas) if self.trained_betas is not None else None,
            "original_inference_steps": self.original_inference_steps,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "set_alpha_to_one": self.set_alpha_to_one,
            "steps_offset": self.steps_offset,
            "prediction_type": self.prediction_type,
            "thresholding": False,
            "dynamic_thresholding_ratio": self.dynamic_thresholding_ratio,
            "sample_max_value": self.sample_max_value,
            "timestep_spacing": self.timestep_spacing,
            "timestep_scaling": self.timestep_scaling,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }


@dataclass(frozen=True)
class LCMStepOutput:
    prev_sample: np.ndarray  # x_{t_prev}: the next step's model input
    denoised: np.ndarray  # the consistency function's x_0 estimate at this step (a preview)


# ----------------------------------------------------------------------------------------------
# float32 helpers that reproduce torch's CPU kernels (all but sqrt bit for bit, see _sqrt).


def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a*b + c rounded once, as a fused multiply-add does."""
    a64 = np.asarray(a, dtype=np.float32).astype(np.float64)
    b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
    c64 = np.asarray(c, dtype=np.float32).astype(np.float64)
    p = a64 * b64  # exact: two 24-bit significands fit in float64's 53
    s = p + c64
    # TwoSum: err is exactly (p + c) - s, so s + err is the exact fused result.
    bv = s - p
    err = (p - (s - bv)) + (c64 - bv)
    out = s.astype(np.float32)
    # Rounding s again to float32 is right unless s sits exactly on a float32 midpoint (low 29 of
    # its 52 fraction bits = 100..0); then the exact value lies on err's side of it.
    bits = s.view(np.uint64)
    tie = ((bits & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)) & (err != 0)
    tie &= np.abs(s) >= np.finfo(np.float32).tiny  # the bit test assumes a normal float32
    if np.any(tie):
        trunc64 = (bits & ~np.uint64((1 << 29) - 1)).view(np.float64)  # neighbour toward zero
        trunc = trunc64.astype(np.float32)
        away = np.nextafter(trunc, np.copysign(np.float32(np.inf), s).astype(np.float32))
        pick = np.where((trunc64 - s) * err > 0, trunc, away)
        out = np.where(tie, pick, out)
    return out


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float32) on CPU."""
    s, e = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s], dtype=np.float32)
    # ATen's kernel is a scalar loop: start + step*i for the first half, end - step*(n-1-i) for
    # the rest. Its AVX2/AVX-512 builds (what PyTorch runs on any x86-64 CPU with AVX2) compile both
    # into fused multiply-adds; multiply-then-add, as its no-AVX2 "DEFAULT" build does, differs in
    # 10-15% of the 1000 betas by one ulp (~1.2e-7 relative in alphas_cumprod).
    step = (e - s) / np.float32(steps - 1)
    idx = np.arange(steps)
    head = idx < steps // 2
    lo = _fma_f32(np.full(steps, step), idx.astype(np.float32), np.full(steps, s))
    hi = _fma_f32(np.full(steps, -step), (steps - 1 - idx).astype(np.float32), np.full(steps, e))
    return np.where(head, lo, hi).astype(np.float32)


# Every square root goes through _sqrt: IEEE np.sqrt, correctly rounded. torch's CPU sqrt goes through
# MKL VML, within one ulp but not correctly rounded (about 1 in 5 float32 inputs land one ulp off), so
# scalar square roots can differ from diffusers by one ulp: ~1e-7 relative in a step's outputs. Only
# rescale_betas_zero_snr amplifies it, via the cancellation in sqrt(alphas_cumprod) - its last value.
# Tests swap in torch's sqrt through this name to show everything else matches bit for bit.
_sqrt = np.sqrt


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod on a float32 CPU tensor: accumulates in double, rounds each output."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's cosine schedule (squaredcos_cap_v2), computed in Python floats like diffusers."""

    def alpha_bar_fn(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.array(betas, dtype=np.float64).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Zero terminal SNR (arXiv 2305.08891, Algorithm 1), float32 like diffusers."""
    one = np.float32(1.0)
    alphas_bar_sqrt = _sqrt(_cumprod_f32(one - betas))
    a0, aT = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    # Shift so the last timestep has zero signal, then scale so the first is unchanged.
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (one - alphas).astype(np.float32)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


class LCMScheduler:
    """LCM multistep sampler: `set_timesteps()` once, then `step()` for each schedule index."""

    def __init__(self, config: SchedulerConfig):
        if not isinstance(config, SchedulerConfig):
            raise InvalidArgumentError(
                "config", f"expected a SchedulerConfig, got {type(config).__name__}",
                "build it with SchedulerConfig.from_dict(scheduler_config_json)",
            )
        if config.beta_schedule not in BETA_SCHEDULES and config.trained_betas is None:
            raise InvalidArgumentError(
                "config", f"beta_schedule {config.beta_schedule!r} is not supported",
                f"use one of {list(BETA_SCHEDULES)}",
            )
        if config.prediction_type not in PREDICTION_TYPES:
            raise InvalidArgumentError(
                "config", f"prediction_type {config.prediction_type!r} is not supported",
                f"use one of {list(PREDICTION_TYPES)}",
            )
        self.config = config
        T = config.num_train_timesteps

        if config.trained_betas is not None:
            betas = np.array(config.trained_betas, dtype=np.float64).astype(np.float32)
        elif config.beta_schedule == "linear":
            betas = _linspace_f32(config.beta_start, config.beta_end, T)
        elif config.beta_schedule == "scaled_linear":
            # Latent-diffusion schedule: linear in sqrt(beta). The sqrt is taken in Python floats.
            root = _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, T)
            betas = root * root
        else:
            betas = _betas_for_alpha_bar(T)
        if config.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)

        self.betas = betas.astype(np.float32)
        self.alphas = (np.float32(1.0) - self.betas).astype(np.float32)
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        # Only reached for a previous timestep < 0, which LCM's schedule never produces; kept for parity.
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0

        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        *,
        timesteps: list[int] | None = None,
        original_inference_steps: int | None = None,
    ) -> np.ndarray:
        """Choose the sampling timesteps (descending int64) and return them."""
        T = self.config.num_train_timesteps
        if num_inference_steps is None and timesteps is None:
            raise InvalidArgumentError(
                "num_inference_steps", "neither num_inference_steps nor timesteps was given",
                "pass exactly one of them",
            )
        if num_inference_steps is not None and timesteps is not None:
            raise InvalidArgumentError(
                "timesteps", "both num_inference_steps and timesteps were given",
                "pass exactly one of them",
            )

        original_steps = self.config.original_inference_steps
        if original_inference_steps is not None:
            if not _is_int(original_inference_steps) or not 1 <= original_inference_steps <= T:
                raise InvalidArgumentError(
                    "original_inference_steps", f"{original_inference_steps!r} is outside 1..{T}",
                    f"pass an integer in 1..{T} (num_train_timesteps), or None for the config's value",
                )
            original_steps = int(original_inference_steps)

        # 1. The training/distillation schedule: every k-th timestep, k = T // original_steps,
        #    ending at T-1 (the skipping-step schedule of §4.3).
        k = T // original_steps
        lcm_origin_timesteps = np.arange(1, original_steps + 1, dtype=np.int64) * k - 1

        if timesteps is not None:
            # 2a. Custom schedule. diffusers raises for these and only warns for the rest
            #     (off-schedule values, not starting at T-1), which are allowed here silently.
            if isinstance(timesteps, (str, bytes)) or not hasattr(timesteps, "__iter__"):
                raise InvalidArgumentError(
                    "timesteps", f"expected a list of integers, got {type(timesteps).__name__}",
                    "pass e.g. [999, 759, 499, 259]",
                )
            custom = list(timesteps)
            if not custom or not all(_is_int(t) for t in custom):
                raise InvalidArgumentError(
                    "timesteps", f"expected a non-empty list of integers, got {custom!r}",
                    "pass e.g. [999, 759, 499, 259]",
                )
            custom = [int(t) for t in custom]
            if any(custom[i] >= custom[i - 1] for i in range(1, len(custom))):
                raise InvalidArgumentError(
                    "timesteps", f"{custom} is not strictly descending",
                    "list each timestep once, largest (noisiest) first",
                )
            if custom[0] >= T or custom[-1] < 0:
                raise InvalidArgumentError(
                    "timesteps", f"{custom} leaves the range 0..{T - 1}",
                    f"use timesteps in 0..{T - 1} (num_train_timesteps - 1)",
                )
            schedule = np.array(custom, dtype=np.int64)
        else:
            # 2b. Evenly spaced indices into the reversed training schedule.
            if not _is_int(num_inference_steps) or not 1 <= num_inference_steps <= original_steps:
                raise InvalidArgumentError(
                    "num_inference_steps", f"{num_inference_steps!r} is outside 1..{original_steps}",
                    f"pass an integer in 1..{original_steps} (original_inference_steps)",
                )
            n = int(num_inference_steps)
            origin = lcm_origin_timesteps[::-1].copy()
            inference_indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
            schedule = origin[inference_indices]

        schedule.setflags(write=False)  # shared with callers; nobody should edit it in place
        self.timesteps = schedule
        self.num_inference_steps = len(schedule)
        return schedule

    def boundary_condition_scalings(self, timestep: int) -> tuple[float, float]:
        """(c_skip, c_out) at a discrete timestep, with s = timestep_scaling * t and sigma_data 0.5.

        c_skip(0) = 1 and c_out(0) = 0, so the consistency function is the identity at t = 0.
        Computed in float32 like diffusers when a pipeline passes the timestep as a tensor.
        """
        s = np.float32(timestep) * np.float32(self.config.timestep_scaling)
        sd2 = np.float32(_SIGMA_DATA**2)
        c_skip = sd2 / (s * s + sd2)
        c_out = s / _sqrt(s * s + sd2)
        return float(c_skip), float(c_out)

    def step(
        self,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        noise: np.ndarray | None,
    ) -> LCMStepOutput:
        """One multistep consistency sampling step (Algorithm 3) at `self.timesteps[step_index]`.

        `noise` (standard normal, shape of `sample`) is required on every step but the last, where
        it is ignored: diffusers draws it there with `torch.randn(shape, generator=g)`.
        """
        if self.timesteps is None:
            raise InvalidArgumentError(
                "step_index", "no timestep schedule yet", "call set_timesteps() before step()"
            )
        n = len(self.timesteps)
        if not _is_int(step_index) or not 0 <= step_index < n:
            raise InvalidArgumentError(
                "step_index", f"{step_index!r} is outside 0..{n - 1}",
                "pass the index into the schedule returned by set_timesteps()",
            )
        for name, arr in (("model_output", model_output), ("sample", sample)):
            if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
                raise InvalidArgumentError(
                    name, f"expected a floating-point numpy array, got {type(arr).__name__}"
                    + (f" of {arr.dtype}" if isinstance(arr, np.ndarray) else ""),
                    "pass np.float32 arrays",
                )
        if model_output.shape != sample.shape:
            raise InvalidArgumentError(
                "model_output", f"shape {model_output.shape} differs from sample's {sample.shape}",
                "pass the model's prediction for this very sample",
            )
        last = step_index == n - 1
        if not last:
            if noise is None:
                raise InvalidArgumentError(
                    "noise", f"missing on step {step_index} of {n} (only the last step runs without it)",
                    f"pass standard normal noise of shape {sample.shape}",
                )
            if not isinstance(noise, np.ndarray) or not np.issubdtype(noise.dtype, np.floating):
                raise InvalidArgumentError(
                    "noise", f"expected a floating-point numpy array, got {type(noise).__name__}",
                    "pass np.float32 standard normal noise",
                )
            if noise.shape != sample.shape:
                raise InvalidArgumentError(
                    "noise", f"shape {noise.shape} differs from sample's {sample.shape}",
                    f"pass noise of shape {sample.shape}",
                )

        dtype = np.result_type(model_output.dtype, sample.dtype)
        timestep = int(self.timesteps[step_index])

        # 1. The timestep the output is re-noised to; the last step stays at its own timestep
        #    (its noise is never added, so alpha_prod_t_prev is unused there).
        prev_timestep = int(self.timesteps[step_index + 1]) if not last else timestep

        # 2. Cumulative alphas/betas, float32 scalars as in diffusers.
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = np.float32(1.0) - alpha_prod_t
        beta_prod_t_prev = np.float32(1.0) - alpha_prod_t_prev
        sqrt_alpha = _sqrt(alpha_prod_t).astype(dtype)
        sqrt_beta = _sqrt(beta_prod_t).astype(dtype)

        # 3. Boundary-condition scalings c_skip, c_out (§4.1): they make f(x, 0) = x.
        c_skip, c_out = (np.float32(c).astype(dtype) for c in self.boundary_condition_scalings(timestep))

        # 4. The x_0 the model's parameterization implies.
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            predicted_original_sample = (sample - sqrt_beta * model_output) / sqrt_alpha
        elif prediction_type == "sample":
            predicted_original_sample = model_output
        else:  # v_prediction
            predicted_original_sample = sqrt_alpha * sample - sqrt_beta * model_output

        # 5. Optional clipping of x_0 (thresholding is rejected when the config is read).
        if self.config.clip_sample:
            r = np.dtype(dtype).type(self.config.clip_sample_range)
            predicted_original_sample = np.clip(predicted_original_sample, -r, r)

        # 6. The consistency function: a skip connection blended with the x_0 estimate.
        denoised = c_out * predicted_original_sample + c_skip * sample

        # 7. Multistep sampling re-noises the estimate to the next timestep with fresh z ~ N(0, I);
        #    the last step (and so one-step sampling) returns the estimate itself.
        if not last:
            sqrt_alpha_prev = _sqrt(alpha_prod_t_prev).astype(dtype)
            sqrt_beta_prev = _sqrt(beta_prod_t_prev).astype(dtype)
            prev_sample = sqrt_alpha_prev * denoised + sqrt_beta_prev * noise.astype(dtype, copy=False)
        else:
            prev_sample = denoised

        return LCMStepOutput(
            prev_sample=np.asarray(prev_sample, dtype=dtype), denoised=np.asarray(denoised, dtype=dtype)
        )

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: int) -> np.ndarray:
        """Forward diffusion q(x_t | x_0) at one timestep, like diffusers' add_noise."""
        T = self.config.num_train_timesteps
        if not _is_int(timestep) or not 0 <= timestep < T:
            raise InvalidArgumentError(
                "timestep", f"{timestep!r} is outside 0..{T - 1}", f"pass an integer timestep in 0..{T - 1}"
            )
        for name, arr in (("original", original), ("noise", noise)):
            if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
                raise InvalidArgumentError(
                    name, f"expected a floating-point numpy array, got {type(arr).__name__}",
                    "pass np.float32 arrays",
                )
        if noise.shape != original.shape:
            raise InvalidArgumentError(
                "noise", f"shape {noise.shape} differs from original's {original.shape}",
                f"pass noise of shape {original.shape}",
            )
        # diffusers casts alphas_cumprod to the sample dtype before taking square roots.
        dtype = original.dtype
        alpha_prod = self.alphas_cumprod[int(timestep)].astype(dtype)
        sqrt_alpha_prod = _sqrt(alpha_prod)
        sqrt_one_minus_alpha_prod = _sqrt(dtype.type(1) - alpha_prod)
        noisy = sqrt_alpha_prod * original + sqrt_one_minus_alpha_prod * noise.astype(dtype, copy=False)
        return np.asarray(noisy, dtype=dtype)
