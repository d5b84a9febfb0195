"""The PyTorch reference rows of `lcm-edge bench`: diffusers' AnimateDiffPipeline + LCMScheduler, eager
(or torch.compile), on the same weights as a bundle, with the same latents, noise and schedule.

The weights come from the exporter's own loaders (`load_components`, LoRAs fused behind their gate)
reading the same source files the bundle was exported from; the scheduler config, schedule and
seeded draws come from the bundle and lcm_edge's pipeline, so the frames are comparable with the
runtime's to a grey level.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from lcm_edge.bundle import SCHEDULER_CONFIG, load_bundle
from lcm_edge.errors import InvalidArgumentError
from lcm_edge.pipeline import NoiseFn, sampling_timesteps, seeded_draws

from .lora import LoraRequest
from .sources import load_components

SOURCE_KEYS = ("base", "base_folder", "motion_module", "motion_config", "motion_variant", "loras")


def load_reference_components(source: Mapping[str, Any]):
    """`source`: load_components arguments as `lcm-edge export` takes them (loras as 'FILE[:WEIGHT]')."""
    unknown = sorted(set(source) - set(SOURCE_KEYS))
    if unknown or "base" not in source:
        raise InvalidArgumentError("torch_source", f"unknown keys {unknown}" if unknown else "no 'base'",
                                   f"give base and optionally {list(SOURCE_KEYS[1:])}, as for lcm-edge export")
    kwargs = {k: v for k, v in source.items() if k != "loras"}
    loras = [LoraRequest.parse(text) for text in source.get("loras", [])]
    return load_components(kwargs.pop("base"), **kwargs, loras=loras)


@contextlib.contextmanager
def injected_lcm_noise(noise_fn: NoiseFn) -> Iterator[None]:
    """diffusers' LCMScheduler.step draws its noise itself (randn_tensor, one draw per non-final step);
    for the duration of one call it gets lcm_edge's draws instead, in the same order."""
    from diffusers.schedulers import scheduling_lcm

    original = scheduling_lcm.randn_tensor
    count = iter(range(1 << 30))

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(np.asarray(noise_fn(next(count), tuple(shape)))).to(device=device, dtype=dtype)

    scheduling_lcm.randn_tensor = draw
    try:
        yield
    finally:
        scheduling_lcm.randn_tensor = original


def _fixed_schedule_scheduler(folder: Path, timesteps: list[int]):
    """The bundle's LCMScheduler config, sampling exactly `timesteps` (AnimateDiffPipeline only passes a count)."""
    from diffusers import LCMScheduler

    class FixedScheduleLCMScheduler(LCMScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None,
                          timesteps=None, strength=1.0):
            super().set_timesteps(device=device, timesteps=list(self.fixed_timesteps))

    scheduler = FixedScheduleLCMScheduler.from_pretrained(str(folder))
    scheduler.fixed_timesteps = list(timesteps)
    return scheduler


class _StageClock:
    """Wall time of every forward call of a module (forward pre/post hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds: list[float] = []
        self._start = 0.0
        module.register_forward_pre_hook(lambda *_: self._begin())
        module.register_forward_hook(lambda *_: self._end())

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def reference_runner(scenario) -> tuple[str, float, Callable[[], tuple[dict, np.ndarray]]]:
    """(description, load seconds, run) for a `pytorch` or `pytorch-compile` bench scenario."""
    from diffusers import AnimateDiffPipeline

    s = scenario
    options = dict(s.runtime.options)
    if "threads" in options:
        torch.set_num_threads(int(options.pop("threads")))
    if options:
        raise InvalidArgumentError("runtime", f"options {sorted(options)} are not known to the PyTorch rows",
                                   "use threads=N only")
    if s.torch_source is None:
        raise InvalidArgumentError("torch_source", "missing for a PyTorch row",
                                   "give the source files the bundle was exported from (base=..., motion_module=...)")
    device = "cuda" if s.runtime.device == "cuda" else "cpu"
    bundle = load_bundle(s.bundle, verify_checksums=False)
    m = bundle.model
    schedule = [int(t) for t in sampling_timesteps(bundle, s.steps)]

    t0 = time.perf_counter()
    c = load_reference_components(s.torch_source)
    scheduler = _fixed_schedule_scheduler((bundle.root / SCHEDULER_CONFIG).parent, schedule)
    pipe = AnimateDiffPipeline(vae=c.vae.eval(), text_encoder=c.text_encoder.eval(), tokenizer=c.tokenizer,
                               unet=c.unet.eval(), motion_adapter=None, scheduler=scheduler).to(device)
    pipe.set_progress_bar_config(disable=True)
    text_clock, unet_clock = _StageClock(pipe.text_encoder), _StageClock(pipe.unet)
    compiled = s.runtime.backend == "pytorch-compile"
    if compiled:  # compiled lazily: the first run carries the compile time
        pipe.unet = torch.compile(pipe.unet)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)
    load_s = time.perf_counter() - t0
    shape = (1, m.latent_channels, s.frames, s.height // m.vae_scale_factor, s.width // m.vae_scale_factor)

    @torch.no_grad()
    def run() -> tuple[dict, np.ndarray]:
        text_clock.seconds.clear()
        unet_clock.seconds.clear()
        latents, noise_fn = seeded_draws(s.seed, shape)
        start = time.perf_counter()
        with injected_lcm_noise(noise_fn):
            out = pipe(s.prompt, num_frames=s.frames, height=s.height, width=s.width, num_inference_steps=s.steps,
                       guidance_scale=s.guidance, latents=torch.from_numpy(latents).to(device), output_type="latent")
        t = time.perf_counter()
        video = pipe.decode_latents(out.frames[:, :, :s.decoded_frames], decode_chunk_size=4)
        frames = ((video[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0)
        end = time.perf_counter()
        return {"text_encoder_s": sum(text_clock.seconds), "unet_steps_s": list(unet_clock.seconds),
                "vae_decode_s": end - t, "total_s": end - start}, frames.cpu().numpy()

    describe = f"torch {torch.__version__} diffusers AnimateDiffPipeline {'torch.compile' if compiled else 'eager'} " \
               f"{device} fp32"
    return describe, load_s, run
