"""Load a saved diffusers text-to-video model from a local folder (never a hub).

Expected layout (what `AnimateDiffPipeline.save_pretrained` writes, or an SD1.5 folder plus
a motion adapter):

    model/
      unet/            UNetMotionModel, or UNet2DConditionModel with motion_adapter/ beside it
      motion_adapter/  MotionAdapter (only with a 2D unet)
      vae/ text_encoder/ tokenizer/ scheduler/
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from lcm_edge.errors import BundleFormatError, BundleNotFoundError
from lcm_edge.scheduler import SchedulerConfig

UNET_CLASSES = ("UNetMotionModel", "UNet2DConditionModel")


@dataclass
class DiffusersComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_config: SchedulerConfig
    motion_adapter: torch.nn.Module | None = None
    source: dict = field(default_factory=dict)

    def export_kwargs(self) -> dict:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "scheduler_config": self.scheduler_config, "motion_adapter": self.motion_adapter}


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.exists():
        raise BundleNotFoundError(path, "missing from the diffusers model folder",
                                  "save the pipeline with save_pretrained() or copy the sub-folder in")
    return path


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleFormatError(path, f"not valid JSON ({exc})", "restore the file") from exc


def lcm_scheduler_config(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> SchedulerConfig:
    """The folder's scheduler as an LCMScheduler config.

    A non-LCM scheduler (an SD1.5 folder ships PNDM/DDIM) shares the noise schedule; only
    `original_inference_steps` is LCM's own and must then come from `overrides`.
    """
    overrides = dict(overrides or {})
    if config.get("_class_name") == "LCMScheduler":
        # An LCMScheduler made with from_config(other) carries the other's keys (skip_prk_steps...).
        known = {f.name for f in dataclasses.fields(SchedulerConfig)}
        merged = {k: v for k, v in config.items() if k in known}
    else:
        shared = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr")
        merged = {k: config[k] for k in shared if k in config}
        merged.setdefault("timestep_scaling", 10.0)
    merged.update(overrides)
    return SchedulerConfig.from_dict(merged, source="scheduler/scheduler_config.json (+ overrides)")


def load_diffusers_folder(path: str | Path, *, scheduler_overrides: Mapping[str, Any] | None = None,
                          ) -> DiffusersComponents:
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise BundleNotFoundError(folder, "model folder does not exist", "pass a saved diffusers model folder")
    unet_dir = _require(folder, "unet")
    unet_class = _read_config(_require(unet_dir, "config.json")).get("_class_name")
    if unet_class not in UNET_CLASSES:
        raise BundleFormatError(unet_dir / "config.json", f"unet class {unet_class!r} is not one of {UNET_CLASSES}",
                                "export an SD1.5-family UNet with a motion module")
    motion_adapter = None
    if unet_class == "UNetMotionModel":
        unet = UNetMotionModel.from_pretrained(unet_dir, local_files_only=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True)
        motion_adapter = MotionAdapter.from_pretrained(_require(folder, "motion_adapter"), local_files_only=True)
    scheduler_config = lcm_scheduler_config(
        _read_config(_require(folder, "scheduler/scheduler_config.json")), scheduler_overrides)
    return DiffusersComponents(
        unet=unet,
        vae=AutoencoderKL.from_pretrained(_require(folder, "vae"), local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(_require(folder, "text_encoder"), local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(_require(folder, "tokenizer"), local_files_only=True),
        scheduler_config=scheduler_config,
        motion_adapter=motion_adapter,
        source={"diffusers_folder": str(folder.resolve()), "unet_class": unet_class},
    )
