"""Save a trained LoRA in the two layouts users load, and merge a saved one into a UNet.

Written into one folder:
    pytorch_lora_weights.safetensors  diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight`, with
                                      the LoraConfig (rank, alpha, targets) in the `lora_adapter_metadata`
                                      header, so `pipe.load_lora_weights(folder)` restores the right scale
    lora_kohya.safetensors            kohya: `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight`
                                      / `.alpha` (the layout of AnimateLCM_sd15_t2v_lora.safetensors)
    lora_config.json                  rank, alpha, target modules (human-readable copy of the header)

Reading and merging go through the exporter's loader (lcm_edge.export.lora), so a LoRA that trains
here is by construction one the exporter can fuse, and stage 2's merge passes the exporter's
fused-vs-unfused gate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
CONFIG_FILE = "lora_config.json"


@dataclass(frozen=True)
class SavedLora:
    folder: Path
    diffusers: Path
    kohya: Path
    rank: int
    alpha: float
    num_layers: int


def peft_lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights as `<module>.lora_A.weight` / `<module>.lora_B.weight` (peft's own key layout)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not state:
        raise CheckpointError(type(model).__name__, f"has no LoRA adapter named {adapter_name!r}",
                              "add one with add_lora() before saving")
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def kohya_state_dict(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft keys -> kohya keys: `a.b.c.lora_A.weight` -> `lora_unet_a_b_c.lora_down.weight`, plus `.alpha`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        module, role = _split_peft_key(key)
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.{'lora_down' if role == 'lora_A' else 'lora_up'}.weight"] = value
        out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def _split_peft_key(key: str) -> tuple[str, str]:
    for role in ("lora_A", "lora_B"):
        suffix = f".{role}.weight"
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    raise CheckpointError(key, "is not a peft LoRA key (<module>.lora_A.weight / .lora_B.weight)",
                          "save LoRAs made by peft (add_lora)")


def save_lora(model: nn.Module, folder: str | Path, *, adapter_name: str = "default") -> SavedLora:
    """Write the model's LoRA adapter in diffusers/peft and kohya layouts (see the module docstring)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[adapter_name]
    rank, alpha = int(config.r), float(config.lora_alpha)
    if config.rank_pattern or config.alpha_pattern:
        raise CheckpointError(str(folder), "per-module rank/alpha patterns cannot be written as one kohya alpha",
                              "train with one rank and alpha for every layer")
    peft_state = peft_lora_state_dict(model, adapter_name)
    metadata = {
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(config.target_modules)
        if not isinstance(config.target_modules, str) else config.target_modules,
        "lora_dropout": float(config.lora_dropout), "use_rslora": bool(config.use_rslora), "use_dora": False,
        "init_lora_weights": config.init_lora_weights if isinstance(config.init_lora_weights, bool) else True,
    }
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {f"unet.{k}": v for k, v in metadata.items()}, indent=2, sort_keys=True)}
    diffusers_path = folder / DIFFUSERS_FILE
    save_file({f"unet.{k}": v for k, v in peft_state.items()}, str(diffusers_path), metadata=header)
    kohya_path = folder / KOHYA_FILE
    save_file(kohya_state_dict(peft_state, alpha), str(kohya_path), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return SavedLora(folder, diffusers_path, kohya_path, rank, alpha, len(peft_state) // 2)


def resolve_lora_file(path: str | Path, argument: str) -> Path:
    """A LoRA file, or a folder written by save_lora (its diffusers file)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / DIFFUSERS_FILE
        if not candidate.is_file():
            candidate = path / KOHYA_FILE
        if not candidate.is_file():
            raise CheckpointError(str(path), f"holds neither {DIFFUSERS_FILE} nor {KOHYA_FILE}",
                                  f"point {argument} at the lora/ folder `distill image` wrote, or at a LoRA file")
        return candidate
    if not path.is_file():
        raise CheckpointError(str(path), "does not exist", f"point {argument} at a LoRA file or folder")
    return path


def merge_lora_(unet: nn.Module, path: str | Path, *, weight: float = 1.0, argument: str = "model.lora"):
    """Fuse a saved LoRA (kohya or diffusers/peft) into `unet`'s weights in place, behind the exporter's gate.

    Returns the exporter's FusionReport (fused vs adapters-at-run-time max error, and the LoRA's effect).
    """
    from lcm_edge.export.lora import fuse_loras, load_lora

    lora_path = resolve_lora_file(path, argument)
    lora = load_lora(lora_path, {"unet": unet}, weight=weight, argument=argument)
    device = next(unet.parameters()).device
    for layer in lora.layers:  # the file is read to the host; fuse where the UNet lives
        layer.down, layer.up = layer.down.to(device), layer.up.to(device)
    return fuse_loras({"unet": unet}, [lora], {"unet": unet_probe})


@torch.no_grad()
def unet_probe(unet: nn.Module):
    """A 2-D UNet on a fixed small input (numpy out): what the fusion gate compares before and after."""
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    param = next(unet.parameters())
    size = 2 ** len(cfg.block_out_channels)  # every level can halve it
    sample = torch.randn(1, cfg.in_channels, size, size, generator=g)
    text = torch.randn(1, 4, cfg.cross_attention_dim, generator=g)
    out = unet(sample.to(param), torch.tensor([500], device=param.device), encoder_hidden_states=text.to(param))
    return out.sample.float().cpu().numpy()
