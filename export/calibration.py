"""Calibration data for INT8: graph inputs recorded from the runtime's own sampling loop.

The UNet of a 4-step model sees four very different inputs per clip (pure noise at t=999, then
ever sharper re-noised predictions), so calibrating on random tensors or on noised data misses
the activation ranges that matter. Here the fp32 bundle runs `lcm_edge.AnimateLCMPipeline`
itself (its scheduler, its `default_timesteps`) and every UNet feed is written to disk as it
happens (one .npz per UNet pass), so quantizing a full-size UNet holds one sample in memory at
a time. Text-encoder inputs are the same prompts' token ids.
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from lcm_edge.backends import Backend, Session
from lcm_edge.bundle import Bundle
from lcm_edge.errors import InvalidArgumentError

# Seeds of calibration clips start here: disjoint from the default-model evaluation's 10000+ and 30000+.
CALIBRATION_SEED_BASE = 50_000
# Held-out inputs for the per-step gate are recorded at seeds from here (never used for calibration).
HELD_OUT_SEED_BASE = 70_000
DEFAULT_PROMPTS_FILE = Path(__file__).with_name("calibration_prompts_default_model.txt")
SAMPLE_FILE_PATTERN = "unet-{:05d}.npz"


@dataclass(frozen=True)
class PromptFile:
    path: Path
    prompts: tuple[str, ...]
    sha256: str


def read_prompts(path: str | os.PathLike, argument: str = "calibration_prompts") -> PromptFile:
    """One prompt a line; blank lines and lines starting with # are skipped. Empty or unreadable: typed error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(argument, f"cannot read '{path}' ({exc})",
                                   "pass a UTF-8 text file with one prompt a line") from exc
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise InvalidArgumentError(argument, f"'{path}' holds no prompts",
                                   "write one prompt a line (lines starting with # are comments)")
    return PromptFile(path, prompts, hashlib.sha256(raw).hexdigest())


@dataclass(frozen=True)
class CalibrationPlan:
    """What is recorded: `samples` UNet passes over clips of frames x height x width."""

    samples: int
    frames: int
    height: int
    width: int
    steps: int
    timesteps: tuple[int, ...]
    guidance_scale: float | None  # every other clip guided at this scale (batch 2), or None: all CFG-free

    def clips_needed(self) -> int:
        return math.ceil(self.samples / self.steps)

    def latent_shape(self, bundle: Bundle, batch: int = 1) -> tuple[int, ...]:
        m = bundle.model
        return (batch, m.latent_channels, self.frames, self.height // m.vae_scale_factor,
                self.width // m.vae_scale_factor)

    def sample_bytes(self, bundle: Bundle) -> int:
        """Bytes of one recorded UNet feed (the largest: a guided batch of 2 when guidance is on)."""
        batch = 2 if self.guidance_scale else 1
        m = bundle.model
        return 4 * (int(np.prod(self.latent_shape(bundle, batch))) + 1 + batch * m.text_max_length * m.text_hidden_size)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "frames": self.frames, "height": self.height, "width": self.width,
                "steps": self.steps, "timesteps": list(self.timesteps), "guidance_scale": self.guidance_scale}


def plan_calibration(bundle: Bundle, *, samples: int, frames: int | None, height: int | None, width: int | None,
                     steps: int = 4, guidance_scale: float | None = None) -> CalibrationPlan:
    """Check the shapes against the bundle (typed errors naming the argument) and fix the timesteps sampled."""
    from lcm_edge.pipeline import check_inputs
    from lcm_edge.scheduler import LCMScheduler

    m = bundle.model
    frames = m.default_frames if frames is None else frames
    height = m.default_height if height is None else height
    width = m.default_width if width is None else width
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidArgumentError("samples", f"{samples!r} is not a positive integer",
                                   "record e.g. 200 UNet inputs (the published 4-step recipes use 200)")
    if guidance_scale is not None and (not isinstance(guidance_scale, (int, float)) or guidance_scale <= 1.0):
        raise InvalidArgumentError("guidance_scale", f"{guidance_scale!r} is not above 1",
                                   "pass e.g. 1.8 to add guided batches, or None for CFG-free calibration only")
    # The runtime's own check names num_frames/height/width and the fix.
    check_inputs(bundle, "", num_frames=frames, height=height, width=width, num_inference_steps=steps)
    if str(steps) in m.default_timesteps:
        timesteps = tuple(m.default_timesteps[str(steps)])
    else:
        timesteps = tuple(int(t) for t in LCMScheduler(bundle.scheduler_config).set_timesteps(steps))
    return CalibrationPlan(samples, frames, height, width, steps, timesteps,
                           None if guidance_scale is None else float(guidance_scale))


class _RecordingSession:
    """Stands in for the pipeline's UNet session: hands every feed to `sink`, then runs the real graph."""

    def __init__(self, inner: Session, sink):
        self._inner = inner
        self._sink = sink

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._sink(feeds)
        return self._inner.run(feeds)


class _RecordingComponent:
    """Stands in for the pipeline's UNet component (pipeline.Component): its sessions record their feeds."""

    def __init__(self, inner, sink):
        self._inner = inner
        self._sink = sink

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def session(self):
        return _RecordingSession(self._inner.session(), self._sink)

    @contextmanager
    def use(self):
        with self._inner.use() as session:
            yield _RecordingSession(session, self._sink)


@dataclass
class UNetCalibrationSet:
    """UNet feeds on disk, read back one at a time (never all in memory)."""

    folder: Path
    count: int
    plan: CalibrationPlan
    seed_base: int

    def paths(self) -> list[Path]:
        return [self.folder / SAMPLE_FILE_PATTERN.format(i) for i in range(self.count)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.folder / SAMPLE_FILE_PATTERN.format(index)) as data:
            return {key: data[key] for key in data.files}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(self.count):
            yield self[index]


def record_unet_inputs(bundle: Bundle, backend: Backend, prompts: Sequence[str], plan: CalibrationPlan,
                       folder: Path, *, seed_base: int = CALIBRATION_SEED_BASE,
                       count: int | None = None) -> UNetCalibrationSet:
    """Sample clips with the runtime's pipeline and write each UNet feed to `folder` as it happens.

    Clip i uses prompt i (cycling through `prompts`) at seed `seed_base + i`; with guidance, odd clips
    are guided (batch 2: empty negative prompt, then the prompt, as the pipeline does it).
    """
    from lcm_edge.pipeline import AnimateLCMPipeline

    count = plan.samples if count is None else count
    folder.mkdir(parents=True, exist_ok=True)
    pipe = AnimateLCMPipeline(bundle, backend)
    written = 0

    def sink(feeds: Mapping[str, np.ndarray]) -> None:
        nonlocal written
        if written < count:
            np.savez(folder / SAMPLE_FILE_PATTERN.format(written), **{k: np.asarray(v) for k, v in feeds.items()})
            written += 1

    original = pipe.components["unet"]
    pipe.components["unet"] = _RecordingComponent(original, sink)
    try:
        clip = 0
        while written < count:
            guided = plan.guidance_scale is not None and clip % 2 == 1
            pipe(prompts[clip % len(prompts)], num_frames=plan.frames, height=plan.height, width=plan.width,
                 num_inference_steps=None, timesteps=list(plan.timesteps),
                 guidance_scale=plan.guidance_scale if guided else 1.0, seed=seed_base + clip,
                 output_type="latents")  # the UNet feeds are all it needs: no decode
            clip += 1
    finally:
        pipe.components["unet"] = original
    return UNetCalibrationSet(folder, count, plan, seed_base)


def text_encoder_inputs(bundle: Bundle, prompts: Sequence[str], *, with_negative: bool = False) -> list[dict]:
    """Token ids of the calibration prompts (and the empty negative prompt when guided batches are recorded)."""
    from lcm_edge.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_folder(bundle.tokenizer_dir)
    texts = list(prompts) + ([""] if with_negative else [])
    return [{"input_ids": tokenizer.encode(text).input_ids[None].astype(np.int64)} for text in texts]
