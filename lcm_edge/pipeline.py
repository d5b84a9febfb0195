"""The 4-step text-to-video pipeline on a bundle: numpy + a backend, never torch.

The call is a numbered recipe, as in diffusers' AnimateDiffPipeline, so the two can be
read side by side (and are tested against each other on the same weights).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from .backends import Backend, Session, create_backend
from .backends.base import check_feeds
from .bundle import MAX_SIDE, Bundle, load_bundle
from .errors import GenerationCancelled, GraphInputError, InvalidArgumentError
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
    # This step's x_0 prediction (1, c, f, h, w): what the clip would be if sampling stopped here.
    denoised: np.ndarray | None = None
    # uint8 (f, H, W, 3) frames of `denoised` through the bundle's tiny decoder, with preview=True only.
    preview: np.ndarray | None = None


@dataclass
class Timings:
    text_encoder_s: float = 0.0
    unet_steps_s: list[float] = field(default_factory=list)
    vae_decode_s: float = 0.0
    preview_s: float = 0.0  # tiny-decoder previews of every step (preview=True), included in total_s
    total_s: float = 0.0

    def summary(self) -> str:
        steps = ", ".join(f"{s:.3f}" for s in self.unet_steps_s)
        return (f"text encoder {self.text_encoder_s:.3f} s | unet {sum(self.unet_steps_s):.3f} s "
                f"({len(self.unet_steps_s)} steps: {steps}) | vae decode {self.vae_decode_s:.3f} s | "
                f"total {self.total_s:.3f} s")


@dataclass
class GenerationResult:
    frames: np.ndarray | None  # uint8 (frames, height, width, 3), RGB; None with output_type="latents"
    latents: np.ndarray  # float32 (1, channels, frames, height / f, width / f), the final denoised latents
    seed: int | None  # None when the caller supplied both latents and noise_fn
    timings: Timings
    fps: int
    truncated_text: str  # the part of the prompt the tokenizer dropped ("" when none)
    timesteps: tuple[int, ...]  # the schedule sampled (a bundle's default_timesteps apply to a step count)

    def save(self, path: str | os.PathLike, fps: int | None = None) -> Path:
        """Write .mp4 or .gif (by extension); the file appears only when complete."""
        if self.frames is None:
            raise InvalidArgumentError("output_type", "the generation ran with output_type='latents', so it has "
                                       "no frames to save", "decode first (pipe.decode(result.latents)) and save "
                                       "those frames with lcm_edge.save_video, or generate with output_type='frames'")
        return save_video(self.frames, path, self.fps if fps is None else fps)


def _check_int(name: str, value, low: int, high: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(name, f"{value!r} is not an integer", fix)
    if not low <= value <= high:
        raise InvalidArgumentError(name, f"{value} is outside [{low}, {high}]", fix)
    return int(value)


OUTPUT_TYPES = ("frames", "latents")


def seeded_draws(seed: int, shape: tuple[int, ...], latents: np.ndarray | None = None,
                 noise_fn: NoiseFn | None = None) -> tuple[np.ndarray, NoiseFn]:
    """The initial latents and the per-step noise of a seeded generation, drawing only what the caller
    did not give, from one generator (latents first, then each step's noise in order).

    Public so that a reference implementation (lcm_edge.export.reference) replays exactly the draws a
    seeded call makes.
    """
    rng = np.random.default_rng(seed)
    if latents is None:
        latents = rng.standard_normal(shape, dtype=np.float32)
    if noise_fn is None:
        def noise_fn(_step: int, noise_shape: tuple[int, ...]) -> np.ndarray:
            return rng.standard_normal(noise_shape, dtype=np.float32)

    return latents, noise_fn


def sampling_timesteps(bundle: Bundle, num_inference_steps: int | None, timesteps: list[int] | None = None,
                       scheduler: LCMScheduler | None = None) -> np.ndarray:
    """Set and return the schedule a call samples: explicit timesteps, else the bundle's tuned schedule for
    that step count (bundle.json model.default_timesteps), else LCM's spacing from the scheduler config."""
    scheduler = LCMScheduler(bundle.scheduler_config) if scheduler is None else scheduler
    if timesteps is None and str(num_inference_steps) in bundle.model.default_timesteps:
        timesteps, num_inference_steps = list(bundle.model.default_timesteps[str(num_inference_steps)]), None
    return scheduler.set_timesteps(num_inference_steps, timesteps=timesteps)


def check_inputs(bundle: Bundle, prompt, negative_prompt=None, num_frames=None, height=None, width=None,
                 num_inference_steps=4, timesteps=None, guidance_scale=1.0, seed=None, latents=None,
                 noise_fn=None, decode_chunk_size=4, callback=None, cancel_event=None,
                 output_type="frames", decoder="full", preview=False) -> None:
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
        _check_int(name, value, model.size_multiple, MAX_SIDE, f"use a multiple of {model.size_multiple}")
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
    if output_type not in OUTPUT_TYPES:
        raise InvalidArgumentError("output_type", f"unknown {output_type!r}",
                                   f"use one of {list(OUTPUT_TYPES)} ('latents' skips the VAE decode)")
    _decoder_component(bundle, decoder)
    if not isinstance(preview, bool):
        raise InvalidArgumentError("preview", f"{preview!r} is not a bool", "pass True or False")
    if preview:
        if callback is None:
            raise InvalidArgumentError("preview", "asked without a callback to receive the frames",
                                       "pass callback=f(StepInfo) and read step.preview")
        _decoder_component(bundle, "tiny", argument="preview")


DECODERS = {"full": "vae_decoder", "tiny": "vae_decoder_tiny"}


def _decoder_component(bundle: Bundle, decoder, argument: str = "decoder") -> str:
    """The bundle component that `decoder` ("full" or "tiny") names; the tiny one is optional."""
    if decoder not in DECODERS:
        raise InvalidArgumentError(argument, f"unknown decoder {decoder!r}", f"use one of {list(DECODERS)}")
    if DECODERS[decoder] not in bundle.components:
        raise InvalidArgumentError(argument, f"the bundle {bundle.root} has no tiny decoder (vae_decoder_tiny)",
                                   "add one (lcm_edge.export.add_tiny_decoder(bundle, weights)) or distill one "
                                   "(lcm_edge.distill.decoder), or use decoder='full' without previews")
    return DECODERS[decoder]


class Component:
    """One bundle graph on a backend: open for the pipeline's life, or (low_memory) opened when a call
    needs it and closed when the last call using it is done, so threads sharing a pipeline never see
    a graph closed under them."""

    def __init__(self, backend: Backend, bundle: Bundle, name: str, keep_open: bool):
        self._open = lambda: backend.open(bundle.root, bundle.components[name])
        self.keep_open = keep_open
        self._session: Session | None = self._open() if keep_open else None
        self._users = 0
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._session is not None

    def session(self) -> Session:
        """The open session; with low_memory and no call running, a new one for inspection (not kept)."""
        with self._lock:
            return self._session if self._session is not None else self._open()

    @contextmanager
    def use(self) -> Iterator[Session]:
        with self._lock:
            if self._session is None:
                self._session = self._open()
            self._users += 1
            session = self._session
        try:
            yield session
        finally:
            with self._lock:
                self._users -= 1
                if not self.keep_open and self._users == 0:
                    self._session.close()
                    self._session = None


def create_runtime(bundle: Bundle, backend: str = "onnxruntime", device: str | None = None, *,
                   precision: str | None = None, low_memory: bool = False, **backend_options) -> Backend:
    """The backend for `bundle`; precision="auto" picks the fastest precision the device computes in that
    passed lcm_edge.precision's fidelity gate for this bundle on this machine, else f32 (describe() says)."""
    if not isinstance(low_memory, bool):
        raise InvalidArgumentError("low_memory", f"{low_memory!r} is not a bool", "pass True or False")
    if precision != "auto":
        return create_backend(backend, device, precision=precision, low_memory=low_memory, **backend_options)
    from .precision import auto_precision

    runtime = create_backend(backend, device, low_memory=low_memory, **backend_options)
    chosen, note = auto_precision(bundle, runtime)
    if chosen != runtime.precision:
        runtime = create_backend(backend, device, precision=chosen, low_memory=low_memory, **backend_options)
    runtime.precision_note = note
    return runtime


def _check_static_shape(session: Session, shapes: Mapping[str, tuple[int, ...]], arguments: Mapping[int, str]) -> None:
    """A size the graph fixes otherwise is an InvalidArgumentError naming the generation argument behind the axis."""
    try:
        check_feeds(session.name, session.inputs, {spec.name: np.empty(shapes[spec.name], np.dtype(spec.dtype))
                                                   for spec in session.inputs})
    except GraphInputError as exc:
        axis = next((a for a in arguments if f"axis {a} " in str(exc)), None)
        raise InvalidArgumentError(arguments.get(axis, "num_frames/height/width"), f"the bundle's graph cannot take "
                                   f"this size ({exc})", "use the size the bundle was exported for") from exc


class AnimateLCMPipeline:
    """Text to video with an AnimateLCM bundle.

    >>> pipe = AnimateLCMPipeline.from_bundle("bundle/", backend="onnxruntime", device="cpu")
    >>> pipe("a red circle moving right", num_frames=16, seed=0).save("clip.mp4")

    Threads may share one pipeline: each call keeps its state (scheduler, generator) to itself and
    the backends' sessions take concurrent runs; the same seed gives the same frames as a serial call.
    low_memory=True opens each graph when a call needs it and closes it after (the text encoder before
    the UNet runs, the UNet before decoding), decodes one frame at a time by default, and turns off
    onnxruntime's memory arena / keeps one compiled shape per OpenVINO graph: less peak RAM, and every
    call pays the graphs' load (and, on OpenVINO without a cache_dir, compile) time.
    """

    def __init__(self, bundle: Bundle, backend: Backend, *, low_memory: bool | None = None):
        self.bundle = bundle
        self.backend = backend
        self.low_memory = backend.low_memory if low_memory is None else low_memory
        self.tokenizer = CLIPTokenizer.from_folder(bundle.tokenizer_dir)
        self.components = {name: Component(backend, bundle, name, keep_open=not self.low_memory)
                           for name in ("text_encoder", "unet", "vae_decoder", "vae_decoder_tiny")
                           if name in bundle.components}

    @property
    def text_encoder(self) -> Session:
        return self.components["text_encoder"].session()

    @property
    def unet(self) -> Session:
        return self.components["unet"].session()

    @property
    def vae_decoder(self) -> Session:
        return self.components["vae_decoder"].session()

    @classmethod
    def from_bundle(cls, path: str | os.PathLike, *, backend: str = "onnxruntime", device: str | None = None,
                    verify_checksums: bool = True, precision: str | None = None, low_memory: bool = False,
                    **backend_options) -> "AnimateLCMPipeline":
        """Verify the bundle, then compile its graphs on `backend` / `device`.

        precision: "f32" (the default), "bf16"/"f16" (OpenVINO, where the device computes in it) or "auto".
        low_memory: see the class docstring.
        backend_options go to the backend: onnxruntime takes threads, optimization, memory_arena,
        provider_options; openvino takes cache_dir, performance_hint, static_shapes, shape_cache_size,
        max_infer_requests, mmap_weights, config.
        """
        bundle = load_bundle(path, verify_checksums=verify_checksums)
        runtime = create_runtime(bundle, backend, device, precision=precision, low_memory=low_memory,
                                 **backend_options)
        return cls(bundle, runtime, low_memory=low_memory)

    def prepare(self, *, num_frames: int | None = None, height: int | None = None, width: int | None = None,
                guidance_scale: float = 1.0, decode_chunk_size: int | None = None) -> None:
        """Check a generation size against the bundle and every graph's own input shapes, then compile for it
        where the backend compiles per shape (OpenVINO's static shapes; an NPU needs this), so the first call
        at that size does not pay the compile. A size a graph cannot take is an InvalidArgumentError naming
        the argument, before anything compiles."""
        model = self.bundle.model
        num_frames = model.default_frames if num_frames is None else num_frames
        height = model.default_height if height is None else height
        width = model.default_width if width is None else width
        decode_chunk_size = self._chunk_size(decode_chunk_size)
        check_inputs(self.bundle, "", num_frames=num_frames, height=height, width=width,
                     guidance_scale=guidance_scale, decode_chunk_size=decode_chunk_size)
        batch, f = (2 if guidance_scale > 1.0 else 1), model.vae_scale_factor
        shapes = {
            "text_encoder": ({"input_ids": (batch, model.text_max_length)}, {0: "guidance_scale"}),
            "unet": ({"sample": (batch, model.latent_channels, num_frames, height // f, width // f),
                      "timestep": (1,), "encoder_hidden_states": (batch, model.text_max_length, model.text_hidden_size)},
                     {0: "guidance_scale", 2: "num_frames", 3: "height", 4: "width"}),
            "vae_decoder": ({"latent_sample": (min(decode_chunk_size, num_frames), model.latent_channels,
                                               height // f, width // f)},
                            {0: "decode_chunk_size", 2: "height", 3: "width"}),
        }
        for name, (graph_shapes, arguments) in shapes.items():
            with self.components[name].use() as session:
                _check_static_shape(session, graph_shapes, arguments)
        for name, (graph_shapes, _) in shapes.items():
            with self.components[name].use() as session:
                session.prepare(graph_shapes)

    def _chunk_size(self, decode_chunk_size: int | None) -> int:
        # low_memory decodes one frame at a time: the decoder's activations are the peak at large sizes.
        if decode_chunk_size is None:
            return 1 if self.low_memory else 4
        return decode_chunk_size

    # ---------------------------------------------------------------- call
    def __call__(self, prompt: str, *, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = 4, guidance_scale: float = 1.0,
                 negative_prompt: str | None = None, seed: int | None = None, latents: np.ndarray | None = None,
                 timesteps: list[int] | None = None, noise_fn: NoiseFn | None = None,
                 decode_chunk_size: int | None = None, callback: Callable[[StepInfo], None] | None = None,
                 cancel_event: threading.Event | None = None, output_type: str = "frames", decoder: str = "full",
                 preview: bool = False) -> GenerationResult:
        """decoder: "full" (the VAE decoder) or "tiny" (the bundle's vae_decoder_tiny) for the final frames.
        preview=True: every step's x_0 prediction goes through the tiny decoder to the callback as StepInfo.preview
        (uint8 frames), so an app can show the clip forming."""
        model = self.bundle.model
        decode_chunk_size = self._chunk_size(decode_chunk_size)  # 4 frames, 1 with low_memory
        num_frames = model.default_frames if num_frames is None else num_frames
        height = model.default_height if height is None else height
        width = model.default_width if width is None else width

        # 1. Check every input before any work is done.
        check_inputs(self.bundle, prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                     timesteps, guidance_scale, seed, latents, noise_fn, decode_chunk_size, callback, cancel_event,
                     output_type, decoder, preview)
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
        with self.components["text_encoder"].use() as text_encoder:  # closed here with low_memory
            embeddings = self._run(text_encoder, input_ids=np.stack(ids))["last_hidden_state"]
        timings.text_encoder_s = time.perf_counter() - t0
        check_cancel("text encoding")

        # 3. Timesteps from the bundle's scheduler config (no code defaults).
        scheduler = LCMScheduler(self.bundle.scheduler_config)
        schedule = sampling_timesteps(self.bundle, num_inference_steps, timesteps, scheduler)

        # 4. Initial latents: the caller's, or standard normal from a seeded generator.
        if seed is None and (latents is None or noise_fn is None):
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
        shape = (1, model.latent_channels, num_frames, height // model.vae_scale_factor,
                 width // model.vae_scale_factor)
        if latents is None or noise_fn is None:
            latents, noise_fn = seeded_draws(seed, shape, latents, noise_fn)
        latents = latents.astype(np.float32) * np.float32(scheduler.init_noise_sigma)

        # 5. The LCM loop: one UNet pass per step without guidance, a batch of two with it.
        denoised = latents
        with self.components["unet"].use() as unet:  # closed before decoding with low_memory
            for i, t in enumerate(schedule):
                check_cancel(f"UNet step {i + 1}/{len(schedule)}")
                t0 = time.perf_counter()
                model_input = np.concatenate([latents, latents]) if do_cfg else latents
                noise_pred = self._run(unet, sample=model_input, timestep=np.array([t], np.float32),
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
                    preview_frames = None
                    if preview:
                        t0 = time.perf_counter()
                        preview_frames = self.decode(denoised, decode_chunk_size, check_cancel, decoder="tiny")
                        timings.preview_s += time.perf_counter() - t0
                    callback(StepInfo(i, len(schedule), int(t), timings.unet_steps_s[-1], denoised, preview_frames))

        # 6. Decode `denoised` in frame chunks so peak memory stays bounded by the chunk
        #    (output_type="latents": the caller decodes, e.g. a subset of frames or elsewhere).
        frames = None
        if output_type == "frames":
            t0 = time.perf_counter()
            frames = self.decode(denoised, decode_chunk_size, check_cancel, decoder=decoder)
            timings.vae_decode_s = time.perf_counter() - t0
        timings.total_s = time.perf_counter() - start

        # 7. The result carries everything needed to reproduce and report the run.
        return GenerationResult(frames=frames, latents=denoised, seed=seed, timings=timings,
                                fps=model.default_fps, truncated_text=tokens.dropped_text,
                                timesteps=tuple(int(t) for t in schedule))

    def decode(self, latents: np.ndarray, chunk_size: int = 4,
               check_cancel: Callable[[str], None] = lambda stage: None, *, decoder: str = "full") -> np.ndarray:
        """(1, c, f, h, w) latents -> uint8 (f, H, W, 3), as diffusers' decode_latents + postprocess.
        decoder: "full" or "tiny" (both graphs take latents / vae_scaling_factor, give [-1, 1] images)."""
        component = _decoder_component(self.bundle, decoder)
        scaled = latents / np.float32(self.bundle.model.vae_scaling_factor)
        per_frame = scaled[0].transpose(1, 0, 2, 3)  # (f, c, h, w): frames fold into batch
        frames = []
        with self.components[component].use() as vae_decoder:
            for begin in range(0, per_frame.shape[0], chunk_size):
                check_cancel(f"VAE decode of frame {begin + 1}")
                chunk = np.ascontiguousarray(per_frame[begin:begin + chunk_size])
                image = self._run(vae_decoder, latent_sample=chunk)["sample"]
                image = np.clip(image / 2 + 0.5, 0.0, 1.0)
                frames.append((image.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))
        return np.concatenate(frames)

    @staticmethod
    def _run(session: Session, **arrays: np.ndarray) -> Mapping[str, np.ndarray]:
        # Cast to what the graph takes (fp16 bundles), and hand back float32.
        feeds = {name: np.ascontiguousarray(a, dtype=session.input_dtype(name)) for name, a in arrays.items()}
        return {name: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
                for name, v in session.run(feeds).items()}
