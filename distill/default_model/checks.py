"""Reading the default model's teachers back while they train: detector rates of sampled clips, how much the
direction word moves the teacher's x_0 prediction, and the teacher's folders in a chain workdir."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .. import consistency as C
from ..data import read_latents
from ..synthetic import DIRECTIONS, caption_for, synthetic_clips
from .clips import caption_ids, clip_frames, training_combinations
from .detector import Detection, detect
from .pretrain import ToyArchitecture, alphas_cumprod, sample_teacher


@torch.no_grad()
def check_vae(vae, arch: ToyArchitecture, seed: int, log, count: int = 20) -> dict:
    """Detector-read rate of VAE reconstructions of clips never trained on, and their mean abs error (0-255)."""
    clips = synthetic_clips(count, seed=seed + 97, size=arch.resolution, num_frames=arch.num_frames)
    hits, errors = [], []
    for clip in clips:
        x = clip_frames(clip.frames[None])[0]
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


def check_teacher(vae, unet, text_encoder, tokenizer, empty_ids, arch: ToyArchitecture, adapter, *,
                  prompts: int, steps: int, seed: int, log) -> dict:
    """Detector-read rates of a few DDIM samples (guidance 5): logged, so a weak teacher shows up early."""
    t0 = time.perf_counter()
    combos, detections = sample_check_prompts(vae, unet, text_encoder, tokenizer, empty_ids, arch, adapter,
                                              prompts=prompts, steps=steps, seed=seed)
    matches = [d.matches(*combo) for d, combo in zip(detections, combos)]
    # Independent images have no direction: the image teacher is read for colour and shape only.
    keys = ("colour", "shape") if adapter is None else ("colour", "shape", "direction")
    rates = {key: float(np.mean([m[key] for m in matches])) for key in keys}
    rates["all"] = float(np.mean([all(m[k] for k in keys) for m in matches]))
    kind = "video" if adapter is not None else "image"
    log(f"teacher check ({kind}, DDIM {steps}, guidance 5, {len(combos)} prompts, "
        f"{time.perf_counter() - t0:.0f} s): {rates}")
    return rates


def load_teacher(workdir: Path, with_motion: bool) -> dict:
    """The teacher's parts as the chain's teacher stages leave them in workdir, and its training latents."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    teacher = workdir / "teacher"
    video_latents, captions = read_latents(workdir / "latents")
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
