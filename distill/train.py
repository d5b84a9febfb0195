"""Decoupled consistency learning (AnimateLCM) on Hugging Face Accelerate: one loop, three stages.

    stage "image"    consistency distillation of a 2-D teacher into a LoRA (LCM-LoRA recipe)
    stage "video"    consistency distillation of an inflated teacher (2-D + motion module) into new temporal
                     layers; the stage-1 LoRA is merged into the online model only and reaches the target
                     through the EMA (AnimateLCM's initialisation strategy)
    stage "adapter"  teacher-free consistency training of an image-to-video adapter or a LoRA fine-tune

`train(config)` runs a stage end to end: build models, stream data, optimise, checkpoint, save. The two
losses are `distillation_loss` and `consistency_training_loss`; the math they compose lives in
consistency.py (bound to the runtime's numpy scheduler by tests/test_distill_consistency.py).

Reproducibility: every random draw of optimizer step k, micro-batch m, process r comes from a generator
seeded by (seed, k, m, r), and the data stream is a pure function of the step (data.StepSampler). A run
resumed from a checkpoint therefore repeats the uninterrupted run's losses; only the steps after the last
checkpoint are lost.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import consistency as C
from .config import ConsistencyConfig, DistillConfig, config_from_dict
from .data import StepSampler, make_dataset
from .errors import CheckpointError, ConfigError, DatasetError, TrainingDivergedError
from .lora_io import merge_lora_, save_lora
from .models import (BaseModels, Denoiser, EMATarget, FirstFrameAdapter, add_lora, encode_prompts,
                     fresh_motion_adapter, inflate, is_motion_parameter, load_base, trainable_parameters,
                     trainable_state_dict)

CHECKPOINTS = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"
LOSS_LOG = "losses.jsonl"
# Keys a resumed run may change: they do not alter what the next step computes.
RESUMABLE_CHANGES = {"train.max_train_steps", "train.resume", "train.checkpointing_steps",
                     "train.checkpoints_total_limit", "train.report_to", "train.log_every", "data.num_workers"}


@dataclass
class Stage:
    """What a stage trains, and against what."""

    online: Denoiser  # holds the trainable parameters
    teacher: Denoiser | None  # None: teacher-free consistency training
    ema: EMATarget | None  # None: the target is the online model under no_grad (LCM-LoRA)
    uncond_embeds: torch.Tensor | None = None  # the empty prompt, for the teacher's guidance
    info: dict = field(default_factory=dict)

    @property
    def target_model(self) -> Denoiser:
        """The model the consistency targets come from: the EMA copy, or the online model itself."""
        return self.ema.target if self.ema is not None else self.online


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: dict[int, float]  # optimizer step -> loss, for the steps this call ran
    artifacts: dict[str, Path]
    seconds_per_step: float
    stage: Stage  # the trained models in memory (online unwrapped), for evaluation


# ----------------------------------------------------------------------------------------------
# Losses


def distillation_loss(stage: Stage, x0: torch.Tensor, text: torch.Tensor, acp: torch.Tensor,
                      cfg: DistillConfig, g: torch.Generator) -> torch.Tensor:
    """Latent consistency distillation (LCM Algorithm 1) with the CFG-augmented DDIM solver.

    f_theta(x_{t_{n+k}}, t_{n+k}) is pulled towards f_{theta^-}(x_hat_{t_n}, t_n), where x_hat_{t_n} is one
    DDIM step of the guided teacher from x_{t_{n+k}} (or consistency.solver_substeps equal ones). Same code
    for images (b, c, h, w) and videos (b, c, f, h, w).
    """
    s, cc = cfg.schedule, cfg.consistency
    b, device = x0.shape[0], x0.device
    # 1. A random solver step t_{n+k} -> t_n on the skipping-step grid.
    t_start, t_end = _random_solver_steps(cfg, b, g, device)
    # 2. Forward diffusion to t_{n+k}.
    noise = torch.randn(x0.shape, generator=g).to(device)
    # 3. Guidance scale w, one per sample.
    w = C.append_dims(_draw_guidance(cc, t_start, g), x0.ndim)
    if cc.sampler_inputs:
        x0 = _with_sampler_inputs(stage, x0, text, acp, cfg, g)
    x_start = C.add_noise(x0, noise, t_start, acp)

    # 4. The online model's consistency output at t_{n+k}: the only term with a gradient.
    out = stage.online(x_start, t_start, text).float()
    pred = C.consistency_function(out, x_start, t_start, acp, s.prediction_type, s.timestep_scaling)

    with torch.no_grad():
        # 5-6. The guided teacher's DDIM solve of the augmented PF-ODE from t_{n+k} to t_n, in solver_substeps
        #      equal steps (1: LCM's single step).
        x_prev, t = x_start, t_start
        for j in range(1, cc.solver_substeps + 1):
            t_next = t_start - (t_start - t_end) * j // cc.solver_substeps
            x_prev = _guided_teacher_ddim_step(stage, x_prev, t, t_next, text, w, acp, cfg)
            t = t_next
        # 7. The target's consistency output at t_n (the EMA copy, or the online model itself).
        target_out = stage.target_model(x_prev, t_end, text).float()
        target = C.consistency_function(target_out, x_prev, t_end, acp, s.prediction_type, s.timestep_scaling)

    return C.consistency_loss(pred, target, cc.loss_type, cc.huber_c)


def _random_solver_steps(cfg: DistillConfig, batch: int, g: torch.Generator,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n) of `batch` solver steps drawn on the config's solver grid (uniform or two-level)."""
    grid = cfg.schedule.solver_grid()
    index = C.draw_solver_steps(grid, batch, g).to(device)
    return C.grid_solver_step(index, grid.to(device))


def _with_sampler_inputs(stage: Stage, x0: torch.Tensor, text: torch.Tensor, acp: torch.Tensor,
                         cfg: DistillConfig, g: torch.Generator) -> torch.Tensor:
    """x0 with a `consistency.sampler_inputs` fraction of its samples replaced by the target model's consistency
    output from pure noise at the last training timestep: what the few-step sampler's first step hands on."""
    s = cfg.schedule
    b, device = x0.shape[0], x0.device
    chosen = C.append_dims((torch.rand(b, generator=g) < cfg.consistency.sampler_inputs).to(device), x0.ndim)
    pure_noise = torch.randn(x0.shape, generator=g).to(device)
    t_last = torch.full((b,), s.num_train_timesteps - 1, dtype=torch.long, device=device)
    with torch.no_grad():
        x_last = C.add_noise(torch.zeros_like(x0), pure_noise, t_last, acp)
        out = stage.target_model(x_last, t_last, text).float()
        first = C.consistency_function(out, x_last, t_last, acp, s.prediction_type, s.timestep_scaling)
    return torch.where(chosen, first, x0)


def _draw_guidance(cc: ConsistencyConfig, t_start: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """w ~ U[w_min, w_max] per solver step, U[high_w_min, high_w_max] from t_{n+k} >= high_w_from. One uniform
    draw maps into either range, so with the high range off the draws are exactly the plain range's."""
    u = torch.rand(t_start.shape, generator=g).to(t_start.device)
    w = cc.w_min + (cc.w_max - cc.w_min) * u
    if cc.high_w_from:
        w = torch.where(t_start >= cc.high_w_from, cc.high_w_min + (cc.high_w_max - cc.high_w_min) * u, w)
    return w


def _guided_teacher_ddim_step(stage: Stage, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                              text: torch.Tensor, w: torch.Tensor, acp: torch.Tensor,
                              cfg: DistillConfig) -> torch.Tensor:
    """One DDIM step t -> t_next of the teacher, guided in x_0 and eps: conditional and unconditional
    predictions in one batch (no guidance drawn anywhere: the conditional pass alone)."""
    s, cc = cfg.schedule, cfg.consistency
    b = x.shape[0]
    a = C.extract(acp, t, x.ndim)
    alpha, sigma = a.sqrt(), (1.0 - a).sqrt()
    guide = cc.w_range()[1] > 0
    if guide:
        uncond = stage.uncond_embeds.expand(b, -1, -1)
        both = stage.teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, uncond])).float()
        cond_out, uncond_out = both.chunk(2)
    else:
        cond_out = stage.teacher(x, t, text).float()
    x0_hat = C.predicted_original_sample(cond_out, x, alpha, sigma, s.prediction_type)
    eps_hat = C.predicted_noise(cond_out, x, alpha, sigma, s.prediction_type)
    if guide:
        x0_hat = C.guided(x0_hat, C.predicted_original_sample(uncond_out, x, alpha, sigma, s.prediction_type), w)
        eps_hat = C.guided(eps_hat, C.predicted_noise(uncond_out, x, alpha, sigma, s.prediction_type), w)
    return C.ddim_step(x0_hat, eps_hat, C.extract(acp, t_next, x.ndim))


def consistency_training_loss(stage: Stage, x0: torch.Tensor, text: torch.Tensor, acp: torch.Tensor,
                              cfg: DistillConfig, g: torch.Generator,
                              image_latents: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-free consistency training: the same eps at two adjacent grid timesteps.

    x_{t_{n+k}} = a x_0 + s eps and x_{t_n} = a' x_0 + s' eps; loss Huber(f_theta(x_{t_{n+k}}),
    stopgrad f_ema(x_{t_n})). Used for adapters, which have no teacher to distil from.
    """
    s, cc = cfg.schedule, cfg.consistency
    b, device = x0.shape[0], x0.device
    t_start, t_end = _random_solver_steps(cfg, b, g, device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    x_start = C.add_noise(x0, noise, t_start, acp)
    x_end = C.add_noise(x0, noise, t_end, acp)

    out = stage.online(x_start, t_start, text, image_latents).float()
    pred = C.consistency_function(out, x_start, t_start, acp, s.prediction_type, s.timestep_scaling)
    with torch.no_grad():
        target_out = stage.ema.target(x_end, t_end, text, image_latents).float()
        target = C.consistency_function(target_out, x_end, t_end, acp, s.prediction_type, s.timestep_scaling)
    return C.consistency_loss(pred, target, cc.loss_type, cc.huber_c)


# ----------------------------------------------------------------------------------------------
# Building a stage


def build_stage(cfg: DistillConfig, base: BaseModels) -> Stage:
    """Teacher, online model and target of `cfg.stage` from the pretrained pieces (consumed: do not reuse)."""
    decay = cfg.consistency.ema_decay
    if cfg.stage == "image":
        teacher = Denoiser(copy.deepcopy(base.unet))
        unet = base.unet
        add_lora(unet, cfg.lora)
        online = Denoiser(unet)
        ema = EMATarget(copy.deepcopy(online), online, decay) if cfg.target == "ema" else None
        return Stage(online, teacher, ema, info={"lora_layers": _count_lora_layers(unet)})

    if cfg.stage == "video":
        spatial, teacher_motion = base.unet, base.motion_adapter
        # The teacher: the image model plus an existing motion module (AnimateDiff), no LoRA.
        teacher = Denoiser(inflate(copy.deepcopy(spatial), teacher_motion))
        motion = (fresh_motion_adapter(teacher_motion) if cfg.model.student_motion_init == "zero"
                  else copy.deepcopy(teacher_motion))
        # The target starts WITHOUT the stage-1 LoRA ...
        target = Denoiser(inflate(copy.deepcopy(spatial), motion))
        # ... the online model starts with it merged (frozen), behind the exporter's fused-vs-unfused gate.
        merged = spatial
        fusion = merge_lora_(merged, cfg.model.lora, weight=cfg.model.lora_weight)
        online_unet = inflate(merged, motion)
        for name, p in online_unet.named_parameters():
            p.requires_grad_(is_motion_parameter(name))  # spatial weights and the LoRA stay frozen
        online = Denoiser(online_unet)
        ema = EMATarget(target, online, decay)  # tracks the motion modules and every LoRA'd spatial weight
        return Stage(online, teacher, ema, info={"lora_fusion": fusion.to_dict(), "ema_tracked": len(ema.names),
                                                 "motion_config": dict(motion.config)})

    # stage "adapter": no teacher; the base is the distilled model.
    spatial = base.unet
    info = {}
    if cfg.model.lora is not None:
        info["lora_fusion"] = merge_lora_(spatial, cfg.model.lora, weight=cfg.model.lora_weight).to_dict()
    unet = inflate(spatial, base.motion_adapter) if base.motion_adapter is not None else spatial
    unet.requires_grad_(False)
    if cfg.adapter.kind == "lora" or cfg.adapter.train_lora:
        add_lora(unet, cfg.lora)
    image_adapter = None
    if cfg.adapter.kind == "image_to_video":
        ucfg = unet.config
        image_adapter = FirstFrameAdapter(latent_channels=ucfg.in_channels,
                                          block_out_channels=tuple(ucfg.block_out_channels),
                                          layers_per_block=ucfg.layers_per_block,
                                          hidden_channels=cfg.adapter.hidden_channels,
                                          max_frames=ucfg.motion_max_seq_length)
    online = Denoiser(unet, image_adapter)
    return Stage(online, None, EMATarget(copy.deepcopy(online), online, decay), info=info)


def _count_lora_layers(module: nn.Module) -> int:
    return sum(1 for name, _ in module.named_modules() if name.endswith(".lora_A.default"))


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: DistillConfig, *, base: BaseModels | None = None,
          callback: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run `cfg.stage` to `cfg.train.max_train_steps`; resume per `cfg.train.resume`.

    `base`: pretrained pieces already in memory (tests, benchmarks); default: read from cfg.model.
    `callback(step, loss)` runs after every optimizer step (after any checkpoint of that step); an
    exception it raises stops training and propagates.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    tc = cfg.train
    out = Path(tc.output_dir)
    resume_dir = _find_resume_checkpoint(cfg, out / CHECKPOINTS)

    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        log_with=None if tc.report_to == "none" else tc.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[tc.mixed_precision]
    device = accelerator.device
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")

    # 1. Models. The seed fixes the LoRA/motion/adapter initialisation, which a resume then overwrites.
    set_seed(tc.seed)
    data = make_dataset(cfg.data)
    # Stage video also needs the VAE to write its export-ready model/ folder at the end.
    need_vae = cfg.data.kind != "latents" or cfg.stage == "video"
    if base is None:
        base = load_base(cfg.model, need_vae=need_vae)
    if need_vae and base.vae is None:
        raise ConfigError("model.pretrained", f"stage {cfg.stage} with data.kind {cfg.data.kind} needs a VAE, and "
                          "the base has none", "add vae/ to model.pretrained")
    # Build the stage where it will train: the copies it makes (teacher, target, inflated UNets) then never
    # exist on the host, which at SD1.5 size would be ~15 GB of host memory and minutes of random init.
    base.unet.to(device)
    if base.motion_adapter is not None:
        base.motion_adapter.to(device)
    stage = build_stage(cfg, base)
    acp = C.make_alphas_cumprod(cfg.schedule.beta_schedule, cfg.schedule.beta_start, cfg.schedule.beta_end,
                                cfg.schedule.num_train_timesteps, cfg.schedule.rescale_betas_zero_snr).to(device)
    # Text encoder and VAE stay fp32 (they are small, run under autocast, and are saved again by stage video).
    text_encoder = base.text_encoder.requires_grad_(False).eval().to(device)
    vae = base.vae.requires_grad_(False).eval().to(device) if cfg.data.kind != "latents" else None
    if stage.teacher is not None:
        # The frozen teacher is stored in the training precision: it only ever runs under no_grad.
        stage.teacher.requires_grad_(False).eval().to(device, weight_dtype)
        stage.uncond_embeds = encode_prompts(base.tokenizer, text_encoder, [""], device)
    if stage.ema is not None:
        stage.ema.target.to(device)  # fp32: an EMA in half precision would stall on rounding
    if tc.gradient_checkpointing:
        stage.online.unet.enable_gradient_checkpointing()
    stage.online.train()

    # 2. Optimizer and learning-rate schedule over the trainable parameters only.
    params = trainable_parameters(stage.online)
    if not params:
        raise ConfigError("stage", f"stage {cfg.stage} found nothing to train", "check model/adapter settings")
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon)
    # Accelerate steps a prepared scheduler once per process per optimizer step: scale the horizon.
    lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=tc.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=tc.max_train_steps * accelerator.num_processes)
    online, optimizer, lr_scheduler = accelerator.prepare(stage.online, optimizer, lr_scheduler)
    stage.online = online  # the losses call the prepared (possibly DDP-wrapped, autocast) model
    frozen_names = {n for n, p in accelerator.unwrap_model(online).named_parameters() if not p.requires_grad}

    # 3. Checkpoints hold only what changes: trainable weights, the EMA target, optimizer, schedule, RNG.
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            _save_tensors(trainable_state_dict(accelerator.unwrap_model(online)), Path(output_dir) / TRAINABLE_FILE)
            if stage.ema is not None:
                _save_tensors(stage.ema.state_dict(), Path(output_dir) / EMA_FILE)
        weights.clear()  # accelerate would otherwise write the whole (mostly frozen) model

    def load_hook(models, input_dir):
        _load_trainable(accelerator.unwrap_model(online), Path(input_dir) / TRAINABLE_FILE, frozen_names)
        if stage.ema is not None:
            stage.ema.load_state_dict(_load_tensors(Path(input_dir) / EMA_FILE), str(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step = resume_state(accelerator, cfg, resume_dir, out, _check_resumable)

    # 4. Data: an endless seeded stream, positioned at the resumed step.
    ga = tc.gradient_accumulation_steps
    sampler = StepSampler(len(data), tc.batch_size, tc.seed, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, start_microbatch=global_step * ga)
    loader = torch.utils.data.DataLoader(data, batch_size=tc.batch_size, sampler=sampler,
                                         num_workers=cfg.data.num_workers)
    batches = iter(loader)

    if accelerator.is_main_process and tc.report_to != "none":
        accelerator.init_trackers(f"distill-{cfg.stage}", config=_flat_config(cfg))

    # 5. Train.
    losses: dict[int, float] = {}
    artifacts: dict[str, Path] = {}
    started, steps_run = time.perf_counter(), 0
    while global_step < tc.max_train_steps:
        step_loss = torch.zeros((), device=device)
        for micro in range(ga):
            batch = next(batches)
            g = torch.Generator().manual_seed(_draw_seed(tc.seed, global_step, micro, accelerator.process_index))
            # Gradients are all-reduced across processes only on the last micro-batch of the step.
            with nullcontext() if micro == ga - 1 else accelerator.no_sync(online):
                with accelerator.autocast():
                    x0, text, image_latents = _prepare_batch(cfg, batch, base.tokenizer, text_encoder, vae, g,
                                                             device, tc.vae_batch_size)
                    if stage.teacher is not None:
                        loss = distillation_loss(stage, x0, text, acp, cfg, g)
                    else:
                        loss = consistency_training_loss(stage, x0, text, acp, cfg, g, image_latents)
                accelerator.backward(loss / ga)  # outside autocast, as torch recommends
            step_loss += loss.detach() / ga
        accelerator.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if stage.ema is not None:
            stage.ema.update(accelerator.unwrap_model(online))
        global_step += 1
        steps_run += 1

        finish_step(accelerator, cfg, out, step_loss, lr_scheduler, global_step, steps_run, started, losses,
                    tag=cfg.stage, divergence_fix="lower train.learning_rate, use bf16 instead of fp16, or resume "
                    "from an earlier checkpoint", callback=callback)

    seconds_per_step = (time.perf_counter() - started) / max(steps_run, 1)
    # 6. Artifacts.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        artifacts = save_artifacts(cfg, stage, base, accelerator.unwrap_model(online), out)
    accelerator.end_training()
    stage.online = accelerator.unwrap_model(online)
    return TrainResult(out, global_step, losses, artifacts, seconds_per_step, stage)


def _prepare_batch(cfg: DistillConfig, batch: dict, tokenizer, text_encoder, vae, g: torch.Generator,
                   device: torch.device, vae_batch_size: int):
    """(x0 latents, prompt embeddings, first-frame latents or None) for one micro-batch."""
    if "latents" in batch:
        x0 = batch["latents"].to(device, torch.float32)
    else:
        pixels = batch["pixels"].to(device)
        video = pixels.ndim == 5
        frames = pixels.flatten(0, 1) if video else pixels  # (b*f, 3, H, W)
        chunks = [vae.encode(frames[i:i + vae_batch_size]).latent_dist.sample(generator=g)
                  for i in range(0, frames.shape[0], vae_batch_size)]
        x0 = torch.cat(chunks).float() * vae.config.scaling_factor
        if video:
            b, f = pixels.shape[:2]
            x0 = x0.reshape(b, f, *x0.shape[1:]).permute(0, 2, 1, 3, 4)  # (b, c, f, h, w)
    want = 5 if cfg.is_video else 4
    if x0.ndim != want:
        kind = "video (b, c, frames, h, w)" if want == 5 else "image (b, c, h, w)"
        raise DatasetError(cfg.data.root, f"stage {cfg.stage} needs {kind} latents, the data gives shape "
                           f"{list(x0.shape)}", "use image data for stage image and video data for video stages")
    text = encode_prompts(tokenizer, text_encoder, batch["caption"], device).float()
    image_latents = None
    if cfg.stage == "adapter" and cfg.adapter.kind == "image_to_video":
        keep = torch.rand((x0.shape[0],), generator=g) >= cfg.adapter.condition_dropout
        image_latents = x0[:, :, 0] * C.append_dims(keep.to(device, x0.dtype), 4)
    return x0, text, image_latents


def _draw_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
             and p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _find_resume_checkpoint(cfg: DistillConfig, root: Path) -> Path | None:
    resume = cfg.train.resume
    existing = _checkpoints(root)
    if resume is None:
        if existing:
            raise ConfigError("train.resume", f"{root} already holds {existing[-1].name}; starting over would mix "
                              "two runs in one folder", "set train.resume to 'latest' (or 'auto') to continue, "
                              "or choose a new train.output_dir")
        return None
    if resume in ("latest", "auto"):
        if existing:
            return existing[-1]
        if resume == "latest":
            raise CheckpointError(str(root), "holds no complete checkpoint to resume from",
                                  "set train.resume to 'auto' to start fresh when there is none")
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(str(path), f"is not a complete checkpoint (no {STATE_FILE})",
                              f"pass a checkpoint-N folder under {root}, or 'latest'")
    return path


def _check_resumable(cfg: DistillConfig, ckpt: Path) -> None:
    # Through the config schema, so a setting added after the checkpoint was written reads as its default.
    saved = config_from_dict(json.loads((ckpt / "config.json").read_text(encoding="utf-8"))).to_dict()
    now = cfg.to_dict()
    changed = [k for k in sorted(set(_flatten(saved)) | set(_flatten(now)))
               if k not in RESUMABLE_CHANGES and _flatten(saved).get(k) != _flatten(now).get(k)]
    if changed:
        raise ConfigError(changed[0], f"differs from the checkpoint's config ({ckpt / 'config.json'}): {changed}",
                          "resume with the same settings (only max_train_steps, checkpointing and logging may "
                          "change), or start a new train.output_dir")


def resume_state(accelerator, cfg, resume_dir: Path | None, out: Path,
                 check_resumable: Callable[[object, Path], None]) -> int:
    """Load `resume_dir` (None: a fresh run) and return its step. The loss log keeps only the lines up to that
    step: the steps after the checkpoint are run again, and their first lines would otherwise stay twice."""
    if resume_dir is None:
        return 0
    check_resumable(cfg, resume_dir)
    accelerator.load_state(str(resume_dir))
    global_step = json.loads((resume_dir / STATE_FILE).read_text(encoding="utf-8"))["global_step"]
    log = out / LOSS_LOG
    if accelerator.is_main_process and log.is_file():
        lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines:
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                # A run killed mid-write leaves a partial last line; the checkpoint comes after a step's line, so
                # that step is not in the checkpoint and runs again.
                lines.pop()
        kept = [line for line in lines if json.loads(line)["step"] <= global_step]
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(log)
    accelerator.print(f"resumed from {resume_dir} at step {global_step}")
    return global_step


def finish_step(accelerator, cfg, out: Path, step_loss, lr_scheduler, global_step: int, steps_run: int,
                started: float, losses: dict, *, tag: str, divergence_fix: str,
                callback: Callable[[int, float], None] | None) -> float:
    """After an optimizer step, for every training loop: the mean loss over processes (a non-finite one stops
    training), its line in losses.jsonl, the periodic log, the checkpoint, the caller's callback."""
    tc = cfg.train
    value = accelerator.reduce(step_loss, reduction="mean").item()
    if not math.isfinite(value):
        raise TrainingDivergedError(global_step, value, divergence_fix)
    losses[global_step] = value
    lr = lr_scheduler.get_last_lr()[0]
    if accelerator.is_main_process:
        with (out / LOSS_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": global_step, "loss": value, "lr": lr}) + "\n")
    if global_step % tc.log_every == 0 or global_step == tc.max_train_steps:
        per_step = (time.perf_counter() - started) / steps_run
        accelerator.log({"loss": value, "lr": lr, "s_per_step": per_step}, step=global_step)
        accelerator.print(f"[{tag}] step {global_step}/{tc.max_train_steps} loss {value:.5f} lr {lr:.3g} "
                          f"{per_step:.3f} s/step")
    if global_step % tc.checkpointing_steps == 0 or global_step == tc.max_train_steps:
        _save_checkpoint(accelerator, cfg, out / CHECKPOINTS, global_step)
    if callback is not None:
        callback(global_step, value)
    return value


def _save_checkpoint(accelerator, cfg: DistillConfig, root: Path, step: int) -> None:
    """Write checkpoint-<step> atomically: into a .tmp folder, renamed once complete."""
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder moves
    if accelerator.is_main_process:
        cfg.save(tmp / "config.json")
        (tmp / STATE_FILE).write_text(json.dumps({"global_step": step}) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        limit = cfg.train.checkpoints_total_limit
        if limit is not None:
            for old in _checkpoints(root)[:-limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(str(path), "is missing from the checkpoint", "resume from a complete checkpoint")
    return load_file(str(path))


def _load_trainable(model: nn.Module, path: Path, frozen: set[str]) -> None:
    state = _load_tensors(path)
    params = dict(model.named_parameters())
    expected = {n for n in params if n not in frozen}
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected)[:3], sorted(expected - set(state))[:3]
        raise CheckpointError(str(path), f"trainable tensors do not match this run (missing {missing}, "
                              f"unexpected {extra})", "resume with the config the checkpoint was written with")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ----------------------------------------------------------------------------------------------
# Artifacts


def save_artifacts(cfg: DistillConfig, stage: Stage, base: BaseModels, online: Denoiser, out: Path,
                   ) -> dict[str, Path]:
    """The stage's deliverables (online weights; the EMA target's beside them where there is one)."""
    artifacts: dict[str, Path] = {}
    scheduler = out / "scheduler" / "scheduler_config.json"
    scheduler.parent.mkdir(parents=True, exist_ok=True)
    scheduler.write_text(json.dumps(cfg.schedule.lcm_scheduler_config(), indent=2) + "\n", encoding="utf-8")
    artifacts["scheduler"] = scheduler
    ema_model = stage.ema.target if stage.ema is not None else None
    has_lora = cfg.stage == "image" or (cfg.stage == "adapter" and (cfg.adapter.kind == "lora"
                                                                   or cfg.adapter.train_lora))
    if has_lora:
        artifacts["lora"] = save_lora(online.unet, out / "lora").folder
        if ema_model is not None:
            artifacts["lora_ema"] = save_lora(ema_model.unet, out / "lora_ema").folder
    if cfg.stage == "video":
        motion_config = stage.info["motion_config"]
        artifacts["motion_adapter"] = save_motion_adapter(online.unet, motion_config, out / "motion_adapter")
        artifacts["motion_adapter_ema"] = save_motion_adapter(ema_model.unet, motion_config,
                                                              out / "motion_adapter_ema")
        artifacts["model"] = write_model_folder(cfg.schedule, base, online.unet, out / "model")
    if cfg.stage == "adapter" and online.image_adapter is not None:
        online.image_adapter.save_pretrained(out / "i2v_adapter")
        artifacts["i2v_adapter"] = out / "i2v_adapter"
        ema_model.image_adapter.save_pretrained(out / "i2v_adapter_ema")
        artifacts["i2v_adapter_ema"] = out / "i2v_adapter_ema"
    return artifacts


def save_motion_adapter(unet: nn.Module, config: dict, folder: Path) -> Path:
    """The temporal layers of a UNetMotionModel as a MotionAdapter folder (strict: every key placed)."""
    from diffusers import MotionAdapter

    adapter = MotionAdapter.from_config(config)
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items() if is_motion_parameter(k)}
    adapter.load_state_dict(state, strict=True)
    adapter.save_pretrained(folder)
    return folder


def write_model_folder(schedule, base: BaseModels, unet: nn.Module, folder: Path) -> Path:
    """A diffusers folder `lcm-edge export` reads: the distilled UNetMotionModel (LoRA merged), the base's
    vae/ text_encoder/ tokenizer/, and the LCMScheduler config of the distillation schedule."""
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    base.text_encoder.save_pretrained(folder / "text_encoder")
    base.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(schedule.lcm_scheduler_config(), indent=2) + "\n", encoding="utf-8")
    return folder


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _flat_config(cfg: DistillConfig) -> dict:
    """TensorBoard hparams take numbers and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
            for k, v in _flatten(cfg.to_dict()).items()}
