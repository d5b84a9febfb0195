"""Teachers for the default model: plain diffusion training of a tiny SD-style family.

AnimateLCM distils SD1.5 + AnimateDiff; here there is no SD1.5, so the same family is trained
from scratch at toy size on synthetic clips: an AutoencoderKL, a CLIP text encoder trained
jointly with the image UNet (ToyArchitecture's parameterisation and schedule, 10% empty captions
so classifier-free guidance works), then an AnimateDiff-style motion module on the frozen
image model. Stage 1 and stage 2 of `lcm_edge.distill` then distil these teachers. The loss is
`lcm_edge.distill.pretrain.diffusion_loss` (with Stable Target Field targets where the caller gives
a reference); this module adds the models and what each trains.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lcm_edge.errors import InvalidArgumentError

from ..consistency import make_alphas_cumprod
from ..pretrain import diffusion_loss

Log = Callable[[str], None]


@dataclass(frozen=True)
class ToyArchitecture:
    """Sizes of the default model. 64x64 px clips, VAE /4 -> 16x16 latents, UNet /2."""

    resolution: int = 64
    num_frames: int = 16
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 32)
    # Three levels put a 4x4 grid at the bottom, where zero padding tells every cell where it is (a word that
    # decides where the object is in frame k needs that); v1-v4 of the default model had two, (32, 64).
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_groups: int = 8
    # diffusers' UNet2DConditionModel reads attention_head_dim as the number of heads (its documented naming
    # quirk): 8 heads, so 4 channels per head at 32 channels and 8 at 64. A tuple gives one value per level.
    attention_head_dim: int | tuple[int, ...] = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 16
    motion_heads: int = 4
    motion_max_frames: int = 32
    # AnimateLCM's adapter has a motion module in the mid block too; v1-v4 of the default model did not.
    motion_mid_block: bool = False
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # v-prediction on zero terminal SNR (Lin et al. 2024; v1-v4 were AnimateLCM's epsilon on the linear betas):
    # the teacher learns to start from pure noise, where the caption alone decides which way the clip goes
    # (under the linear betas the noisy clip still shows the track at t = 999). With stable targets and steps
    # 5d-5e (chain.STABLE_TARGETS) this made the direction word used
    # (benchmarks/research/default_model_teacher_sweep/README.md).
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


def build_vae(arch: ToyArchitecture) -> AutoencoderKL:
    n = len(arch.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
                         block_out_channels=arch.vae_channels, layers_per_block=1, norm_num_groups=16,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         sample_size=arch.resolution, scaling_factor=1.0,
                         # Fully convolutional: trains on crops (4x cheaper) and works the same on whole frames.
                         mid_block_add_attention=False)


def build_text_encoder(arch: ToyArchitecture, vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=arch.text_hidden, intermediate_size=arch.text_hidden * 4,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.text_max_length, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=eos_id, hidden_act="quick_gelu"))


def build_unet(arch: ToyArchitecture) -> UNet2DConditionModel:
    """SD1.5's layout at toy size: cross-attention at every level but the last (one level per unet_channels)."""
    levels = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.resolution // arch.vae_scale, in_channels=arch.latent_channels,
        out_channels=arch.latent_channels, block_out_channels=arch.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=arch.text_hidden, attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.unet_groups)


def build_motion_adapter(arch: ToyArchitecture) -> MotionAdapter:
    return MotionAdapter(block_out_channels=arch.unet_channels, motion_layers_per_block=1,
                         motion_norm_num_groups=arch.unet_groups, motion_num_attention_heads=arch.motion_heads,
                         motion_max_seq_length=arch.motion_max_frames,
                         use_motion_mid_block=arch.motion_mid_block)


def alphas_cumprod(arch: ToyArchitecture, num_train_timesteps: int = 1000) -> torch.Tensor:
    return make_alphas_cumprod("linear", arch.beta_start, arch.beta_end, num_train_timesteps,
                               arch.rescale_betas_zero_snr)


def ddim_scheduler(arch: ToyArchitecture) -> DDIMScheduler:
    """The teachers' DDIM sampler (saved as teacher/scheduler). At zero terminal SNR, "trailing" spacing
    starts sampling at t = 999, the pure noise such a model was trained to start from."""
    spacing = dict(timestep_spacing="trailing") if arch.rescale_betas_zero_snr else dict(steps_offset=1)
    return DDIMScheduler(beta_start=arch.beta_start, beta_end=arch.beta_end, beta_schedule="linear",
                         prediction_type=arch.prediction_type, rescale_betas_zero_snr=arch.rescale_betas_zero_snr,
                         clip_sample=False, set_alpha_to_one=False, **spacing)


def _lr(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%: short runs need both to converge."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


Checkpoint = Callable[[int], None]


def _optimise(name: str, params: list[torch.nn.Parameter], loss_fn: Callable[[int], torch.Tensor], *, steps: int,
              lr: float, weight_decay: float, warmup: int, log: Log, on_checkpoint: Checkpoint | None = None,
              checkpoint_every: int = 0, schedule_steps: int | None = None) -> list[float]:
    """AdamW with warm-up + cosine, gradient clipping at 1, a log line every tenth of the run.

    on_checkpoint(step) runs every `checkpoint_every` steps (a quality check during long runs).
    schedule_steps > steps: the warm-up + cosine of a run that long, stopped after `steps`.
    """
    if schedule_steps is not None and schedule_steps < steps:
        raise InvalidArgumentError("schedule_steps", f"{schedule_steps} is below steps={steps}",
                                   "give at least `steps` (a longer schedule stopped early), or None")
    total = schedule_steps or steps
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, lr, warmup=min(warmup, total // 10 + 1))
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(step + 1)
    return losses


DECODER_NOISE = 0.15


def train_vae(vae: AutoencoderKL, frames: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
              log: Log, crop: int | None = None) -> list[float]:
    """frames: float (N, 3, H, W) in [-1, 1]. L1 + MSE reconstruction, a small KL keeps the posterior a distribution.

    The decoder also sees latents with extra noise (DECODER_NOISE of their spread): a diffusion model's
    samples are never exact latents, and a decoder trained only on exact ones turns the residue into specks.

    crop: train on random crop x crop windows (the VAE has no attention, so nothing depends on frame size).
    """
    gen = torch.Generator().manual_seed(seed)
    height, width = frames.shape[-2:]

    def loss_fn(_step: int) -> torch.Tensor:
        batch = frames[torch.randint(0, frames.shape[0], (batch_size,), generator=gen).to(frames.device)]
        if crop is not None:
            top = int(torch.randint(0, height - crop + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - crop + 1, (1,), generator=gen))
            batch = batch[..., top:top + crop, left:left + crop]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(batch.device)
        spread = posterior.mean.detach().std()
        z = z + DECODER_NOISE * spread * torch.randn(z.shape, generator=gen).to(batch.device)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        return F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-5 * kl

    vae.train()
    losses = _optimise("vae", list(vae.parameters()), loss_fn, steps=steps, lr=lr, weight_decay=0.0, warmup=100,
                       log=log)
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, frames: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior means, scaled so the latents have unit standard deviation (sets scaling_factor)."""
    means = torch.cat([vae.encode(frames[i:i + batch_size]).latent_dist.mean
                       for i in range(0, frames.shape[0], batch_size)])
    scale = 1.0 / float(means.std())
    vae.register_to_config(scaling_factor=scale)
    return means * scale


def _captions_with_drop(source: torch.Tensor, empty: torch.Tensor, batch_size: int, probability: float,
                        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random batch of indices, their captions with `probability` of them made empty (for CFG), and which."""
    idx = torch.randint(0, source.shape[0], (batch_size,), generator=gen).to(source.device)
    captions = source[idx].clone()
    dropped = (torch.rand(batch_size, generator=gen) < probability).to(source.device)
    captions[dropped] = empty
    return idx, captions, dropped


Reference = tuple[torch.Tensor, torch.Tensor]  # pretrain.same_caption_reference: (N, R) indices, (N, R) mask


def _stable_target(latents: torch.Tensor, idx: torch.Tensor, dropped: torch.Tensor,
                   reference: Reference | None) -> dict:
    """diffusion_loss's reference for a batch: each sample's same-caption samples; a sample whose caption was
    dropped keeps itself alone (its caption no longer says which clips it shares)."""
    if reference is None:
        return {}
    index, mask = reference[0][idx], reference[1][idx].clone()
    mask[dropped, 1:] = False
    return {"reference": latents[index], "reference_mask": mask}


def train_image_teacher(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, latents: torch.Tensor,
                        input_ids: torch.Tensor, empty_ids: torch.Tensor, arch: ToyArchitecture, *, steps: int,
                        batch_size: int, lr: float, seed: int, log: Log, uncond_probability: float = 0.1,
                        on_checkpoint: Checkpoint | None = None, checkpoint_every: int = 0,
                        reference: Reference | None = None) -> list[float]:
    """latents (N, C, h, w) with captions input_ids (N, L). arch.prediction_type's loss; text encoder trains jointly.

    reference (same_caption_reference over the N captions): Stable Target Field targets (diffusion_loss)."""
    gen = torch.Generator().manual_seed(seed)
    acp = alphas_cumprod(arch)

    def denoiser(x_t, t, caption_ids):  # the text encoder learns through the UNet's loss
        return unet(x_t, t, encoder_hidden_states=text_encoder(caption_ids).last_hidden_state).sample

    def loss_fn(_step: int) -> torch.Tensor:
        idx, ids, dropped = _captions_with_drop(input_ids, empty_ids, batch_size, uncond_probability, gen)
        return diffusion_loss(denoiser, latents[idx], ids, acp, arch.prediction_type, gen,
                              **_stable_target(latents, idx, dropped, reference))

    def checkpoint(step: int) -> None:
        unet.eval()
        text_encoder.eval()
        on_checkpoint(step)
        unet.train()
        text_encoder.train()

    unet.train()
    text_encoder.train()
    losses = _optimise("teacher-image", list(unet.parameters()) + list(text_encoder.parameters()), loss_fn,
                       steps=steps, lr=lr, weight_decay=1e-4, warmup=200, log=log,
                       on_checkpoint=checkpoint if on_checkpoint else None, checkpoint_every=checkpoint_every)
    unet.eval()
    text_encoder.eval()
    return losses


def train_motion_teacher(unet: UNet2DConditionModel, adapter: MotionAdapter, text_encoder: CLIPTextModel,
                         video_latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor,
                         arch: ToyArchitecture, *, steps: int, batch_size: int, lr: float, seed: int, log: Log,
                         uncond_probability: float = 0.1, spatial: str = "cross_attention",
                         min_timestep: int = 0, x0_weight_cap: float = 0.0, train_text_encoder: bool = False,
                         on_checkpoint: Checkpoint | None = None, checkpoint_every: int = 0,
                         schedule_steps: int | None = None, reference: Reference | None = None,
                         high_noise_share: float = 1.0) -> list[float]:
    """AnimateDiff's recipe (video_latents (N, C, F, h, w)), with the cross-attention layers trained too.

    spatial="all" trains every spatial weight with the motion modules (a video fine-tune of the
    whole teacher), "none" the motion modules alone; the default trains the cross-attention too.
    min_timestep > 0 trains on high noise only (high_noise_share < 1: that share of each batch, the rest on every t;
    see diffusion_loss); x0_weight_cap > 0 weights the loss towards it (see diffusion_loss).
    schedule_steps: see _optimise. reference (same_caption_reference over the N captions): Stable Target Field
    targets (diffusion_loss), the caption's mean clip where the noise hides the clip.
    train_text_encoder=True trains the text encoder with them (updated in place): the image teacher's
    text encoder had no reason to tell "left" from "right" (a direction token moves its output by
    ~1/10 of what a colour token does), so frozen it hides the direction from every later layer.

    AnimateDiff's motion modules see no text: a direction word reaches them only through the
    spatial features. SD1.5 learnt from captions what motion words look like; this image teacher
    saw single frames, where "left" and "right" look the same, so it learnt to ignore them. Training
    its cross-attention (attn2, 35k weights) with the motion modules lets the words through; every
    other spatial weight stays frozen. The updated cross-attention is written back into `unet`.
    """
    gen = torch.Generator().manual_seed(seed)
    acp = alphas_cumprod(arch)
    device = next(unet.parameters()).device
    model = UNetMotionModel.from_unet2d(unet, adapter).to(device)
    model.freeze_unet2d_params()
    if spatial not in ("none", "cross_attention", "all"):
        raise ValueError(f"spatial={spatial!r}: use 'none', 'cross_attention' or 'all'")
    for name, param in model.named_parameters():
        if spatial == "all" or (spatial == "cross_attention" and ".attn2." in name):
            param.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    if train_text_encoder:
        params += list(text_encoder.parameters())
        text_encoder.train()
    else:
        with torch.no_grad():
            contexts = text_encoder(input_ids).last_hidden_state
            empty = text_encoder(empty_ids[None]).last_hidden_state[0]

    def denoiser(x_t, t, text):  # diffusers' pipelines repeat the prompt embedding per frame
        return model(x_t, t, encoder_hidden_states=text.repeat_interleave(x_t.shape[2], dim=0)).sample

    def loss_fn(_step: int) -> torch.Tensor:
        if train_text_encoder:
            idx, ids, dropped = _captions_with_drop(input_ids, empty_ids, batch_size, uncond_probability, gen)
            context = text_encoder(ids).last_hidden_state
        else:
            idx, context, dropped = _captions_with_drop(contexts, empty, batch_size, uncond_probability, gen)
        return diffusion_loss(denoiser, video_latents[idx], context, acp, arch.prediction_type, gen, min_timestep,
                              x0_weight_cap, high_noise_share=high_noise_share,
                              **_stable_target(video_latents, idx, dropped, reference))

    def write_back() -> None:
        # from_unet2d copied the weights; copy the trained ones back (strict: the same keys on both sides).
        state = model.state_dict()
        adapter.load_state_dict({k: v for k, v in state.items() if "motion_modules" in k})
        unet.load_state_dict({k: v for k, v in state.items() if "motion_modules" not in k})

    def checkpoint(step: int) -> None:
        model.eval()
        text_encoder.eval()
        write_back()
        on_checkpoint(step)
        model.train()
        text_encoder.train(train_text_encoder)

    model.train()
    losses = _optimise("teacher-motion", params, loss_fn, steps=steps, lr=lr, weight_decay=1e-4, warmup=200, log=log,
                       on_checkpoint=checkpoint if on_checkpoint else None, checkpoint_every=checkpoint_every,
                       schedule_steps=schedule_steps)
    model.eval()
    text_encoder.eval()
    write_back()
    return losses


@torch.no_grad()
def sample_teacher(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                   prompt_ids: torch.Tensor, empty_ids: torch.Tensor, arch: ToyArchitecture, *,
                   adapter: MotionAdapter | None = None, steps: int = 25, guidance: float = 5.0, seed: int = 0,
                   ) -> np.ndarray:
    """DDIM with classifier-free guidance, one clip per prompt: (P, F, H, W, 3) uint8.

    A check of the teachers before hours go into distilling them; without `adapter` every frame is an
    independent image (the image teacher's view).
    """
    scheduler = ddim_scheduler(arch)
    scheduler.set_timesteps(steps)
    frames, size = arch.num_frames, arch.resolution // arch.vae_scale
    device = next(unet.parameters()).device
    model = unet if adapter is None else UNetMotionModel.from_unet2d(unet, adapter).to(device).eval()
    prompt_ids, empty_ids = prompt_ids.to(device), empty_ids.to(device)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for ids in prompt_ids:
        text = text_encoder(torch.stack([empty_ids, ids])).last_hidden_state  # (2, L, D)
        x = torch.randn((1, arch.latent_channels, frames, size, size), generator=gen).to(device)
        for t in scheduler.timesteps:
            if adapter is None:  # frames as a batch of images
                flat = x[0].permute(1, 0, 2, 3)
                pred = torch.cat([unet(flat, t, encoder_hidden_states=c[None].expand(frames, -1, -1)).sample[None]
                                  for c in text]).permute(0, 2, 1, 3, 4)
            else:
                pred = model(x.expand(2, -1, -1, -1, -1), t,
                             encoder_hidden_states=text.repeat_interleave(frames, dim=0)).sample
            pred = pred[0:1] + guidance * (pred[1:2] - pred[0:1])  # linear in eps, v and x_0 alike
            x = scheduler.step(pred, t, x).prev_sample
        latents = x[0].permute(1, 0, 2, 3) / vae.config.scaling_factor
        pixels = vae.decode(latents).sample.clamp(-1, 1)
        out.append(((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.stack(out)
