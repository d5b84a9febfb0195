"""Models of decoupled consistency learning: loading, inflating, LoRA, the EMA target, the i2v adapter.

Everything here is a small function over diffusers/peft modules; train.py decides which stage uses what.

- `load_base`             SD1.5-family diffusers folder (+ motion module) from local files only
- `inflate`               2-D UNet + MotionAdapter -> UNetMotionModel (frames folded into the batch)
- `fresh_motion_adapter`  new temporal layers with zero output projections (identity at step 0)
- `add_lora`              a peft LoRA on the spatial layers (never on temporal ones)
- `Denoiser`              one call signature for image, video and image-to-video models
- `EMATarget`             the target network theta^- of consistency distillation
- `FirstFrameAdapter`     the image-to-video adapter trained from scratch by stage "adapter"
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from . import consistency as C
from .config import LoraSpec, ModelConfig, ScheduleConfig
from .errors import CheckpointError, ConfigError


@dataclass
class BaseModels:
    """The pretrained pieces a run starts from (all frozen unless a stage says otherwise)."""

    unet: UNet2DConditionModel
    text_encoder: nn.Module
    tokenizer: object
    vae: AutoencoderKL | None = None
    motion_adapter: MotionAdapter | None = None


# ----------------------------------------------------------------------------------------------
# Loading and saving


def load_base(model: ModelConfig, *, need_vae: bool) -> BaseModels:
    """Read `model.pretrained` (unet/ text_encoder/ tokenizer/ [vae/]) and `model.motion_adapter`."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(model.pretrained)
    if not root.is_dir():
        raise ConfigError("model.pretrained", f"{root} is not a folder",
                          "point it at a diffusers SD1.5-family folder (unet/ vae/ text_encoder/ tokenizer/)")
    needed = ["unet", "text_encoder", "tokenizer"] + (["vae"] if need_vae else [])
    missing = [name for name in needed if not (root / name).is_dir()]
    if missing:
        raise ConfigError("model.pretrained", f"{root} lacks sub-folder(s) {missing}",
                          "save the pipeline with save_pretrained(), or copy the missing folders in")
    unet_class = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8")).get("_class_name")
    if unet_class != "UNet2DConditionModel":
        raise ConfigError("model.pretrained", f"{root / 'unet'} holds a {unet_class}, not a UNet2DConditionModel",
                          "point model.pretrained at the 2-D base model; the motion module goes in "
                          "model.motion_adapter")
    base = BaseModels(
        unet=UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
        vae=AutoencoderKL.from_pretrained(root / "vae", local_files_only=True) if need_vae else None,
    )
    if model.motion_adapter is not None:
        base.motion_adapter = load_motion_adapter(model.motion_adapter, base.unet)
    return base


def load_motion_adapter(path: str | Path, unet: UNet2DConditionModel) -> MotionAdapter:
    """A MotionAdapter folder, or an original AnimateDiff/AnimateLCM .ckpt/.safetensors (via the exporter)."""
    from lcm_edge.export.motion_module import check_fits_unet, load_motion_module

    loaded = load_motion_module(path, argument="model.motion_adapter")
    check_fits_unet(loaded.config, unet.config, argument="model.motion_adapter")
    return loaded.adapter


def save_base(base: BaseModels, folder: str | Path, schedule: ScheduleConfig) -> Path:
    """Write a diffusers folder (what `model.pretrained` reads, and what `lcm-edge export` reads).

    scheduler/ holds the LCMScheduler config of `schedule`: the schedule the weights are meant for.
    """
    folder = Path(folder)
    base.unet.save_pretrained(folder / "unet")
    base.text_encoder.save_pretrained(folder / "text_encoder")
    base.tokenizer.save_pretrained(folder / "tokenizer")
    if base.vae is not None:
        base.vae.save_pretrained(folder / "vae")
    if base.motion_adapter is not None:
        base.motion_adapter.save_pretrained(folder / "motion_adapter")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(schedule.lcm_scheduler_config(), indent=2) + "\n", encoding="utf-8")
    return folder


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP last hidden states (b, 77, d) of the prompts, padded to the tokenizer's max length."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


# ----------------------------------------------------------------------------------------------
# Inflation: 2-D -> video


def inflate(unet: UNet2DConditionModel, motion_adapter: MotionAdapter) -> UNetMotionModel:
    """Insert temporal layers after each spatial block (AnimateDiff): frames fold into the batch for the
    2-D layers, so GroupNorm statistics stay per frame; the temporal transformers attend across frames."""
    with torch.device(unet.device):  # build where the weights are: no 1.3B-parameter random init on the host
        return UNetMotionModel.from_unet2d(unet, motion_adapter)


def zero_motion_outputs_(module: nn.Module) -> int:
    """Zero the output projection of every temporal transformer; returns how many were zeroed.

    Each AnimateDiffTransformer3D returns proj_out(...) + its input (the block-level residual), so with
    proj_out = 0 a new motion module is the identity and the inflated model reproduces the image model
    frame by frame. diffusers' MotionAdapter() does NOT do this (it leaves nn.Linear's default init);
    AnimateDiff's original code does (zero_initialize=True).
    """
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    count = 0
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, AnimateDiffTransformer3D):
                sub.proj_out.weight.zero_()
                sub.proj_out.bias.zero_()
                count += 1
    return count


def fresh_motion_adapter(like: MotionAdapter) -> MotionAdapter:
    """New temporal layers with the architecture of `like`, zero-initialised outputs (identity)."""
    with torch.device(like.device):
        adapter = MotionAdapter.from_config(like.config)
    if zero_motion_outputs_(adapter) == 0:
        raise ConfigError("model.motion_adapter", "the motion adapter has no temporal transformers",
                          "use an AnimateDiff-style MotionAdapter")
    return adapter


def is_motion_parameter(name: str) -> bool:
    return "motion_modules" in name


# ----------------------------------------------------------------------------------------------
# LoRA


def add_lora(unet: nn.Module, spec: LoraSpec, adapter_name: str = "default") -> None:
    """A peft LoRA on the spatial layers named in `spec.target_modules`; freezes everything else.

    B starts at zero (peft's default), so the LoRA'd model equals the base at step 0. On a UNetMotionModel
    the temporal layers are excluded: their names (proj_in, to_q, ...) repeat the spatial ones.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    targets: list[str] | str = list(spec.target_modules)
    if any(is_motion_parameter(n) for n, _ in unet.named_modules()):
        names = "|".join(re.escape(t) for t in spec.target_modules)
        targets = rf"^(?!.*motion_modules).*\.({names})$"
    unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                target_modules=targets, init_lora_weights=True), adapter_name=adapter_name)


# ----------------------------------------------------------------------------------------------
# The image-to-video adapter


class FirstFrameAdapter(ModelMixin, ConfigMixin):
    """Image-to-video adapter: the first frame's clean latent -> residuals for the UNet's down blocks.

    A small conv pyramid reads the latent; one zero-initialised 1x1 conv per UNet skip connection (the
    points where a ControlNet injects) maps it to that skip's channels, and a learnt per-frame gain
    (initially 1) lets the model weigh the condition by frame position. Zero outputs make the untrained
    adapter leave the video model unchanged, so teacher-free training starts from the distilled model.
    """

    @register_to_config
    def __init__(self, latent_channels: int = 4, block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
                 layers_per_block: int = 2, hidden_channels: int = 64, max_frames: int = 32):
        super().__init__()
        levels = len(block_out_channels)
        self.stem = nn.Sequential(nn.Conv2d(latent_channels, hidden_channels, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1), nn.SiLU())
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hidden_channels, hidden_channels, 3, stride=2, padding=1), nn.SiLU())
            for _ in range(levels - 1))
        # The UNet's skip connections, in order: conv_in, then per block its resnets (+ its downsampler).
        self.skip_levels: list[int] = [0]
        skip_channels = [block_out_channels[0]]
        for i, ch in enumerate(block_out_channels):
            self.skip_levels += [i] * layers_per_block
            skip_channels += [ch] * layers_per_block
            if i < levels - 1:
                self.skip_levels.append(i + 1)
                skip_channels.append(ch)
        self.skips = nn.ModuleList(nn.Conv2d(hidden_channels, ch, 1) for ch in skip_channels)
        self.mid = nn.Conv2d(hidden_channels, block_out_channels[-1], 1)
        for conv in [*self.skips, self.mid]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.frame_gain = nn.Parameter(torch.ones(max_frames))

    def forward(self, image_latents: torch.Tensor, num_frames: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if num_frames > self.frame_gain.numel():
            raise ConfigError("data.num_frames", f"{num_frames} frames exceed the adapter's max_frames "
                              f"{self.frame_gain.numel()}", "train with fewer frames or a larger max_frames")
        features = [self.stem(image_latents)]
        for down in self.downs:
            features.append(down(features[-1]))
        gain = self.frame_gain[:num_frames]

        def per_frame(x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b * f, c, h, w)
            x = x[:, None] * gain.to(x.dtype)[None, :, None, None, None]
            return x.flatten(0, 1)

        skips = tuple(per_frame(conv(features[level])) for conv, level in zip(self.skips, self.skip_levels))
        return skips, per_frame(self.mid(features[-1]))


# ----------------------------------------------------------------------------------------------
# The denoiser and the target network


class Denoiser(nn.Module):
    """(x_t, t, text embeddings[, first-frame latents]) -> the UNet's raw output, for every stage.

    Video samples are (b, c, f, h, w); the prompt embedding is repeated per frame, as diffusers'
    AnimateDiff pipeline does before UNetMotionModel.
    """

    def __init__(self, unet: nn.Module, image_adapter: FirstFrameAdapter | None = None):
        super().__init__()
        self.unet = unet
        self.image_adapter = image_adapter

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, text_embeds: torch.Tensor,
                image_latents: torch.Tensor | None = None) -> torch.Tensor:
        extra = {}
        if sample.ndim == 5:
            frames = sample.shape[2]
            text_embeds = text_embeds.repeat_interleave(frames, dim=0)
            if self.image_adapter is not None:
                if image_latents is None:
                    raise ConfigError("image_latents", "an image-to-video denoiser needs the first frame's latent",
                                      "pass image_latents (zeros for no image)")
                skips, mid = self.image_adapter(image_latents, frames)
                extra = {"down_block_additional_residuals": skips, "mid_block_additional_residual": mid}
        return self.unet(sample, timesteps, encoder_hidden_states=text_embeds, **extra).sample


class EMATarget:
    """The target network theta^- of consistency distillation: theta^- <- mu theta^- + (1 - mu) theta.

    Tracked: every parameter that trains in the online model, and every frozen one whose value differs
    between online and target at the start. The latter is how AnimateLCM's initialisation works: the
    stage-1 LoRA is merged into the online model only, and the target takes it up through this update.
    Frozen parameters that start equal stay bit-identical (lerp of equal values) and are not touched.
    """

    def __init__(self, target: nn.Module, online: nn.Module, decay: float):
        self.target = target.requires_grad_(False).eval()
        self.decay = decay
        online_params = dict(online.named_parameters())
        target_params = dict(target.named_parameters())
        if online_params.keys() != target_params.keys():
            diff = sorted(online_params.keys() ^ target_params.keys())[:5]
            raise CheckpointError("target", f"target and online models differ in parameters {diff}",
                                  "build the target as a copy of the online model")
        self.names = [n for n, p in online_params.items()
                      if p.requires_grad or not torch.equal(p.detach(), target_params[n].detach())]
        self._target = [target_params[n] for n in self.names]

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        online_params = dict(online.named_parameters())
        C.ema_update_(self._target, [online_params[n].detach() for n in self.names], self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in zip(self.names, self._target)}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        if set(state) != set(self.names):
            raise CheckpointError(source, f"EMA state has {len(state)} tensors, this run tracks {len(self.names)}",
                                  "resume with the config the checkpoint was written with")
        with torch.no_grad():
            for n, p in zip(self.names, self._target):
                p.copy_(state[n])


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
