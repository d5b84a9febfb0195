"""The one command that builds the default model from an empty folder.

    python -m lcm_edge.distill.default_model.chain WORKDIR --bundle OUT [--scale cpu|smoke]
                                                   [--continue-device cuda]

Recipe (every step is the project's own code, as a full-scale user would run it):
1. synthetic clips (deterministic by seed; some colour-shape-direction combinations held out);
2. a CLIP-format BPE tokenizer trained on the captions;
3. an AutoencoderKL trained on the frames, then the clips encoded to latents;
4. the teacher image UNet + text encoder (diffusion training on Stable Target Field targets: STABLE_TARGETS);
5. the teacher motion module on the frozen image model (AnimateDiff's recipe, + cross-attention and text
   encoder), then (5b) a video fine-tune of the motion modules, cross-attention and text encoder, (5d) the
   pure-noise end alone, where the caption is all the model has, and (5e) that end mixed with every noise level
   (VIDEO_STAGES; 5c, a larger-batch continuation of 5b for a GPU, is off: ChainScale.continue_steps);
6. stage 1 of lcm_edge.distill: the image consistency LoRA (EMA target);
7. stage 2 of lcm_edge.distill: video consistency distillation of the motion modules (from the teacher's), with
   half the stage-1 LoRA merged (STAGE2_LORA_WEIGHT), on a 10-timestep solver grid refined to 50 below t = 800
   (STAGE2_DDIM_TIMESTEPS, STAGE2_FINE_BELOW), with strong guidance from t = 500 up (STAGE2_HIGH_W_FROM) and
   half its solver steps started from the target's own one-step prediction (STAGE2_SAMPLER_INPUTS);
8. export of the student to a bundle with provenance (command, seeds, code version, timings) and the 4- and
   8-step schedules tuned for it (DEFAULT_TIMESTEPS).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import consistency as C
from ..pretrain import same_caption_reference
from ..synthetic import COLOURS, DEFAULT_TRAVEL, DIRECTIONS, SHAPES, ShapeClip, caption_for, synthetic_clips
from .bpe import train_bpe, write_tokenizer
from .detector import Detection, detect
from .pretrain import (ToyArchitecture, alphas_cumprod, build_motion_adapter, build_text_encoder, build_unet,
                       build_vae, ddim_scheduler, encode_latents, sample_teacher, train_image_teacher,
                       train_motion_teacher, train_vae)

# Held out of training: the "harder figure" of the evaluation (combinations never seen).
HELD_OUT = (("red", "triangle", "up"), ("green", "circle", "left"), ("blue", "square", "down"),
            ("yellow", "triangle", "right"), ("white", "circle", "up"))


@dataclass(frozen=True)
class ChainScale:
    """Step counts; "smoke" runs the identical chain in about two minutes (2 cores) for tests."""

    clips: int
    vae_steps: int
    image_steps: int
    motion_steps: int
    video_finetune_steps: int
    stage1_steps: int
    stage2_steps: int
    batch_images: int
    batch_image_teacher: int
    batch_videos: int
    vae_crop: int
    check_prompts: int
    check_steps: int
    # Step 5c: `continue_steps` of a `continue_schedule_steps`-long warm-up + cosine (0 steps: no 5c).
    continue_steps: int = 0
    continue_schedule_steps: int = 0
    batch_continue: int = 1
    # Step 5d: the pure-noise end (t >= 990), `pure_noise_steps` of a `pure_noise_schedule_steps`-long schedule
    # at batch `batch_pure_noise` (0 steps: no 5d).
    pure_noise_steps: int = 0
    pure_noise_schedule_steps: int = 0
    batch_pure_noise: int = 1
    # Step 5e: 5d continued with VIDEO_STAGES["anchor"]'s share of each batch on every t (0 steps: no 5e).
    anchor_steps: int = 0
    anchor_schedule_steps: int = 0
    batch_anchor: int = 1


# Image teacher at batch 64: at batch 16 its shapes stayed at chance after 4000 steps; at 64 they
# were right for 24 of 24 prompts from 1500 steps (benchmarks/default_model_teacher_sweep.py, H100).
# 5d: 400 of a 4000-step schedule (kept near its peak rate) at batch 8; 5e: 200 of 2000 at batch 12.
CPU_SCALE = ChainScale(clips=1100, vae_steps=2500, image_steps=2000, motion_steps=1000, video_finetune_steps=3000,
                       stage1_steps=500, stage2_steps=500, batch_images=16, batch_image_teacher=64, batch_videos=2,
                       vae_crop=32, check_prompts=10, check_steps=25, pure_noise_steps=400,
                       pure_noise_schedule_steps=4000, batch_pure_noise=8, anchor_steps=200,
                       anchor_schedule_steps=2000, batch_anchor=12)
SCALES = {
    # The shipped recipe (v6), ~75 min on 2 CPU cores. v4's "full" scale added a GPU's step 5c to the epsilon
    # teacher of v1-v4; this teacher has its shapes without it (5c is kept for a scale that sets continue_steps).
    "cpu": CPU_SCALE,
    "smoke": ChainScale(clips=24, vae_steps=3, image_steps=3, motion_steps=2, video_finetune_steps=1,
                        stage1_steps=2, stage2_steps=2, batch_images=4, batch_image_teacher=4, batch_videos=1,
                        vae_crop=32, check_prompts=1, check_steps=2, continue_steps=1, continue_schedule_steps=2,
                        batch_continue=1, pure_noise_steps=1, pure_noise_schedule_steps=2, batch_pure_noise=1,
                        anchor_steps=1, anchor_schedule_steps=2, batch_anchor=2),
}


def training_combinations() -> list[tuple[str, str, str]]:
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if (c, s, d) not in HELD_OUT]


# Opacity of a motion trail behind the shapes (synthetic.TRAIL; 0 = none). The v3 teacher ignores the direction
# word entirely (the same noise gives the same clip for "left" and "right"): in single frames the word means
# nothing. A trail makes it mean something in every frame, but neither the faint one (synthetic.FAINT_TRAIL)
# nor one half as opaque as the shape was tied to the word by the chain's image stage (the trail landed on a
# random side: benchmarks/default_model_trail_side.py), so it is off.
MOTION_TRAIL = 0.0
# Opacity of the back half of every shape (synthetic.make_clip; 1 = plain). A bright front inside the shape, like
# its outline, would tell the direction in every frame; at 0.45 the chain's image stage drew it on the word's
# side for 0.30 of images (chance 0.25) and the motion module's clips followed the word for 1 of 10 prompts
# (benchmarks/results/default_model_teacher_sweep/README.md), so it is off. The detector's colour reading
# (the object's median) also misreads such clips: every yellow and white one reads green.
BACK_OPACITY = 1.0
# Eye size (synthetic.draw_shape; 0 = none): a hole near the shape's front, a detail as fine as what tells a
# circle from a square (a trail or a shaded half shows whenever the shape does, so no noise level needs the word
# to place it). At 0.25 the chain's image stage drew a hole in 101 of 256 images, 26 of them on the word's side
# (chance 0.25; the four words' same-noise images 0.7/255 apart; benchmarks/results/default_model_teacher_sweep/
# README.md), so it is off.
EYE = 0.0
# Path length, first to last frame, as a fraction of the frame side. A path longer than the shape shows in the
# noisy clip as soon as the shape does, so no noise level needs the word; a shorter one (0.12-0.2) would be a
# detail only the word can settle at middle noise, like a corner. Through the chain the word stayed unused with
# it too (direction_gain <= 0.0008 at t = 200-950 after steps 5 and 5b; benchmarks/results/
# default_model_teacher_sweep/README.md), so the paths stay long.
TRAVEL = DEFAULT_TRAVEL
# Stable Target Field targets in every teacher stage (diffusion_loss's reference: the posterior mean over the
# clip's same-caption clips). Where the noise hides the clip, a single clip's target is one random start point of
# many; its caption's mean clip is what the word decides. With them, v-prediction on zero terminal SNR, a third
# UNet level and steps 5d-5e the teacher came to use the direction word (DDIM 25 samples 0.71 of the eval's 24
# prompts the prompted way; v4's teacher 0.25, chance); False trains on the clips themselves, as v1-v4 did
# (benchmarks/results/default_model_teacher_sweep/README.md, last sections).
STABLE_TARGETS = True


def make_training_clips(count: int, arch: ToyArchitecture, seed: int, trail: float = MOTION_TRAIL,
                        back_opacity: float = BACK_OPACITY, eye: float = EYE,
                        travel: tuple[float, float] = TRAVEL) -> list[ShapeClip]:
    clips = synthetic_clips(count * 2, seed=seed, size=arch.resolution, num_frames=arch.num_frames, trail=trail,
                            back_opacity=back_opacity, eye=eye, travel=travel)
    kept = [c for c in clips if (c.colour, c.shape, c.direction) not in HELD_OUT]
    return kept[:count]


def prompt_form() -> str:
    """What the model can draw, in words (printed by `lcm-edge info`)."""
    return (f"{caption_for('{colour}', '{shape}', '{direction}')} with colour {'|'.join(COLOURS)}, "
            f"shape {'|'.join(SHAPES)}, direction {'|'.join(DIRECTIONS)}")


def code_version() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return out.stdout.strip()


def caption_ids(tokenizer, captions: list[str], arch: ToyArchitecture) -> torch.Tensor:
    """(N, text_max_length) token ids, padded as the text encoder was trained."""
    return torch.tensor([tokenizer(c, padding="max_length", max_length=arch.text_max_length,
                                   truncation=True).input_ids for c in captions])


def train_tokenizer(folder: Path, captions: list[str], arch: ToyArchitecture):
    """Step 2: the BPE on the training captions + the held-out ones (their words are the same), loaded."""
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(captions + [caption_for(*combo) for combo in HELD_OUT])
    write_tokenizer(folder, vocab, merges, arch.text_max_length)
    return CLIPTokenizer.from_pretrained(folder)


def clip_frames(clips: list[ShapeClip]) -> torch.Tensor:
    """The clips as float (N, F, 3, H, W) in [-1, 1]."""
    frames = torch.from_numpy(np.stack([c.frames for c in clips])).float() / 127.5 - 1.0  # (N, F, H, W, 3)
    return frames.permute(0, 1, 4, 2, 3)


def encode_clips(vae, frames: torch.Tensor) -> torch.Tensor:
    """(N, F, 3, H, W) frames -> (N, C, F, h, w) video latents at unit spread (sets the VAE's scaling_factor)."""
    video_latents = encode_latents(vae, frames.flatten(0, 1)).unflatten(0, frames.shape[:2])  # (N, F, C, h, w)
    return video_latents.permute(0, 2, 1, 3, 4).contiguous()


def pretrain_image_teacher(workdir: Path, scale: ChainScale, arch: ToyArchitecture, seed: int, log) -> dict:
    """Steps 1-4: writes workdir/teacher (diffusers folder, no motion yet), workdir/latents, clips.json."""
    timings = {}
    t0 = time.perf_counter()
    clips = make_training_clips(scale.clips, arch, seed)
    captions = [c.caption for c in clips]
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teacher = workdir / "teacher"
    tokenizer = train_tokenizer(teacher / "tokenizer", captions, arch)
    ids, empty_ids = caption_ids(tokenizer, captions, arch), caption_ids(tokenizer, [""], arch)[0]
    timings["tokenizer_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    frames = clip_frames(clips)
    vae = build_vae(arch)
    train_vae(vae, frames.flatten(0, 1), steps=scale.vae_steps, batch_size=scale.batch_images, lr=2e-3,
              seed=seed, log=log, crop=scale.vae_crop)
    video_latents = encode_clips(vae, frames)
    timings["vae_s"] = time.perf_counter() - t0
    checks = {"vae": check_vae(vae, arch, seed, log)}

    t0 = time.perf_counter()
    unet = build_unet(arch)
    text_encoder = build_text_encoder(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    image_latents = video_latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # every frame is an image
    frame_ids = ids.repeat_interleave(arch.num_frames, dim=0)
    frame_reference = same_caption_reference([c for c in captions for _ in range(arch.num_frames)]) \
        if STABLE_TARGETS else None
    train_image_teacher(unet, text_encoder, image_latents, frame_ids, empty_ids, arch, steps=scale.image_steps,
                        batch_size=scale.batch_image_teacher, lr=1e-3, seed=seed + 1, log=log,
                        reference=frame_reference)
    timings["teacher_image_s"] = time.perf_counter() - t0
    checks["image"] = check_teacher(vae, unet, text_encoder, tokenizer, empty_ids, arch, None, scale, seed, log)
    (workdir / "teacher_check.json").write_text(json.dumps(checks) + "\n")

    unet.save_pretrained(teacher / "unet")
    vae.save_pretrained(teacher / "vae")
    text_encoder.save_pretrained(teacher / "text_encoder")
    ddim_scheduler(arch).save_pretrained(teacher / "scheduler")
    _write_latents(workdir / "latents", video_latents, captions)
    (workdir / "clips.json").write_text(json.dumps([c.attributes() for c in clips]) + "\n")
    return timings


@torch.no_grad()
def check_vae(vae, arch: ToyArchitecture, seed: int, log, count: int = 20) -> dict:
    """Detector-read rate of VAE reconstructions of clips never trained on, and their mean abs error (0-255)."""
    clips = synthetic_clips(count, seed=seed + 97, size=arch.resolution, num_frames=arch.num_frames,
                            trail=MOTION_TRAIL, back_opacity=BACK_OPACITY, eye=EYE, travel=TRAVEL)
    hits, errors = [], []
    for clip in clips:
        x = clip_frames([clip])[0]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        frames = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        hits.append(all(detect(frames).matches(clip.colour, clip.shape, clip.direction).values()))
        errors.append(float(np.abs(frames.astype(np.float32) - clip.frames).mean()))
    rates = {"all": float(np.mean(hits)), "mean_abs_error": float(np.mean(errors))}
    log(f"vae check ({count} unseen clips): {rates}")
    return rates


def sample_check_prompts(vae, unet, text_encoder, tokenizer, empty_ids, arch: ToyArchitecture, adapter, *,
                         prompts: int, steps: int, seed: int) -> tuple[list[tuple[str, str, str]], list[Detection]]:
    """The first `prompts` of a fixed order of trained combinations, DDIM-sampled (guidance 5), read back."""
    combos = [training_combinations()[i] for i in
              np.random.default_rng(seed + 99).permutation(len(training_combinations()))[:prompts]]
    ids = caption_ids(tokenizer, [caption_for(*c) for c in combos], arch)
    clips = sample_teacher(vae, unet, text_encoder, ids, empty_ids, arch, adapter=adapter, steps=steps,
                           seed=seed + 98)
    return combos, [detect(clip) for clip in clips]


OPPOSITE = {name: next(other for other, o in DIRECTIONS.items() if o == (-d[0], -d[1]))
            for name, d in DIRECTIONS.items()}


@torch.no_grad()
def direction_gain(unet, adapter, text_encoder, tokenizer, video_latents: torch.Tensor, captions: list[str],
                   arch: ToyArchitecture, *, clips: int = 24, timesteps: tuple[int, ...] | None = None,
                   seed: int = 0) -> float:
    """How much the caption's direction word helps the teacher: mean over training clips and high-noise
    timesteps of x_0 error with the opposite direction / with the true one, minus 1 (0 = the word is ignored).

    A sharper read of "does the text steer the motion" than sampled clips: no sampling noise, no detector.
    With a motion `adapter` the clips are read as videos at t = 850, 950, 999 (below, the noisy clip itself
    shows which way the object goes); without, every frame as an image at t = 500, 700 (where the object
    shows through the noise but a motion trail, if the data has one, does not).
    """
    from diffusers import UNetMotionModel

    timesteps = timesteps or ((850, 950, 999) if adapter is not None else (500, 700))
    device = next(unet.parameters()).device
    model = unet.eval() if adapter is None else UNetMotionModel.from_unet2d(unet, adapter).to(device).eval()
    acp = alphas_cumprod(arch).to(device)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(captions), generator=gen)[:clips].tolist()
    true_ids = caption_ids(tokenizer, [captions[i] for i in pick], arch).to(device)
    flipped = [" ".join(OPPOSITE.get(w, w) for w in captions[i].split()) for i in pick]
    opposite_ids = caption_ids(tokenizer, flipped, arch).to(device)
    x0 = video_latents[pick].to(device)  # (N, C, F, h, w)
    if adapter is None:
        x0 = x0.permute(0, 2, 1, 3, 4).flatten(0, 1)  # every frame an image
    errors = {"true": 0.0, "opposite": 0.0}
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=gen).to(device)
        steps = torch.full((x0.shape[0],), t, device=device)
        x_t = C.add_noise(x0, noise, steps, acp)
        a = acp[t]
        for name, ids in (("true", true_ids), ("opposite", opposite_ids)):
            text = text_encoder(ids).last_hidden_state.repeat_interleave(arch.num_frames, dim=0)
            out = model(x_t, steps, encoder_hidden_states=text).sample
            x0_pred = C.predicted_original_sample(out, x_t, a.sqrt(), (1 - a).sqrt(), arch.prediction_type)
            errors[name] += float((x0_pred - x0).pow(2).mean())
    return errors["opposite"] / errors["true"] - 1.0


def check_teacher(vae, unet, text_encoder, tokenizer, empty_ids, arch: ToyArchitecture, adapter,
                  scale: ChainScale, seed: int, log) -> dict:
    """Detector-read rates of a few DDIM samples (guidance 5): logged, so a weak teacher shows up early."""
    t0 = time.perf_counter()
    combos, detections = sample_check_prompts(vae, unet, text_encoder, tokenizer, empty_ids, arch, adapter,
                                              prompts=scale.check_prompts, steps=scale.check_steps, seed=seed)
    matches = [d.matches(*combo) for d, combo in zip(detections, combos)]
    # Independent images have no direction: the image teacher is read for colour and shape only.
    keys = ("colour", "shape") if adapter is None else ("colour", "shape", "direction")
    rates = {key: float(np.mean([m[key] for m in matches])) for key in keys}
    rates["all"] = float(np.mean([all(m[k] for k in keys) for m in matches]))
    kind = "video" if adapter is not None else "image"
    log(f"teacher check ({kind}, DDIM {scale.check_steps}, guidance 5, {len(combos)} prompts, "
        f"{time.perf_counter() - t0:.0f} s): {rates}")
    return rates


def load_teacher(workdir: Path, with_motion: bool) -> dict:
    """The teacher's parts as steps 4, 5 and 5b left them in workdir, and its training clips."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    teacher = workdir / "teacher"
    video_latents, captions = _read_latents(workdir / "latents")
    return {"unet": UNet2DConditionModel.from_pretrained(teacher / "unet"),
            "adapter": MotionAdapter.from_pretrained(workdir / "teacher_motion") if with_motion else None,
            "text_encoder": CLIPTextModel.from_pretrained(teacher / "text_encoder").eval(),
            "tokenizer": CLIPTokenizer.from_pretrained(teacher / "tokenizer"),
            "vae": AutoencoderKL.from_pretrained(teacher / "vae").eval(),
            "video_latents": video_latents, "captions": captions}


def save_teacher(workdir: Path, unet, adapter, text_encoder=None) -> None:
    """What load_teacher reads back: workdir/teacher/unet, workdir/teacher_motion and, where it was trained,
    workdir/teacher/text_encoder."""
    unet.save_pretrained(workdir / "teacher" / "unet")
    adapter.save_pretrained(workdir / "teacher_motion")
    if text_encoder is not None:
        text_encoder.save_pretrained(workdir / "teacher" / "text_encoder")


# steps, batch, schedule: the ChainScale fields; check, timing: where its check and wall time are recorded; the
# rest goes to train_motion_teacher.
VIDEO_STAGES = {
    # step 5: a new motion module on the image teacher, its cross-attention and text encoder trained with it (in
    # single frames "left" and "right" look the same: only video teaches them apart).
    "motion": dict(steps="motion_steps", batch="batch_videos", lr=1e-3, seed_offset=2, spatial="cross_attention",
                   train_text_encoder=True, check="video", timing="teacher_motion_s"),
    # step 5b: the motion modules, cross-attention and text encoder fine-tuned on the clips. With every spatial
    # weight trained (v1-v4) batch 2 costs the image stage's shapes (v3: 0.58; stable targets: 1.0 -> 0.6 of 10
    # prompts); with the resnets frozen the stable-target teacher kept them (0.8 of 10).
    "finetune": dict(steps="video_finetune_steps", batch="batch_videos", lr=3e-4, seed_offset=77,
                     spatial="cross_attention", train_text_encoder=True, check="video_finetuned",
                     timing="teacher_video_finetune_s"),
    # step 5c: 5b continued at a larger batch, on t >= 300 only, the text encoder trained too. Of four such
    # continuations (benchmarks/results/default_model_teacher_sweep/README.md) the two that moved the loss to
    # high noise drew the right shape for 0.96-0.98 of prompts, the others 0.62; none learnt the direction.
    "continue": dict(steps="continue_steps", batch="batch_continue", schedule="continue_schedule_steps", lr=3e-4,
                     seed_offset=2, spatial="all", train_text_encoder=True, min_timestep=300,
                     check="video_continued", timing="teacher_continue_s"),
    # step 5d: the motion modules, cross-attention and text encoder on the pure-noise end (t >= 990), where the
    # caption is all the model has and the stable target is the caption's mean clip. After a 5b the teacher left
    # the direction word unused (direction_gain -0.0004); continued this way its x_0 error at t = 999 with the
    # word flipped rose 7% by 300 steps, against 0.01% with the clips themselves as targets
    # (benchmarks/default_model_position_probe.py --resume; results/default_model_teacher_sweep/README.md).
    # Through the chain, with the resnets frozen (every weight trained: direction_gain 0.039), its DDIM samples
    # followed the word for 9 of 10 prompts (direction_gain 0.40), but its shapes fell 0.6 -> 0.3: hence 5e.
    "pure_noise": dict(steps="pure_noise_steps", batch="batch_pure_noise", schedule="pure_noise_schedule_steps",
                       lr=1e-3, seed_offset=5, spatial="cross_attention", train_text_encoder=True, min_timestep=990,
                       check="video_pure_noise", timing="teacher_pure_noise_s"),
    # step 5e: 5d's weights serve every noise level, so 5d continues with a third of each batch on every t. From a
    # 5b teacher, this mix alone kept the shapes (0.8 -> 0.9 of 10 prompts) but hardly taught the word
    # (direction_gain 0.0002 -> 0.0046 in 400 steps at batch 12): the word is learnt first, then kept.
    "anchor": dict(steps="anchor_steps", batch="batch_anchor", schedule="anchor_schedule_steps", lr=1e-3,
                   seed_offset=6, spatial="cross_attention", train_text_encoder=True, min_timestep=990,
                   high_noise_share=2 / 3, check="video_anchored", timing="teacher_anchor_s"),
}


def train_video_teacher(workdir: Path, scale: ChainScale, arch: ToyArchitecture, seed: int, log, *,
                        stage: str, device: str = "cpu") -> dict:
    """Steps 5 to 5e (VIDEO_STAGES) on `device`: writes workdir/teacher/unet and workdir/teacher_motion
    (and teacher/text_encoder where the stage trains it), and the teacher's check (with its direction_gain) to
    teacher_check.json.

    After step 5 the teacher's frames keep their colour but not their track; 5b improves both, 5c the shapes,
    5d the direction, 5e the shapes 5d cost.
    """
    t0 = time.perf_counter()
    settings = dict(VIDEO_STAGES[stage])
    steps, check_name, timing = getattr(scale, settings.pop("steps")), settings.pop("check"), settings.pop("timing")
    batch_size = getattr(scale, settings.pop("batch"))
    if "schedule" in settings:
        settings["schedule_steps"] = getattr(scale, settings.pop("schedule"))
    parts = load_teacher(workdir, with_motion=stage != "motion")
    unet, text_encoder, vae = (parts[k].to(device) for k in ("unet", "text_encoder", "vae"))
    tokenizer = parts["tokenizer"]
    ids = caption_ids(tokenizer, parts["captions"], arch).to(device)
    empty_ids = caption_ids(tokenizer, [""], arch)[0].to(device)
    video_latents = parts["video_latents"].to(device)
    stage_seed = seed + settings.pop("seed_offset")
    if stage == "motion":
        torch.manual_seed(stage_seed)  # the new motion module's init: the same whether the chain resumed here or not
        adapter = build_motion_adapter(arch)
    else:
        adapter = parts["adapter"]
    adapter.to(device)
    reference = tuple(t.to(device) for t in same_caption_reference(parts["captions"])) if STABLE_TARGETS else None
    train_motion_teacher(unet, adapter, text_encoder, video_latents, ids, empty_ids, arch, steps=steps,
                         batch_size=batch_size, log=log, seed=stage_seed, reference=reference, **settings)
    elapsed = time.perf_counter() - t0
    check = check_teacher(vae, unet, text_encoder, tokenizer, empty_ids, arch, adapter, scale, seed, log)
    check["direction_gain"] = direction_gain(unet, adapter, text_encoder, tokenizer, video_latents,
                                             parts["captions"], arch, clips=min(24, len(parts["captions"])), seed=seed)
    log(f"direction_gain after step {stage}: {check['direction_gain']:.4f}")
    save_teacher(workdir, unet, adapter, text_encoder if settings.get("train_text_encoder") else None)
    checks = json.loads((workdir / "teacher_check.json").read_text())
    (workdir / "teacher_check.json").write_text(json.dumps({**checks, check_name: check}) + "\n")
    return {timing: elapsed}


def _write_latents(folder: Path, video_latents: torch.Tensor, captions: list[str]) -> None:
    """The distill data format "latents": latents.jsonl + one safetensors file per clip."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (latent, caption) in enumerate(zip(video_latents, captions)):
        name = f"clip_{i:05d}.safetensors"
        save_file({"latents": latent.contiguous()}, str(folder / name))
        lines.append(json.dumps({"file": name, "caption": caption}))
    (folder / "latents.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_latents(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """What _write_latents wrote: (N, C, F, h, w) latents and their captions."""
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (folder / "latents.jsonl").read_text(encoding="utf-8").splitlines()]
    return (torch.stack([load_file(str(folder / r["file"]))["latents"] for r in records]),
            [r["caption"] for r in records])


def _write_image_latents(folder: Path, video_latents: torch.Tensor, captions: list[str], per_clip: int,
                         seed: int) -> None:
    """Stage 1 trains on images: `per_clip` random frames of every clip, each its own (C, h, w) sample."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, (latent, caption) in enumerate(zip(video_latents, captions)):
        for f in rng.choice(latent.shape[1], size=per_clip, replace=False):
            name = f"frame_{i:05d}_{int(f):02d}.safetensors"
            save_file({"latents": latent[:, int(f)].contiguous()}, str(folder / name))
            lines.append(json.dumps({"file": name, "caption": caption}))
    (folder / "latents.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# Stage 1's consistency target: "ema" or "online" (LCM-LoRA's; v1-v4). From the v-prediction, zero-terminal-SNR
# teacher the online target's LoRA drew the prompt's colour in 0.29 of 24 images at 4 steps (the teacher's own
# weights under the LCM sampler, no LoRA: 1.00) and its student clips 0.54; with an EMA target (decay 0.95) the
# LoRA drew 1.00 (benchmarks/results/default_model_teacher_sweep/README.md).
STAGE1_TARGET = "ema"
# How much of the stage-1 LoRA stage 2 merges into the student (model.lora_weight). The image LoRA pulls every
# frame towards its own sharp sample and away from the caption's track: the teacher's weights under the 4-step LCM
# sampler followed the direction word for 0.79 of 24 prompts, with the whole LoRA merged 0.25 (chance), with half
# of it 0.67, with a quarter 0.75. Students at 0 and 0.5 tied at 4 steps (adherence 0.62); 0.5 drew colour and
# shape better at 1 step (0.71 / 0.50 against 0.54 / 0.46).
STAGE2_LORA_WEIGHT = 0.5
# Stage 2's solver grid (schedule.num_ddim_timesteps; stage 1 keeps LCM's 50). On 10 timesteps (skip 100) the
# target chain from pure noise to the data is 10 links long instead of 50, so 500 steps carry the teacher's guided
# trajectory, and with it the direction word, back to t = 999: over all 60 colour-shape-direction prompts the
# 4-step student followed the direction for 0.75 (grid 50: 0.53; grid 20: 0.57) and all three words for 0.57
# (0.45; 0.45). The bundle's LCM sampler then steps 999, 799, 499, 299. Grid 5 did as well but cannot sample 8 steps.
STAGE2_DDIM_TIMESTEPS = 10
# Below this timestep stage 2's grid is stage 1's 50-point one (schedule.fine_below): the coarse grid's few links
# from pure noise keep the direction, and the fine links near the data keep the shape, which grid 10 lost (squares
# with round corners). Over 300 clips (60 prompts x 5 seeds) the 4-step student read adherence 0.54 on grid 10
# (shape 0.74, direction 0.73) and 0.52 on grid 50 (0.86 / 0.59); refined below 200: 0.58, 500: 0.67, 700: 0.67,
# 800: 0.70 (shape 0.91, direction 0.76), 900: 0.59 (direction 0.65). Only 999 -> 899 -> 799 stay coarse.
STAGE2_FINE_BELOW = 800
# Both stages' teacher guidance w ~ U[GUIDANCE_W] ((1 + w) cond - w uncond). The toy teacher is weaker than SD1.5:
# past guidance 3 its samples over-saturate (LCM: U[5, 15]).
GUIDANCE_W = (1.5, 3.0)
# Stage 2's guidance from this timestep up (consistency.high_w_from / high_w_min / high_w_max): the 4-step
# sampler's second prediction (t = 799, whose input is 0.08 signal) decides the direction again, from a target
# bootstrapped down the fine links; the direction it lost there (0.82 at the first prediction, 0.75 at the
# second, on 60 clips) is what the guidance range gives. w in [4, 7] (CFG 5-8) above t = 500, [1.5, 3] below:
# 4-step adherence over 300 clips 0.78 (shape 0.91, direction 0.83, colour 1.00), against 0.70 (0.91 / 0.76)
# with [1.5, 3] throughout; [3, 5] above 500: 0.75, above 300: 0.71. Strong guidance near the data
# over-saturates this teacher (w 3-5 throughout, grid 10: colour 0.88).
STAGE2_HIGH_W_FROM = 500
STAGE2_HIGH_W = (4.0, 7.0)
# Half of stage 2's solver steps start from the target's own one-step x_0 (re-noised) instead of a data latent
# (consistency.sampler_inputs): the blurry input the sampler's later steps get, which noised data never shows. Over
# 300 clips at 999/799/499/299 it lifts shape from 0.91 to 0.99 (adherence 0.82; 0.25: 0.82, 1.0: 0.80), but not
# the direction (0.83): from such an x_799 the guided teacher itself re-decides it (0.76 of 120 clips, against
# 0.96 read from the first prediction), so the targets there teach the student to re-decide too.
STAGE2_SAMPLER_INPUTS = 0.5
# The bundle's 4- and 8-step schedules (export default_timesteps): a second step at 699 instead of LCM's 799 keeps
# the first prediction's direction (0.08 of the signal at 799 is re-decided; more at 699 is kept), and the student
# trained on sampler inputs sharpens it from there. Chosen on a second seed sample (seed base 20000, 180 clips):
# 4 steps 999/699/399/199 0.90 against LCM's 999/799/499/299 0.83, 999/599/399/199 0.88, 999/499/299/199 0.88;
# 8 steps 999/699/599/.../99 0.86 against LCM's 999/899/799/699/499/.../199 0.77. 2 steps keep LCM's 999/499
# (0.82; 999/599 0.80, 999/699 0.73).
DEFAULT_TIMESTEPS = {4: (999, 699, 399, 199), 8: (999, 699, 599, 499, 399, 299, 199, 99)}


def distill_configs(workdir: Path, scale: ChainScale, arch: ToyArchitecture, seed: int) -> tuple[dict, dict]:
    """Stage 1 and stage 2 configs, written to workdir as a user would write them."""
    schedule = {"beta_schedule": "linear", "beta_start": arch.beta_start, "beta_end": arch.beta_end,
                "prediction_type": arch.prediction_type, "rescale_betas_zero_snr": arch.rescale_betas_zero_snr,
                "num_ddim_timesteps": 50}
    consistency = {"w_min": GUIDANCE_W[0], "w_max": GUIDANCE_W[1], "loss_type": "huber", "huber_c": 0.001}
    train = {"batch_size": scale.batch_images, "learning_rate": 1e-3, "lr_scheduler": "cosine",
             "lr_warmup_steps": 20, "checkpointing_steps": 200, "checkpoints_total_limit": 1, "resume": "auto",
             "report_to": "tensorboard", "log_every": 25, "adam_weight_decay": 0.0}
    stage1 = {
        "stage": "image", "schedule": schedule, "model": {"pretrained": str(workdir / "teacher")},
        "data": {"kind": "latents", "root": str(workdir / "image_latents"), "resolution": arch.resolution},
        "train": {**train, "output_dir": str(workdir / "stage1"), "max_train_steps": scale.stage1_steps,
                  "seed": seed + 3},
        "lora": {"rank": 16, "alpha": 16.0},
        "consistency": {**consistency, "target": STAGE1_TARGET},  # "ema": the config's decay, 0.95
    }
    stage2 = {
        "stage": "video", "schedule": {**schedule, "num_ddim_timesteps": STAGE2_DDIM_TIMESTEPS,
                                       "fine_ddim_timesteps": 50, "fine_below": STAGE2_FINE_BELOW},
        # Temporal layers start from the teacher's (not zero): at toy compute this converges in
        # hundreds of steps; the spatial LoRA still reaches the target only through the EMA.
        "model": {"pretrained": str(workdir / "teacher"), "motion_adapter": str(workdir / "teacher_motion"),
                  "lora": str(workdir / "stage1" / "lora"), "lora_weight": STAGE2_LORA_WEIGHT,
                  "student_motion_init": "teacher"},
        "data": {"kind": "latents", "root": str(workdir / "latents"), "resolution": arch.resolution,
                 "num_frames": arch.num_frames},
        "train": {**train, "batch_size": scale.batch_videos, "output_dir": str(workdir / "stage2"),
                  "max_train_steps": scale.stage2_steps, "seed": seed + 4},
        "consistency": {**consistency, "target": "ema", "ema_decay": 0.95, "high_w_from": STAGE2_HIGH_W_FROM,
                        "high_w_min": STAGE2_HIGH_W[0], "high_w_max": STAGE2_HIGH_W[1],
                        "sampler_inputs": STAGE2_SAMPLER_INPUTS},
    }
    return stage1, stage2


def distill_student(workdir: Path, scale: ChainScale, arch: ToyArchitecture, seed: int, log, *,
                    fresh: bool = False) -> dict:
    """Steps 6-7: `lcm-edge distill image` then `lcm-edge distill video` on the teachers.

    fresh=True drops earlier stage outputs (their checkpoints would resume a student of an older teacher).
    """
    from ..config import load_config
    from ..train import train

    if fresh:
        for name in ("stage1", "stage2"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    video_latents, captions = _read_latents(workdir / "latents")
    _write_image_latents(workdir / "image_latents", video_latents, captions, 4, seed)
    timings = {}
    for name, config in zip(("stage1", "stage2"), distill_configs(workdir, scale, arch, seed)):
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        log(f"{name}: lcm-edge distill {config['stage']} --config {path}")
        # A stage resumed from its checkpoints adds to the time of its earlier runs (kept beside its output, and
        # updated after every optimizer step, so a run stopped mid-stage counts too): a chain that continues after
        # a finished stage 1 records stage 1's training time, not the resume's.
        spent = workdir / name / "chain_seconds.json"
        earlier = json.loads(spent.read_text())["seconds"] if spent.is_file() else 0.0
        t0 = time.perf_counter()
        record = lambda *_: _write_seconds(spent, earlier + time.perf_counter() - t0)  # noqa: E731
        train(load_config(path), callback=record)
        timings[f"{name}_s"] = earlier + time.perf_counter() - t0
        _write_seconds(spent, timings[f"{name}_s"])
    return timings


def _write_seconds(path: Path, seconds: float) -> None:
    """chain_seconds.json, replaced whole: a stop mid-write leaves the previous count, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"seconds": seconds}) + "\n")
    os.replace(tmp, path)


def portable(record, places: dict[str, Path]):
    """`record` with every path under one of `places` (name -> folder) written as NAME/relative: a shipped
    bundle names where its parts came from without carrying the builder's folders."""
    if isinstance(record, dict):
        return {key: portable(value, places) for key, value in record.items()}
    if isinstance(record, list):
        return [portable(value, places) for value in record]
    if isinstance(record, str):  # word by word, so a command line is rewritten too
        return " ".join(_portable_word(word, places) for word in record.split(" "))
    return record


def _portable_word(word: str, places: dict[str, Path]) -> str:
    for name, folder in places.items():
        for prefix in (str(folder.resolve()), str(folder).rstrip("/")):
            if word == prefix or word.startswith(prefix + "/"):
                return name + word[len(prefix):]
    return word


def export_student(workdir: Path, bundle: Path, provenance: dict) -> dict:
    """Step 8: the stage-2 model folder through the project's exporter (ONNX only: a few MB)."""
    from lcm_edge.export import export_bundle, load_diffusers_folder

    t0 = time.perf_counter()
    components = load_diffusers_folder(workdir / "stage2" / "model")
    record = portable({**components.source, **provenance}, {"WORKDIR": workdir, "OUT": bundle})
    report = export_bundle(bundle, **components.export_kwargs(), default_frames=16, default_fps=8,
                           provenance=record, overwrite=True, default_timesteps=DEFAULT_TIMESTEPS)
    return {"export_s": time.perf_counter() - t0, "parity": report.summary()}


def _without_note(argv: list[str]) -> list[str]:
    """The command line with --note's text as NOTE: the note is recorded on its own, and changes no result."""
    return ["NOTE" if i and argv[i - 1] == "--note" else "--note=NOTE" if word.startswith("--note=") else word
            for i, word in enumerate(argv)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--bundle", type=Path, required=True, help="where the exported bundle goes")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--continue-device", default="cpu",
                        help="where step 5c trains (a scale with continue_steps): e.g. cuda; every other step "
                             "runs on the CPU")
    parser.add_argument("--note", default=None,
                        help="recorded in the bundle's provenance (e.g. where a step ran, if not in this command)")
    args = parser.parse_args(argv)
    try:
        continue_device = torch.device(args.continue_device)
    except RuntimeError as error:
        parser.error(f"--continue-device {args.continue_device!r}: {error}; use cpu or cuda")
    if continue_device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--continue-device {args.continue_device}: this torch sees no CUDA device; use cpu (step 5c "
                     "then takes ~3 h on 2 cores) or run the chain where a GPU is")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    arch, scale = ToyArchitecture(), SCALES[args.scale]
    log = lambda message: print(message, flush=True)  # noqa: E731
    start = time.perf_counter()
    # Each step leaves a marker (its timings), so an interrupted chain continues where it stopped.
    steps = {
        "teacher_image.json": lambda: pretrain_image_teacher(args.workdir, scale, arch, args.seed, log),
        "teacher_motion.json": lambda: train_video_teacher(args.workdir, scale, arch, args.seed, log,
                                                           stage="motion"),
        "teacher_finetune.json": lambda: train_video_teacher(args.workdir, scale, arch, args.seed, log,
                                                             stage="finetune"),
        "teacher_continue.json": lambda: train_video_teacher(args.workdir, scale, arch, args.seed, log,
                                                             stage="continue", device=args.continue_device),
        "teacher_pure_noise.json": lambda: train_video_teacher(args.workdir, scale, arch, args.seed, log,
                                                               stage="pure_noise"),
        "teacher_anchor.json": lambda: train_video_teacher(args.workdir, scale, arch, args.seed, log,
                                                           stage="anchor"),
        "distill.json": lambda: distill_student(args.workdir, scale, arch, args.seed, log, fresh=retrained),
    }
    if not scale.continue_steps:
        del steps["teacher_continue.json"]
    if not scale.pure_noise_steps:
        del steps["teacher_pure_noise.json"]
    if not scale.anchor_steps:
        del steps["teacher_anchor.json"]
    timings, retrained = {}, False
    for marker, run in steps.items():
        path = args.workdir / marker
        # Once a step runs, every later one runs again: its output came from the step's old result (a workdir
        # resumed at a scale that adds 5c runs 5c, then distils anew). The old marker goes first, so a step
        # that fails here is rerun next time rather than taken as done.
        if retrained or not path.is_file():
            path.unlink(missing_ok=True)
            path.write_text(json.dumps(run()) + "\n")
            retrained = True
        timings.update(json.loads(path.read_text()))
    teacher_check = json.loads((args.workdir / "teacher_check.json").read_text())
    command = "python -m lcm_edge.distill.default_model.chain " + shlex.join(_without_note(argv or sys.argv[1:]))
    provenance = {
        "default_model": {
            "command": command,
            "seed": args.seed, "scale": asdict(scale), "architecture": asdict(arch), "code_version": code_version(),
            "held_out": [list(c) for c in HELD_OUT], "timings_s": timings, "prompts": prompt_form(),
            "teacher_check": teacher_check,
            "torch_threads": torch.get_num_threads(), "continue_device": args.continue_device,
            **({"note": args.note} if args.note else {}),
        }
    }
    result = export_student(args.workdir, args.bundle, provenance)
    log(result["parity"])
    log(f"chain done in {time.perf_counter() - start:.0f} s this run; step timings {json.dumps(timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
