"""Single-file SD1.5 checkpoints (LDM key layout) -> diffusers UNet, VAE and CLIP text encoder.

The key map is derived from the diffusers model itself: every diffusers parameter name is
translated to its LDM name by the rules below, so the map is a bijection over exactly the
keys the architecture has. A key of the file that no parameter maps to, or a parameter whose
LDM key the file lacks, is reported; nothing is guessed and nothing is fetched.

LDM layout (prefixes): model.diffusion_model.* (UNet), first_stage_model.* (VAE),
cond_stage_model.transformer.* (CLIP text encoder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from lcm_edge.errors import InvalidArgumentError

from .weights import (LoadedWeights, WeightsMismatchError, as_float32, dtype_problem, load_strict, on_meta,
                      read_weight_file)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# Keys an LDM training checkpoint carries besides the weights: the DDPM schedule buffers, the
# EMA copy and CLIP's position ids. They are not weights of the exported graphs.
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
}
_IGNORED_PREFIXES = ("model_ema.",)
_CLIP_POSITION_IDS = "text_model.embeddings.position_ids"

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

FIX_CHECKPOINT = ("pass a full SD1.5 checkpoint (model.diffusion_model.*, first_stage_model.*, "
                  "cond_stage_model.transformer.*); SDXL, SD2 and inpainting checkpoints are other architectures")


def is_ignored_ldm_key(key: str) -> bool:
    return key in _SCHEDULE_BUFFERS or key.startswith(_IGNORED_PREFIXES)


def _unet_layers(config: Mapping) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise InvalidArgumentError("unet config", f"layers_per_block {layers!r} varies per block",
                                   "single-file loading supports SD1.5-style UNets with one int layers_per_block")
    return layers


def unet_ldm_name(name: str, config: Mapping) -> str:
    """diffusers UNet2DConditionModel parameter name -> LDM name (without the prefix)."""
    per_block = _unet_layers(config) + 1  # resnets + the down/upsampler slot
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for old, new in fixed.items():
        if name.startswith(old):
            return new + name[len(old):]

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        if head not in _UNET_RESNET:
            raise KeyError(name)
        return f"{_UNET_RESNET[head]}.{tail}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * per_block + j
        return f"input_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        kind, j, rest = m[1], int(m[2]), m[3]
        # middle_block = [resnet, attention, resnet]
        return f"middle_block.{2 * j}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = i * per_block + j
        return f"output_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        i = int(m[1])
        # The upsampler follows the attention in cross-attention up blocks (slot 2), else slot 1.
        slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        return f"output_blocks.{i * per_block + per_block - 1}.{slot}.conv.{m[2]}"
    raise KeyError(name)


def vae_ldm_name(name: str, config: Mapping) -> str:
    """diffusers AutoencoderKL parameter name -> LDM name (without the prefix)."""
    blocks = len(config["block_out_channels"])
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", name):
        return name
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", name):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3], name)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
                         name):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3], name)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # The LDM decoder numbers its up blocks from the lowest resolution's end: reversed.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3], name)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise KeyError(name)


def _vae_resnet(rest: str, name: str) -> str:
    head, _, tail = rest.partition(".")
    if head in ("norm1", "conv1", "norm2", "conv2"):
        return rest
    if head == "conv_shortcut":
        return f"nin_shortcut.{tail}"
    raise KeyError(name)


def clip_ldm_name(name: str) -> str:
    # LDM checkpoints were saved with transformers 4, whose CLIPTextModel had a `text_model.` level.
    return "text_model." + name.removeprefix("text_model.")


def ldm_key_map(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, str]:
    """{full LDM key: "unet|vae|text_encoder:<diffusers name>"} over every parameter of the three models."""
    mapping: dict[str, str] = {}
    for component, model, prefix, rename in (
            ("unet", unet, UNET_PREFIX, lambda n: unet_ldm_name(n, unet.config)),
            ("vae", vae, VAE_PREFIX, lambda n: vae_ldm_name(n, vae.config)),
            ("text_encoder", text_encoder, CLIP_PREFIX, clip_ldm_name)):
        for name in model.state_dict():
            try:
                ldm = prefix + rename(name)
            except KeyError as exc:
                raise InvalidArgumentError(f"{component} config", f"parameter '{name}' has no LDM counterpart",
                                           "single-file loading supports SD1.5-style UNet/VAE/CLIP configs") from exc
            if ldm in mapping:
                raise InvalidArgumentError(f"{component} config", f"two parameters map to LDM key '{ldm}'",
                                           "single-file loading supports SD1.5-style configs")
            mapping[ldm] = f"{component}:{name}"
    return mapping


def _normalise_clip_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Checkpoints saved with transformers < 4.x lack the `text_model.` level.
    out = {}
    for key, value in tensors.items():
        if key.startswith(CLIP_PREFIX) and not key[len(CLIP_PREFIX):].startswith("text_model."):
            key = CLIP_PREFIX + "text_model." + key[len(CLIP_PREFIX):]
        out[key] = value
    return out


@dataclass
class SpatialModels:
    unet: torch.nn.Module  # UNet2DConditionModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    source: dict


def build_sd_models(unet_config: Mapping, vae_config: Mapping, text_config: Mapping, *, unet_on_meta: bool = True):
    """Empty models of the given configs. The UNet (3.4 GB at SD1.5 size) lives on `meta` until loaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    make_unet = lambda: UNet2DConditionModel.from_config(dict(unet_config))  # noqa: E731
    unet = on_meta(make_unet) if unet_on_meta else make_unet()
    vae = on_meta(lambda: AutoencoderKL.from_config(dict(vae_config)))
    # CLIP has a non-persistent position_ids buffer (in no state dict): build it for real.
    text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_config.items() if not k.startswith("_")}))
    return unet, vae, text_encoder


def load_ldm_checkpoint(path: str | Path, *, unet_config: Mapping, vae_config: Mapping, text_config: Mapping,
                        argument: str = "--base") -> SpatialModels:
    """UNet2DConditionModel + AutoencoderKL + CLIPTextModel from one LDM-layout file, strictly."""
    path = Path(path)
    loaded: LoadedWeights = read_weight_file(path, argument, keep=lambda k: not is_ignored_ldm_key(k))
    tensors = _normalise_clip_keys(loaded.tensors)
    unet, vae, text_encoder = build_sd_models(unet_config, vae_config, text_config)
    mapping = ldm_key_map(unet, vae, text_encoder)
    position_ids = CLIP_PREFIX + _CLIP_POSITION_IDS

    per_model: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    unexpected = []
    for key, value in tensors.items():
        if key == position_ids:
            continue  # transformers regenerates it; old checkpoints even store it as floats
        target = mapping.get(key)
        if target is None:
            unexpected.append(key)
            continue
        component, name = target.split(":", 1)
        per_model[component][name] = value
    missing = [ldm for ldm, target in mapping.items() if target.split(":", 1)[1] not in
               per_model[target.split(":", 1)[0]]]
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    mismatched = []
    model_tensors = {component: model.state_dict() for component, model in models.items()}
    for component, model in models.items():
        shapes = {k: tuple(v.shape) for k, v in model_tensors[component].items()}
        for name, value in list(per_model[component].items()):
            want = shapes[name]
            if tuple(value.shape) != want and component == "vae" and value.dim() == 4 and \
                    value.shape[2:] == (1, 1) and tuple(value.shape[:2]) == want:
                # LDM VAE attention projections are 1x1 convolutions; diffusers uses Linear.
                per_model[component][name] = value[:, :, 0, 0]
            elif tuple(value.shape) != want:
                ldm = next(k for k, t in mapping.items() if t == f"{component}:{name}")
                mismatched.append(f"{ldm}: file {list(value.shape)} vs model {list(want)}")
            elif problem := dtype_problem(value, model_tensors[component][name]):
                ldm = next(k for k, t in mapping.items() if t == f"{component}:{name}")
                mismatched.append(f"{ldm}: {problem}")
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(f"{argument} {path}", "the checkpoint (LDM layout) for SD1.5",
                                   missing=missing, unexpected=unexpected, mismatched=mismatched,
                                   fix=FIX_CHECKPOINT)
    what = f"'{path}' (LDM layout)"
    for component, model in models.items():
        load_strict(model, as_float32(per_model[component]), argument=f"{argument} {path}",
                    what=f"{component} of {what}", fix=FIX_CHECKPOINT)
    return SpatialModels(unet=unet, vae=vae, text_encoder=text_encoder,
                         source={"format": "ldm-single-file", "dtypes": loaded.dtypes()})


def to_ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                      *, conv_vae_attention: bool = True) -> dict[str, torch.Tensor]:
    """The inverse map: diffusers models -> an LDM-layout state dict (tests write real layouts with it)."""
    mapping = {target: ldm for ldm, target in ldm_key_map(unet, vae, text_encoder).items()}
    out = {}
    for component, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        for name, value in model.state_dict().items():
            value = value.detach().clone().contiguous()
            if component == "vae" and conv_vae_attention and ".mid_block.attentions.0.to_" in name \
                    and name.endswith(".weight"):
                value = value[:, :, None, None].contiguous()
            out[mapping[f"{component}:{name}"]] = value
    return out
