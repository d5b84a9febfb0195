"""Distill a tiny decoder (TAESD architecture: diffusers' DecoderTiny) for any bundle, offline, on Accelerate.

    lcm-edge distill decoder --bundle BUNDLE --config decoder.toml [--out COPY]

As TAESD is made: the student learns to reproduce the full VAE decoder's images from latents. Here the teacher
is the bundle's own `vae_decoder` graph on onnxruntime (no torch VAE needed), and the latents come from the
bundle's own sampler: random prompts from the config at seeds data.seed_base + i, keeping each clip's final
latents and, with data.intermediate, every step's x_0 prediction too (the blurred latents a live preview
decodes), plus any user latents (.npy, the diffusion model's latents, i.e. already times the VAE scaling
factor). A bundle has no VAE encoder, so images and videos enter only as latents someone encoded.

    1. data     sample, decode with the teacher, store latents + teacher images (data/, made once, reused on
                resume); held-out clips at data.holdout_seed_base, never trained on
    2. train    L1 / L2 in pixel space, AdamW, Accelerate (CPU, one GPU or DDP); checkpoints as the other
                stages (train.resume = "latest" | "auto" | a checkpoint), random draws seeded by
                (seed, step, micro-batch, rank) so a resumed run repeats the uninterrupted one
    3. weights  tiny_decoder/ in both layouts (diffusers AutoencoderTiny folder and taesd_decoder.safetensors)
    4. gate     the exporter's parity gates and its fidelity gate on the held-out clips (PSNR >= gate.min_psnr_db,
                flicker within gate.flicker_margin of the full decoder's); only a decoder that passes is added
                to the bundle (or to a copy at --out), through lcm_edge.export.tiny_decoder.add_tiny_decoder

The student decodes each frame alone. Temporal context (a decoder that sees neighbouring frames) would only pay
if the per-frame student flickered more than the full decoder; gate.json records the two flickers
(mean |frame t+1 - frame t|). On the default model the per-frame student flickers less than the full decoder
(0.0125 against 0.0138 on the 8 held-out clips: it smooths a little), so there is no excess for temporal context
to remove, and the shipped decoder stays per-frame.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import TrainConfig, _build, _choice, _positive, _positive_int, _nonnegative_int, _toml_module
from .errors import ConfigError, DatasetError

DATA_DIR = "data"
WEIGHTS_DIR = "tiny_decoder"
GATE_FILE = "gate.json"
LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class ArchitectureConfig:
    """DecoderTiny's shape. TAESD: 64 channels, blocks (3, 3, 3, 1), 8x upsampling. The stage count sets the
    upsampling (upsampling_scaling_factor ** (stages - 1)), which must equal the bundle's vae_scale_factor."""

    block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_blocks: tuple[int, ...] = (3, 3, 3, 1)
    upsampling_scaling_factor: int = 2
    act_fn: str = "relu"

    def validate(self, key: str) -> None:
        if len(self.block_out_channels) != len(self.num_blocks) or not self.block_out_channels:
            raise ConfigError(f"{key}.num_blocks", f"{len(self.num_blocks)} stages, block_out_channels has "
                              f"{len(self.block_out_channels)}", "give one block count per stage")
        if len(set(self.block_out_channels)) != 1:
            raise ConfigError(f"{key}.block_out_channels", f"{list(self.block_out_channels)} differ; DecoderTiny "
                              "feeds each stage's output to the next unchanged", "use one width, e.g. [16, 16, 16]")
        _positive_int(f"{key}.block_out_channels", self.block_out_channels[0])
        for n in self.num_blocks:
            _nonnegative_int(f"{key}.num_blocks", n)
        _positive_int(f"{key}.upsampling_scaling_factor", self.upsampling_scaling_factor)
        _choice(f"{key}.act_fn", self.act_fn, ("relu", "silu", "gelu", "mish"))


@dataclass(frozen=True)
class LatentDataConfig:
    """Where the training latents come from: the bundle's own sampler, plus optional user latents."""

    prompts: tuple[str, ...]
    clips: int = 48
    steps: tuple[int, ...] = (4,)  # sampling step counts, one drawn per clip
    intermediate: bool = True  # also every step's x_0 prediction (what previews decode)
    num_frames: int | None = None  # default: the bundle's
    height: int | None = None
    width: int | None = None
    seed_base: int = 0
    holdout_clips: int = 8
    holdout_seed_base: int = 1_000_000  # never a training seed
    latents: tuple[str, ...] = ()  # .npy files: (n, c, h, w) frames or (n, c, f, h, w) clips, diffusion latents
    threads: int | None = None  # onnxruntime threads for sampling and the teacher

    def validate(self, key: str) -> None:
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ConfigError(f"{key}.prompts", "is empty or has an empty prompt",
                              "list prompts in the bundle's domain, e.g. [\"a red circle moving right\"]")
        _positive_int(f"{key}.clips", self.clips)
        for s in self.steps:
            _positive_int(f"{key}.steps", s)
        _nonnegative_int(f"{key}.seed_base", self.seed_base)
        _positive_int(f"{key}.holdout_clips", self.holdout_clips)
        _nonnegative_int(f"{key}.holdout_seed_base", self.holdout_seed_base)
        if self.holdout_seed_base < self.seed_base + self.clips and self.seed_base < \
                self.holdout_seed_base + self.holdout_clips:
            raise ConfigError(f"{key}.holdout_seed_base", f"held-out seeds {self.holdout_seed_base}.."
                              f"{self.holdout_seed_base + self.holdout_clips - 1} overlap the training seeds "
                              f"{self.seed_base}..{self.seed_base + self.clips - 1}", "move one range")
        if self.threads is not None:
            _positive_int(f"{key}.threads", self.threads)


@dataclass(frozen=True)
class GateConfig:
    min_psnr_db: float | None = None  # None: TINY_DECODER_MIN_PSNR_DB
    flicker_margin: float | None = None  # None: TINY_DECODER_FLICKER_MARGIN

    def validate(self, key: str) -> None:
        if self.min_psnr_db is not None:
            _positive(f"{key}.min_psnr_db", self.min_psnr_db)
        if self.flicker_margin is not None and not (math.isfinite(self.flicker_margin) and self.flicker_margin >= 0):
            raise ConfigError(f"{key}.flicker_margin", f"{self.flicker_margin} is not >= 0", "use e.g. 0.004")


@dataclass(frozen=True)
class DecoderDistillConfig:
    train: TrainConfig
    data: LatentDataConfig
    decoder: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    loss: str = "l1"  # pixel loss against the teacher's [-1, 1] images

    def __post_init__(self) -> None:
        self.train.validate("train")
        self.data.validate("data")
        self.decoder.validate("decoder")
        self.gate.validate("gate")
        _choice("loss", self.loss, LOSSES)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as the file has them

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def replace(self, **sections: Any) -> "DecoderDistillConfig":
        d = self.to_dict()
        for name, value in sections.items():
            d[name] = {**d[name], **value} if isinstance(value, dict) and isinstance(d.get(name), dict) else value
        return decoder_config_from_dict(d)


def decoder_config_from_dict(raw: Any) -> DecoderDistillConfig:
    return _build(DecoderDistillConfig, raw, "")


def load_decoder_config(path: str | Path) -> DecoderDistillConfig:
    """Read a .json or .toml decoder-distillation config; every key is checked (ConfigError names it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"{path} does not exist", "pass the path of a .json or .toml config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        elif path.suffix == ".toml":
            raw = _toml_module().loads(text)
        else:
            raise ConfigError("--config", f"{path} has suffix {path.suffix!r}", "use a .json or .toml file")
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("--config", f"{path} cannot be read ({exc})", "fix the file") from exc
    if isinstance(raw, dict) and raw.get("stage", "decoder") != "decoder":
        raise ConfigError("stage", f"the file says {raw['stage']!r}", "use a decoder config (no stage key)")
    return decoder_config_from_dict({k: v for k, v in raw.items() if k != "stage"} if isinstance(raw, dict) else raw)


# ----------------------------------------------------------------------------------------------
# 1. Data


@dataclass
class LatentData:
    latents: np.ndarray  # (n, c, h, w) diffusion latents, one frame each
    images: np.ndarray  # (n, 3, H, W) float16: the teacher's images in [-1, 1]
    holdout: np.ndarray  # (k, c, f, h, w) final latents of held-out clips
    info: dict


def _teacher_images(teacher, latents: np.ndarray, scaling: float, chunk: int = 16) -> np.ndarray:
    out = []
    for i in range(0, len(latents), chunk):
        feed = np.ascontiguousarray(latents[i:i + chunk] / np.float32(scaling), dtype=np.float32)
        out.append(teacher.run({"latent_sample": feed})["sample"].astype(np.float16))
    return np.concatenate(out)


def _sample_clips(pipe, cfg: LatentDataConfig, count: int, seed_base: int, *, intermediate: bool,
                  generator: np.random.Generator) -> list[np.ndarray]:
    """Per clip: (k, c, f, h, w) latents, the final one last (k = steps with intermediate, else 1)."""
    from lcm_edge.pipeline import PromptTruncatedWarning

    clips = []
    for i in range(count):
        prompt = cfg.prompts[int(generator.integers(len(cfg.prompts)))]
        steps = cfg.steps[int(generator.integers(len(cfg.steps)))]
        seen: list[np.ndarray] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)  # the latents are what counts here
            result = pipe(prompt, num_frames=cfg.num_frames, height=cfg.height, width=cfg.width,
                          num_inference_steps=steps, seed=seed_base + i,
                          callback=(lambda step: seen.append(step.denoised)) if intermediate else None)
        kept = seen[:-1] if intermediate else []
        clips.append(np.concatenate(kept + [result.latents]))
    return clips


def _user_latents(paths: tuple[str, ...], model) -> list[np.ndarray]:
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise DatasetError(path, "latents file does not exist", "fix data.latents")
        array = np.load(path, allow_pickle=False)
        if array.ndim == 5:  # clips (n, c, f, h, w) -> frames
            array = array.transpose(0, 2, 1, 3, 4).reshape(-1, *array.shape[1:2], *array.shape[3:])
        if array.ndim != 4 or array.shape[1] != model.latent_channels or not np.isfinite(array).all():
            raise DatasetError(path, f"shape {array.shape}: expected finite (n, {model.latent_channels}, h, w) or "
                               f"(n, {model.latent_channels}, f, h, w) latents", "save the diffusion model's latents")
        out.append(array.astype(np.float32))
    return out


def prepare_data(bundle, cfg: DecoderDistillConfig, folder: Path) -> LatentData:
    """Make (or reuse) the training and held-out latents with the teacher's images under `folder`."""
    from lcm_edge.backends import create_backend
    from lcm_edge.pipeline import AnimateLCMPipeline

    meta_path = folder / "data.json"
    settings = {k: v for k, v in cfg.to_dict()["data"].items() if k != "threads"}  # threads change no latent
    wanted = {"data": settings, "bundle_files": {k: v.sha256 for k, v in bundle.files.items()
                                                               if k.startswith("vae_decoder/") or k.startswith("unet/")}}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["made_from"] != wanted:
            raise ConfigError("data", f"{folder} holds latents made with other data settings or another bundle",
                              "use a new train.output_dir, or the data settings and bundle it was made with")
        return LatentData(np.load(folder / "latents.npy"), np.load(folder / "images.npy"),
                          np.load(folder / "holdout.npy"), meta)
    start = time.perf_counter()
    d = cfg.data
    options = {"threads": d.threads} if d.threads else {}
    backend = create_backend("onnxruntime", "cpu", **options)
    pipe = AnimateLCMPipeline(bundle, backend)
    train_clips = _sample_clips(pipe, d, d.clips, d.seed_base, intermediate=d.intermediate,
                                generator=np.random.default_rng([d.seed_base, 0]))
    holdout = _sample_clips(pipe, d, d.holdout_clips, d.holdout_seed_base, intermediate=False,
                            generator=np.random.default_rng([d.holdout_seed_base, 1]))
    frames = [c.transpose(0, 2, 1, 3, 4).reshape(-1, *c.shape[1:2], *c.shape[3:]) for c in train_clips]
    frames += _user_latents(d.latents, bundle.model)
    shapes = {f.shape[1:] for f in frames}
    if len(shapes) != 1:
        raise DatasetError(str(d.latents), f"latent sizes {sorted(shapes)} differ from the sampled clips'",
                           "give user latents at the size data.height/width sample")
    latents = np.concatenate(frames)
    teacher = backend.open(bundle.root, bundle.components["vae_decoder"])
    images = _teacher_images(teacher, latents, bundle.model.vae_scaling_factor)
    held = np.concatenate(holdout)  # (k, c, f, h, w): one final latent per clip
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "latents.npy", latents)
    np.save(tmp / "images.npy", images)
    np.save(tmp / "holdout.npy", held)
    meta = {"made_from": wanted, "frames": int(len(latents)), "holdout_clips": int(len(held)),
            "latent_std": float(latents.std()), "seconds": time.perf_counter() - start}
    (tmp / "data.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return LatentData(latents, images, held, meta)


# ----------------------------------------------------------------------------------------------
# 2-4. Train, save, gate


@dataclass
class DecoderDistillResult:
    output_dir: Path
    global_step: int
    losses: dict[int, float]
    seconds_per_step: float
    weights: Path | None  # tiny_decoder/ (both layouts)
    bundle: Path | None  # where the decoder was added (None: gate failed or add=False)
    gate: dict | None  # fidelity figures on the held-out clips


def architecture_for(bundle, arch: ArchitectureConfig) -> dict:
    """The AutoencoderTiny decoder config of `arch` for this bundle; ConfigError when it cannot fit."""
    from lcm_edge.export.tiny_decoder import decoder_config

    upscale = arch.upsampling_scaling_factor ** (len(arch.num_blocks) - 1)
    if upscale != bundle.model.vae_scale_factor:
        stages = round(math.log(bundle.model.vae_scale_factor, arch.upsampling_scaling_factor)) + 1
        raise ConfigError("decoder.num_blocks", f"{len(arch.num_blocks)} stages upsample {upscale}x, the bundle's VAE "
                          f"{bundle.model.vae_scale_factor}x", f"use {stages} stages")
    return decoder_config(latent_channels=bundle.model.latent_channels, block_out_channels=arch.block_out_channels,
                          num_blocks=arch.num_blocks, upsampling_scaling_factor=arch.upsampling_scaling_factor,
                          act_fn=arch.act_fn)


def _check_resumable(cfg: DecoderDistillConfig, ckpt: Path) -> None:
    from .train import RESUMABLE_CHANGES, _flatten

    saved = _flatten(decoder_config_from_dict(json.loads((ckpt / "config.json").read_text(encoding="utf-8")))
                     .to_dict())
    now = _flatten(cfg.to_dict())
    changed = [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if changed:
        raise ConfigError(changed[0], f"differs from the checkpoint's config ({ckpt / 'config.json'}): {changed}",
                          "resume with the same settings (only max_train_steps, checkpointing and logging may "
                          "change), or start a new train.output_dir")


def distill_decoder(bundle_path: str | os.PathLike, cfg: DecoderDistillConfig, *, out: str | os.PathLike | None = None,
                    add: bool = True, callback: Callable[[int, float], None] | None = None) -> DecoderDistillResult:
    """Train a tiny decoder for the bundle at `bundle_path` and, if it passes the gate, add it (to a copy at
    `out` when given). `callback(step, loss)` runs after every optimizer step; an exception it raises stops
    training. A decoder that fails the gate raises TinyDecoderFidelityError (its weights stay in
    output_dir/tiny_decoder/ and the figures in output_dir/gate.json)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from lcm_edge.bundle import load_bundle
    from lcm_edge.export.tiny_decoder import (TINY_DECODER_FLICKER_MARGIN, TINY_DECODER_MIN_PSNR_DB,
                                              TinyDecoderFidelityError, TinyDecoderWeights, add_tiny_decoder,
                                              build_decoder, save_tiny_decoder)

    from .train import CHECKPOINTS, _draw_seed, _find_resume_checkpoint, finish_step, resume_state

    tc = cfg.train
    output = Path(tc.output_dir)
    bundle = load_bundle(bundle_path, verify_checksums=True)
    config = architecture_for(bundle, cfg.decoder)  # before any sampling
    if out is not None and Path(out).exists():
        raise ConfigError("--out", f"'{out}' already exists", "choose a new folder")
    resume_dir = _find_resume_checkpoint(cfg, output / CHECKPOINTS)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision,
                              gradient_accumulation_steps=1,
                              log_with=None if tc.report_to == "none" else tc.report_to,
                              project_config=ProjectConfiguration(project_dir=str(output),
                                                                  logging_dir=str(output / "logs")))
    device = accelerator.device
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        cfg.save(output / "config.json")
        prepare_data(bundle, cfg, output / DATA_DIR)
    accelerator.wait_for_everyone()
    data = prepare_data(bundle, cfg, output / DATA_DIR)  # reads what the main process made
    latents = torch.from_numpy(data.latents)
    images = torch.from_numpy(data.images)

    set_seed(tc.seed)
    decoder = build_decoder(config)
    if tc.gradient_checkpointing:
        decoder.gradient_checkpointing = True
    decoder.train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon)
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=tc.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=tc.max_train_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(decoder, optimizer, lr_scheduler)

    global_step = resume_state(accelerator, cfg, resume_dir, output, _check_resumable)
    if accelerator.is_main_process and tc.report_to != "none":
        accelerator.init_trackers("distill-decoder", config={"frames": len(latents), "loss": cfg.loss,
                                                             "architecture": json.dumps(config)})

    pixel_loss = torch.nn.functional.l1_loss if cfg.loss == "l1" else torch.nn.functional.mse_loss
    ga = tc.gradient_accumulation_steps
    losses: dict[int, float] = {}
    started, steps_run = time.perf_counter(), 0
    while global_step < tc.max_train_steps:
        step_loss = torch.zeros((), device=device)
        for micro in range(ga):
            g = torch.Generator().manual_seed(_draw_seed(tc.seed, global_step, micro, accelerator.process_index))
            index = torch.randint(len(latents), (tc.batch_size,), generator=g)
            x, y = latents[index].to(device), images[index].to(device, torch.float32)
            # Gradients are all-reduced across processes only on the last micro-batch of the step.
            with nullcontext() if micro == ga - 1 else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss = pixel_loss(model(x).float(), y)
                accelerator.backward(loss / ga)
            step_loss += loss.detach() / ga
        accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        steps_run += 1
        finish_step(accelerator, cfg, output, step_loss, lr_scheduler, global_step, steps_run, started, losses,
                    tag="decoder", divergence_fix="lower train.learning_rate, or resume from an earlier checkpoint",
                    callback=callback)
    seconds_per_step = (time.perf_counter() - started) / max(steps_run, 1)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result = DecoderDistillResult(output, global_step, losses, seconds_per_step, None, None, None)
    if not accelerator.is_main_process:
        return result

    trained = accelerator.unwrap_model(model).float().eval().cpu()
    result.weights = save_tiny_decoder(TinyDecoderWeights(trained, config), output / WEIGHTS_DIR)
    if not add:
        return result
    gates = {"min_psnr_db": cfg.gate.min_psnr_db or TINY_DECODER_MIN_PSNR_DB,
             "flicker_margin": TINY_DECODER_FLICKER_MARGIN if cfg.gate.flicker_margin is None
             else cfg.gate.flicker_margin}
    holdout = [clip[None] for clip in data.holdout]
    source = {"distilled": {"config": cfg.to_dict(), "steps": global_step, "frames": int(len(latents)),
                            "seconds_per_step": seconds_per_step, "final_loss": losses.get(global_step)}}
    try:
        report = add_tiny_decoder(bundle.root, result.weights, out=out, check_latents=holdout,
                                  threads=cfg.data.threads, provenance=source, overwrite=True, **gates)
    except TinyDecoderFidelityError as exc:
        (output / GATE_FILE).write_text(json.dumps({"passed": False, **exc.figures, **gates}, indent=2) + "\n",
                                        encoding="utf-8")
        f = exc.figures
        raise TinyDecoderFidelityError(
            "train", f"the distilled decoder failed the gate on {f['clips']} held-out clips (PSNR {f['psnr_db']:.2f} dB, "
            f"gate {gates['min_psnr_db']}; flicker {f['flicker_tiny']:.4f} vs the full decoder's {f['flicker_full']:.4f}, "
            f"margin {gates['flicker_margin']}) and was not added; its weights are in {result.weights}",
            "train longer (train.max_train_steps, resume with 'latest'), widen the decoder "
            "(decoder.block_out_channels / num_blocks), or sample more clips (data.clips)", f) from exc
    result.gate, result.bundle = report.fidelity, report.bundle
    (output / GATE_FILE).write_text(json.dumps({"passed": True, **report.fidelity, **gates}, indent=2) + "\n",
                                    encoding="utf-8")
    return result
