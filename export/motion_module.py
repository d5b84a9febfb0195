"""Motion modules: the original AnimateDiff/AnimateLCM checkpoint layout and diffusers MotionAdapter folders.

Original keys (`down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0
.attention_blocks.1.to_out.0.bias`) are renamed to diffusers' (`...motion_modules.0
.transformer_blocks.0.attn2.to_out.0.bias`). AnimateLCM's checkpoint has no position-encoding
keys: the encodings are fixed sinusoids, regenerated here; where a file does carry them
(AnimateDiff v1/v2), they are checked against the regenerated ones by a gate.

Without a config, the structure is read off the weights: channels per block, motion layers
per block, transformer layers, the mid block. Head count and GroupNorm groups leave no trace
in the weights; they default to AnimateDiff's 8 heads and 32 groups (AnimateLCM's values)
and can be given in `config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from lcm_edge.errors import InvalidArgumentError, ParityError

from .sd15_configs import ANIMATELCM_ADAPTER_CONFIG, packaged
from .weights import (WeightsMismatchError, as_float32, compare_keys, expected_shapes, load_strict, on_meta,
                      read_config_json, read_diffusers_weights, read_weight_file)

POSITION_KEY = "pos_embed.pe"
# Sinusoids from the same formula: only the stored dtype's rounding separates a stored table
# (|values| <= 1) from ours; a learned or shifted table differs by far more.
POSITION_ENCODING_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
FIX_MOTION = ("pass an SD1.5 motion module (AnimateLCM_sd15_t2v.ckpt, an AnimateDiff v1/v2/v3 SD1.5 module, "
              "or a diffusers MotionAdapter folder); SDXL motion modules do not fit an SD1.5 UNet")


def convert_original_keys(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Original AnimateDiff names -> diffusers names; position encodings are split off.

    The original has one encoding per attention (attention_blocks.0/1.pos_encoder.pe),
    diffusers one per transformer block (pos_embed.pe): both tables map to it and both are checked.
    """
    converted: dict[str, torch.Tensor] = {}
    position: dict[str, list[torch.Tensor]] = {}
    for key, value in tensors.items():
        new = (key.replace(".norms.0", ".norm1").replace(".norms.1", ".norm2").replace(".ff_norm", ".norm3")
               .replace(".attention_blocks.0", ".attn1").replace(".attention_blocks.1", ".attn2")
               .replace(".temporal_transformer", ""))
        if ".pos_encoder." in new:
            position.setdefault(re.sub(r"\.attn\d+\.pos_encoder\.pe$", "." + POSITION_KEY, new), []).append(value)
        else:
            converted[new] = value
    return converted, position


def to_original_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> the original layout (tests write real-layout files with it); drops encodings."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(POSITION_KEY):
            continue
        key = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
        key = (key.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
               .replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm."))
        out[key] = value
    return out


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})


def infer_adapter_config(tensors: Mapping[str, torch.Tensor], *, argument: str) -> dict:
    """MotionAdapter config from diffusers-named motion weights (structure only; see module doc)."""
    keys = list(tensors)
    blocks = _indices(keys, r"down_blocks\.(\d+)\.motion_modules\.")
    if not blocks or blocks != list(range(len(blocks))):
        raise InvalidArgumentError(argument, f"no motion modules found (down block indices {blocks})",
                                   FIX_MOTION)
    channels, layers, transformer_layers = [], [], []
    for i in blocks:
        proj_in = tensors.get(f"down_blocks.{i}.motion_modules.0.proj_in.weight")
        if proj_in is None or proj_in.dim() != 2:
            raise InvalidArgumentError(argument, f"down_blocks.{i}.motion_modules.0.proj_in.weight is missing",
                                       FIX_MOTION)
        channels.append(int(proj_in.shape[0]))
        layers.append(len(_indices(keys, rf"down_blocks\.{i}\.motion_modules\.(\d+)\.")))
        transformer_layers.append(len(_indices(
            keys, rf"down_blocks\.{i}\.motion_modules\.0\.transformer_blocks\.(\d+)\.")))
    mid = _indices(keys, r"mid_block\.motion_modules\.(\d+)\.")
    mid_transformer = _indices(keys, r"mid_block\.motion_modules\.0\.transformer_blocks\.(\d+)\.")
    config = packaged(ANIMATELCM_ADAPTER_CONFIG)
    config.update(
        block_out_channels=channels,
        motion_layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
        motion_transformer_layers_per_block=(transformer_layers[0] if len(set(transformer_layers)) == 1
                                             else transformer_layers),
        use_motion_mid_block=bool(mid),
        motion_mid_block_layers_per_block=max(len(mid), 1),
        motion_transformer_layers_per_mid_block=max(len(mid_transformer), 1),
    )
    return config


@dataclass
class LoadedMotionModule:
    adapter: torch.nn.Module  # diffusers MotionAdapter, fp32, position encodings regenerated
    config: dict
    source: dict


def _build_adapter(config: Mapping, state: dict[str, torch.Tensor], position: Mapping[str, torch.Tensor], *,
                   argument: str, what: str) -> torch.nn.Module:
    from diffusers import MotionAdapter

    try:
        adapter = on_meta(lambda: MotionAdapter.from_config(dict(config)))
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(argument, f"motion adapter config is not valid ({exc})",
                                   "heads and GroupNorm groups cannot be read from the weights (defaults 8 and 32): "
                                   "pass --motion-config with motion_num_attention_heads / motion_norm_num_groups "
                                   "that fit") from exc
    expected = expected_shapes(adapter)
    missing, unexpected, mismatched = compare_keys(expected, state, optional=lambda k: k.endswith(POSITION_KEY))
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(argument, what, missing=missing, unexpected=unexpected, mismatched=mismatched,
                                   fix=FIX_MOTION)
    stray = [k for k in position if k not in expected]
    if stray:
        raise WeightsMismatchError(argument, what, unexpected=stray, fix=FIX_MOTION)
    full = dict(state)
    failures = []
    for key, shape in expected.items():
        if not key.endswith(POSITION_KEY):
            continue
        regenerated = sinusoidal_table(shape[2], shape[1])
        stored = list(position.get(key, [])) + ([state[key]] if key in state else [])
        for table in stored:
            # Compare the positions both tables have (tools disagree on the length: 24, 32, 64).
            n = min(table.shape[1], shape[1])
            diff = float((table[:, :n].float() - regenerated[:, :n]).abs().max()) if table.shape[2] == shape[2] \
                else float("inf")
            atol = POSITION_ENCODING_ATOL.get(table.dtype, 1e-5)
            if diff > atol:
                failures.append(f"{key}: stored {str(table.dtype).removeprefix('torch.')} encoding "
                                f"{list(table.shape)} differs from the sinusoid by {diff:.3g} "
                                f"(> {atol}, position-encoding-vs-sinusoid)")
        full[key] = regenerated
    if failures:
        raise ParityError(f"{what}: stored position encodings vs regenerated", failures)
    return load_strict(adapter, as_float32(full), argument=argument, what=what, fix=FIX_MOTION)


def sinusoidal_table(channels: int, length: int) -> torch.Tensor:
    """The (1, length, channels) table diffusers' SinusoidalPositionalEmbedding builds."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    return SinusoidalPositionalEmbedding(channels, length).pe.clone()


def load_motion_module(path: str | Path, *, config: Mapping[str, Any] | None = None, variant: str | None = None,
                       argument: str = "--motion-module") -> LoadedMotionModule:
    """A MotionAdapter from an original-layout file (.ckpt/.safetensors) or a diffusers folder."""
    path = Path(path)
    arg = f"{argument} {path}"
    if path.is_dir():
        folder_config = read_config_json(path / "config.json")
        loaded = read_diffusers_weights(path, arg, variant=variant)
        state = dict(loaded.tensors)
        layout = "diffusers-folder"
        merged = {k: v for k, v in folder_config.items() if not k.startswith("_")}
        merged.update(config or {})
        position: dict = {}
    else:
        loaded = read_weight_file(path, arg)
        state, position = convert_original_keys(loaded.tensors)
        layout = "original" if any(".temporal_transformer." in k for k in loaded.tensors) else "diffusers-names"
        merged = infer_adapter_config(state, argument=arg)
        if position:
            # A stored table tells its length; AnimateLCM stores none and gets the adapter default (32).
            merged["motion_max_seq_length"] = int(next(iter(position.values()))[0].shape[1])
        merged.update(config or {})
    adapter = _build_adapter(merged, state, position, argument=arg, what=f"motion module '{path}'")
    return LoadedMotionModule(adapter=adapter, config=dict(adapter.config), source={
        "layout": layout, "dtypes": loaded.dtypes(), "files": [str(f) for f in loaded.files],
        "position_encodings": "checked against regenerated" if position else "regenerated",
        "config_inferred_from_weights": layout != "diffusers-folder" and not config,
    })


def check_fits_unet(adapter_config: Mapping, unet_config: Mapping, *, argument: str) -> None:
    """The adapter must match the UNet block for block; otherwise list the keys that would not load."""
    unet_channels = list(unet_config["block_out_channels"])
    unet_layers = unet_config["layers_per_block"]
    adapter_layers = adapter_config["motion_layers_per_block"]
    if list(adapter_config["block_out_channels"]) == unet_channels and adapter_layers == unet_layers:
        return
    from diffusers import MotionAdapter

    want = packaged(dict(adapter_config))
    want.update(block_out_channels=unet_channels, motion_layers_per_block=unet_layers)
    got = expected_shapes(on_meta(lambda: MotionAdapter.from_config(dict(adapter_config))))
    expected = expected_shapes(on_meta(lambda: MotionAdapter.from_config(want)))
    missing, unexpected, mismatched = compare_keys(
        expected, {k: torch.empty(s, device="meta") for k, s in got.items()})
    raise WeightsMismatchError(argument, f"motion module for block_out_channels {adapter_config['block_out_channels']}"
                               f" with the UNet's {unet_channels}", missing=missing, unexpected=unexpected,
                               mismatched=mismatched, fix=FIX_MOTION)
