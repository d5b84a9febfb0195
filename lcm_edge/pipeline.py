"""The 4-step text-to-video pipeline on a bundle: numpy + a backend, never torch.

The call is a numbered recipe, as in diffusers' AnimateDiffPipeline, so the two can be
read side by side (and are tested against each other on the same weights).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .backends import Backend, Session, create_backend
from .bundle import Bundle, load_bundle
from .errors import GenerationCancelled, InvalidArgumentError
from .scheduler import LCMScheduler
from .tokenizer import CLIPTokenizer
from .video import save_video

NoiseFn = Callable[[int, tuple[int, ...]], np.ndarray]


class PromptTruncatedWarning(UserWarning):
    """The prompt had more tokens than the text encoder takes; the tail was dropped."""


@dataclass(frozen=True)
class StepInfo:
    """Handed to the progress callback after every UNet step."""

    step: int  # 0-based
    num_steps: int
    timestep: int
    seconds: float


@dataclass
class Timings:
    text_encoder_s: float = 0.0
    unet_steps_s: list[float] = field(default_factory=list)
    vae_decode_s: float = 0.0
    total_s: float = 0.0

    def summary(self) -> str:
        steps = ", ".join(f"{s:.3f}" for s in self.unet_steps_s)
        return (f"text encoder {self.text_encoder_s:.3f} s | unet {sum(self.unet_steps_s):.3f} s "
                f"({len(self.unet_steps_s)} steps: {steps}) | vae decode {self.vae_decode_s:.3f} s | "
                f"total {self.total_s:.3f} s")


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 (frames, height, width, 3), RGB
    latents: np.ndarray  # float32 (1, channels, frames, height / f, width / f), the final denoised latents
    seed: int | None  # None when the caller supplied both latents and noise_fn
    timings: Timings
    fps: int
    truncated_text: str  # the part of the prompt the tokenizer dropped ("" when none)
    timesteps: tuple[int, ...]  # the schedule sampled (a bundle's default_timesteps apply to a step count)

    def save(self, path: str | os.PathLike, fps: int | None = None) -> Path:
        """Write .mp4 or .gif (by extension); the file appears only when complete."""
        return save_video(self.frames, path, self.fps if fps is None else fps)


def _check_int(name: str, value, low: int, high: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(name, f"{value!r} is not an integer", fix)
    if not low <= value <= high:
        raise InvalidArgumentError(name, f"{value} is outside [{low}, {high}]", fix)
    return int(value)


def check_inputs(bundle: Bundle, prompt, negative_prompt=None, num_frames=None, height=None, width=None,
                 num_inference_steps=4, timesteps=None, guidance_scale=1.0, seed=None, latents=None,
                 noise_fn=None, decode_chunk_size=4, callback=None, cancel_event=None) -> None:
    """Every argument of a generation, checked against the bundle before any graph runs."""
    model = bundle.model
    ots = bundle.scheduler_config.original_inference_steps
    num_frames = model.default_frames if num_frames is None else num_frames
    height = model.default_height if height is None else height
    width = model.default_width if width is None else width
    if not isinstance(prompt, str):
        raise InvalidArgumentError("prompt", f"expected text (str), got {type(prompt).__name__}",
                                   "pass one prompt as a Python string")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise InvalidArgumentError("negative_prompt", f"expected text (str) or None, got "
                                   f"{type(negative_prompt).__name__}", "pass a string or None")
    _check_int("num_frames", num_frames, 1, model.max_frames,
               f"the motion module takes 1 to {model.max_frames} frames; lower num_frames")
    for name, value in (("height", height), ("width", width)):
        _check_int(name, value, model.size_multiple, 16384, f"use a multiple of {model.size_multiple}")
        if value % model.size_multiple:
            lower = value - value % model.size_multiple
            raise InvalidArgumentError(name, f"{value} is not a multiple of {model.size_multiple}, which this "
                                       "model needs (VAE downscale x UNet downsamplers)",
                                       f"use {lower} or {lower + model.size_multiple}")
    if timesteps is None:
        _check_int("num_inference_steps", num_inference_steps, 1, ots,
                   f"use 1 to {ots} steps (original_inference_steps of this bundle); AnimateLCM recommends 4")
    elif num_inference_steps is not None:
        raise InvalidArgumentError("timesteps", "given together with num_inference_steps",
                                   "pass num_inference_steps=None when giving custom timesteps")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not np.isfinite(guidance_scale) or guidance_scale < 1.0:
        raise InvalidArgumentError("guidance_scale", f"{guidance_scale!r} is below 1 (or not a number)",
                                   "use 1.0 for AnimateLCM's CFG-free sampling, or e.g. 1.5-2.0 with guidance")
    if negative_prompt is not None and guidance_scale <= 1.0:
        raise InvalidArgumentError("negative_prompt", "has no effect without classifier-free guidance",
                                   "set guidance_scale above 1 (e.g. 1.5), or drop negative_prompt")
    if seed is not None:
        _check_int("seed", seed, 0, 2**63 - 1, "use a non-negative integer seed, or None for a random one")
    if latents is not None:
        expected = (1, model.latent_channels, num_frames, height // model.vae_scale_factor,
                    width // model.vae_scale_factor)
        if not isinstance(latents, np.ndarray) or latents.shape != expected \
                or not np.issubdtype(latents.dtype, np.floating):
            raise InvalidArgumentError("latents", f"expected a float array of shape {expected}, got "
                                       f"{getattr(latents, 'dtype', type(latents).__name__)} "
                                       f"{getattr(latents, 'shape', '')}",
                                       "match (1, latent_channels, num_frames, height/f, width/f)")
    if noise_fn is not None and not callable(noise_fn):
        raise InvalidArgumentError("noise_fn", "is not callable", "pass f(step_index, shape) -> ndarray")
    _check_int("decode_chunk_size", decode_chunk_size, 1, 4096, "decode e.g. 4 frames at a time")
    if callback is not None and not callable(callback):
        raise InvalidArgumentError("callback", "is not callable", "pass f(StepInfo) or None")
    if cancel_event is not None and not callable(getattr(cancel_event, "is_set", None)):
        raise InvalidArgumentError("cancel_event", "has no is_set()", "pass a threading.Event or None")


class AnimateLCMPipeline:
    """Text to video with an AnimateLCM bundle.

    >>> pipe = AnimateLCMPipeline.from_bundle("bundle/", backend="onnxruntime", device="cpu")
    >>> pipe("a red circle moving right", num_frames=16, seed=0).save("clip.mp4")
    """

    def __init__(self, bundle: Bundle, backend: Backend):
        self.bundle = bundle
        self.backend = backend
        self.tokenizer = CLIPTokenizer.from_folder(bundle.tokenizer_dir)
        self.text_encoder = backend.open(bundle.root, bundle.components["text_encoder"])
        self.unet = backend.open(bundle.root, bundle.components["unet"])
        self.vae_decoder = backend.open(bundle.root, bundle.components["vae_decoder"])

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, backend: str = "onnxruntime", device: str | None = None,
                    verify_checksums: bool = True, **backend_options) -> "AnimateLCMPipeline":
        """Verify the bundle, then compile its graphs on `backend` / `device`.

        backend_options go to the backend: onnxruntime takes threads, optimization,
        provider_options; openvino takes cache_dir, performance_hint, config.
        """
        runtime = create_backend(backend, device, **backend_options)
        return cls(load_bundle(path, verify_checksums=verify_checksums), runtime)

    # ---------------------------------------------------------------- call
    def __call__(self, prompt: str, *, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = 4, guidance_scale: float = 1.0,
                 negative_prompt: str | None = None, seed: int | None = None, latents: np.ndarray | None = None,
                 timesteps: list[int] | None = None, noise_fn: NoiseFn | None = None,
                 decode_chunk_size: int = 4, callback: Callable[[StepInfo], None] | None = None,
                 cancel_event: threading.Event | None = None) -> GenerationResult:
        model = self.bundle.model
        num_frames = model.default_frames if num_frames is None else num_frames
        height = model.default_height if height is None else height
        width = model.default_width if width is None else width

        # 1. Check every input before any work is done.
        check_inputs(self.bundle, prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                     timesteps, guidance_scale, seed, latents, noise_fn, decode_chunk_size, callback, cancel_event)
        do_cfg = guidance_scale > 1.0
        timings = Timings()
        start = time.perf_counter()

        def check_cancel(stage: str) -> None:
            if cancel_event is not None and cancel_event.is_set():
                raise GenerationCancelled(stage)

        # 2. Encode the prompt (and the negative prompt, as batch [negative, positive] like diffusers).
        check_cancel("text encoding")
        tokens = self.tokenizer.encode(prompt)
        if tokens.truncated:
            warnings.warn(f"prompt is {tokens.num_tokens} tokens; the text encoder takes "
                          f"{model.text_max_length - 2}, so this was dropped: {tokens.dropped_text!r}",
                          PromptTruncatedWarning, stacklevel=2)
        ids = [tokens.input_ids]
        if do_cfg:
            negative = self.tokenizer.encode(negative_prompt or "")
            ids.insert(0, negative.input_ids)
        t0 = time.perf_counter()
        embeddings = self._run(self.text_encoder, input_ids=np.stack(ids))["last_hidden_state"]
        timings.text_encoder_s = time.perf_counter() - t0

        # 3. Timesteps from the bundle's scheduler config (no code defaults).
        scheduler = LCMScheduler(self.bundle.scheduler_config)
        if timesteps is None and str(num_inference_steps) in model.default_timesteps:
            # The schedule the exporter tuned for this step count (bundle.json model.default_timesteps).
            timesteps, num_inference_steps = list(model.default_timesteps[str(num_inference_steps)]), None
        schedule = scheduler.set_timesteps(num_inference_steps, timesteps=timesteps)

        # 4. Initial latents: the caller's, or standard normal from a seeded generator.
        if seed is None and (latents is None or noise_fn is None):
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
        rng = np.random.default_rng(seed) if seed is not None else None
        shape = (1, model.latent_channels, num_frames, height // model.vae_scale_factor,
                 width // model.vae_scale_factor)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        latents = latents.astype(np.float32) * np.float32(scheduler.init_noise_sigma)
        if noise_fn is None:
            def noise_fn(_step: int, noise_shape: tuple[int, ...]) -> np.ndarray:
                return rng.standard_normal(noise_shape, dtype=np.float32)

        # 5. The LCM loop: one UNet pass per step without guidance, a batch of two with it.
        denoised = latents
        for i, t in enumerate(schedule):
            check_cancel(f"UNet step {i + 1}/{len(schedule)}")
            t0 = time.perf_counter()
            model_input = np.concatenate([latents, latents]) if do_cfg else latents
            noise_pred = self._run(self.unet, sample=model_input, timestep=np.array([t], np.float32),
                                   encoder_hidden_states=embeddings)["out_sample"]
            if do_cfg:
                uncond, cond = noise_pred[:1], noise_pred[1:]
                noise_pred = uncond + np.float32(guidance_scale) * (cond - uncond)
            last = i == len(schedule) - 1
            noise = None if last else np.asarray(noise_fn(i, latents.shape), dtype=np.float32)
            out = scheduler.step(noise_pred, i, latents, noise)
            latents, denoised = out.prev_sample, out.denoised
            timings.unet_steps_s.append(time.perf_counter() - t0)
            if callback is not None:
                callback(StepInfo(i, len(schedule), int(t), timings.unet_steps_s[-1]))

        # 6. Decode `denoised` in frame chunks so peak memory stays bounded by the chunk.
        t0 = time.perf_counter()
        frames = self.decode(denoised, decode_chunk_size, check_cancel)
        timings.vae_decode_s = time.perf_counter() - t0
        timings.total_s = time.perf_counter() - start

        # 7. The result carries everything needed to reproduce and report the run.
        return GenerationResult(frames=frames, latents=denoised, seed=seed, timings=timings,
                                fps=model.default_fps, truncated_text=tokens.dropped_text,
                                timesteps=tuple(int(t) for t in schedule))

    def decode(self, latents: np.ndarray, chunk_size: int = 4,
               check_cancel: Callable[[str], None] = lambda stage: None) -> np.ndarray:
        """(1, c, f, h, w) latents -> uint8 (f, H, W, 3), as diffusers' decode_latents + postprocess."""
        scaled = latents / np.float32(self.bundle.model.vae_scaling_factor)
        per_frame = scaled[0].transpose(1, 0, 2, 3)  # (f, c, h, w): frames fold into batch
        frames = []
        for begin in range(0, per_frame.shape[0], chunk_size):
            check_cancel(f"VAE decode of frame {begin + 1}")
            chunk = np.ascontiguousarray(per_frame[begin:begin + chunk_size])
            image = self._run(self.vae_decoder, latent_sample=chunk)["sample"]
            image = np.clip(image / 2 + 0.5, 0.0, 1.0)
            frames.append((image.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))
        return np.concatenate(frames)

    @staticmethod
    def _run(session: Session, **arrays: np.ndarray) -> Mapping[str, np.ndarray]:
        # Cast to what the graph takes (fp16 bundles), and hand back float32.
        feeds = {name: np.ascontiguousarray(a, dtype=session.input_dtype(name)) for name, a in arrays.items()}
        return {name: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
                for name, v in session.run(feeds).items()}
