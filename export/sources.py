"""The user's weight files -> the components export_bundle takes, loaded strictly and offline.

Recipe (load_components):
1. Spatial model: an SD1.5 diffusers folder, a saved AnimateDiff pipeline folder, or a
   single-file LDM checkpoint (configs from the base folder or the package; tokenizer from
   the base folder).
2. Motion module: original-layout file or MotionAdapter folder; it must fit the UNet block
   for block. The UNetMotionModel is built on `meta` and gets the loaded tensors assigned.
3. LoRAs: resolved against the assembled models, fused, gated (fused == unfused).
4. Scheduler: the folder's LCMScheduler if it has one, else AnimateLCM's schedule; overrides last.
Everything loaded is recorded (files, sha256, LoRA weights, gate figures) for the bundle's provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lcm_edge.errors import BundleNotFoundError, InvalidArgumentError
from lcm_edge.scheduler import SchedulerConfig

from .checkpoints import load_ldm_checkpoint
from .diffusers_folder import DiffusersComponents, lcm_scheduler_config
from .lora import FusionReport, LoraFile, LoraRequest, fuse_loras, load_lora
from .motion_module import (POSITION_KEY, LoadedMotionModule, check_fits_unet, load_motion_module,
                            sinusoidal_table)
from .sd15_configs import (ANIMATELCM_SCHEDULER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG,
                           packaged)
from .weights import (as_float32, file_record, load_strict, match_text_encoder_keys, on_meta, read_config_json,
                      read_diffusers_weights)
from .wrappers import TextEncoderWrapper, UNetWrapper

FIX_FOLDER = "pass an SD1.5 diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)"


@dataclass
class _Spatial:
    unet: torch.nn.Module  # UNet2DConditionModel or UNetMotionModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler_file: dict | None  # the folder's scheduler_config.json
    motion_folder: Path | None  # motion_adapter/ beside a 2D unet
    source: dict = field(default_factory=dict)


def _load_tokenizer(folder: Path, argument: str):
    from transformers import CLIPTokenizer

    tokenizer_dir = folder / "tokenizer"
    # SD1.5 folders ship vocab.json + merges.txt; transformers 5 saves tokenizer.json instead.
    bpe_files = (tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file()
    if not bpe_files and not (tokenizer_dir / "tokenizer.json").is_file():
        raise BundleNotFoundError(tokenizer_dir, f"{argument}: neither vocab.json + merges.txt nor tokenizer.json "
                                  "is there", FIX_FOLDER)
    # from_pretrained(folder), never the constructor: transformers 5 builds an empty tokenizer from
    # vocab_file=/merges_file= keywords (docs/edge-deployment.md).
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def _text_weights_stem(folder: Path) -> str:
    return "model" if any(folder.glob("model*.safetensors*")) else "pytorch_model"


def _load_folder(folder: Path, argument: str) -> _Spatial:
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        if not (folder / sub).is_dir():
            raise BundleNotFoundError(folder / sub, f"{argument}: sub-folder is missing", FIX_FOLDER)
    unet_config = read_config_json(folder / "unet" / "config.json")
    unet_class = unet_config.get("_class_name")
    classes = {"UNet2DConditionModel": UNet2DConditionModel, "UNetMotionModel": UNetMotionModel}
    if unet_class not in classes:
        raise InvalidArgumentError(argument, f"unet/config.json names class {unet_class!r}",
                                   "pass an SD1.5 folder (UNet2DConditionModel) or a saved AnimateDiff pipeline")
    unet = on_meta(lambda: classes[unet_class].from_config(unet_config))
    unet_weights = read_diffusers_weights(folder / "unet", f"{argument} unet/")
    state = as_float32(unet_weights.tensors)
    if unet_class == "UNetMotionModel":
        # Position encodings are fixed sinusoids: regenerate any the file lacks.
        for key, value in unet.state_dict().items():
            if key.endswith(POSITION_KEY) and key not in state:
                state[key] = sinusoidal_table(value.shape[2], value.shape[1])
    load_strict(unet, state, argument=f"{argument} unet/", what=f"{unet_class} '{folder / 'unet'}'",
                fix=FIX_FOLDER)

    vae = on_meta(lambda: AutoencoderKL.from_config(read_config_json(folder / "vae" / "config.json")))
    load_strict(vae, as_float32(read_diffusers_weights(folder / "vae", f"{argument} vae/").tensors),
                argument=f"{argument} vae/", what=f"VAE '{folder / 'vae'}'", fix=FIX_FOLDER)

    te_dir = folder / "text_encoder"
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(read_config_json(te_dir / "config.json")))
    te_weights = read_diffusers_weights(te_dir, f"{argument} text_encoder/", stem=_text_weights_stem(te_dir))
    # Older transformers saved the (regenerated) position ids as a weight.
    te_state = match_text_encoder_keys({k: v for k, v in te_weights.tensors.items()
                                        if k.removeprefix("text_model.") != "embeddings.position_ids"}, text_encoder)
    load_strict(text_encoder, as_float32(te_state), argument=f"{argument} text_encoder/",
                what=f"text encoder '{te_dir}'", fix=FIX_FOLDER)

    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    motion_dir = folder / "motion_adapter"
    return _Spatial(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_load_tokenizer(folder, argument),
        scheduler_file=read_config_json(scheduler_path) if scheduler_path.is_file() else None,
        motion_folder=motion_dir if unet_class == "UNet2DConditionModel" and motion_dir.is_dir() else None,
        source={"path": str(folder.resolve()), "format": "diffusers-folder", "unet_class": unet_class,
                "weights": {sub: [str(p) for p in w.files] for sub, w in
                            (("unet", unet_weights), ("text_encoder", te_weights))},
                "weight_dtypes": unet_weights.dtypes()})


def _configs_from(base_folder: Path | None) -> tuple[dict, dict, dict, str]:
    """unet/vae/text_encoder configs: the base folder's where it has them, else the packaged SD1.5 ones."""
    if base_folder is None:
        return (packaged(SD15_UNET_CONFIG), packaged(SD15_VAE_CONFIG), packaged(SD15_TEXT_ENCODER_CONFIG),
                "package (lcm_edge.export.sd15_configs)")
    configs = []
    for sub, default in (("unet", SD15_UNET_CONFIG), ("vae", SD15_VAE_CONFIG),
                         ("text_encoder", SD15_TEXT_ENCODER_CONFIG)):
        path = base_folder / sub / "config.json"
        configs.append({k: v for k, v in read_config_json(path).items() if not k.startswith("_")}
                       if path.is_file() else packaged(default))
    return configs[0], configs[1], configs[2], f"base folder {base_folder.resolve()} (package SD1.5 where absent)"


def _load_single_file(path: Path, base_folder: Path | None, argument: str) -> _Spatial:
    if base_folder is None:
        raise InvalidArgumentError("--base-folder", f"a single-file checkpoint ('{path.name}') carries no tokenizer",
                                   "pass --base-folder DIR, an SD1.5 diffusers folder with tokenizer/")
    if not base_folder.is_dir():
        raise BundleNotFoundError(base_folder, "--base-folder: folder does not exist", FIX_FOLDER)
    unet_config, vae_config, text_config, config_source = _configs_from(base_folder)
    spatial = load_ldm_checkpoint(path, unet_config=unet_config, vae_config=vae_config, text_config=text_config,
                                  argument=argument)
    return _Spatial(unet=spatial.unet, vae=spatial.vae, text_encoder=spatial.text_encoder,
                    tokenizer=_load_tokenizer(base_folder, "--base-folder"), scheduler_file=None, motion_folder=None,
                    source={"path": str(path.resolve()), **spatial.source, "record": file_record(path),
                            "configs": config_source, "tokenizer": str((base_folder / "tokenizer").resolve())})


def assemble_motion_unet(unet2d: torch.nn.Module, adapter: torch.nn.Module) -> torch.nn.Module:
    """UNetMotionModel sharing the loaded tensors of `unet2d` and `adapter` (no copy, no random init)."""
    from diffusers import UNetMotionModel

    shell = on_meta(lambda: UNetMotionModel.from_unet2d(on_meta(lambda: type(unet2d).from_config(unet2d.config)),
                                                        on_meta(lambda: type(adapter).from_config(adapter.config)),
                                                        load_weights=False))
    state = {**unet2d.state_dict(), **adapter.state_dict()}
    return load_strict(shell, state, argument="--motion-module", what="UNet + motion module",
                       fix="pass a motion module made for this UNet")


def gate_probes(unet: torch.nn.Module, text_encoder: torch.nn.Module, seed: int = 0) -> dict:
    """Fixed inputs for the LoRA fusion gate: 2 frames (motion modules mix frames), smallest legal size."""
    rng = np.random.default_rng(seed)
    side = 2 ** (len(unet.config.block_out_channels) - 1)
    hidden = int(text_encoder.config.hidden_size)
    length = int(text_encoder.config.max_position_embeddings)
    sample = torch.from_numpy(rng.standard_normal((1, unet.config.in_channels, 2, side, side), dtype=np.float32))
    states = torch.from_numpy(rng.standard_normal((1, length, hidden), dtype=np.float32))
    ids = torch.from_numpy(rng.integers(0, text_encoder.config.vocab_size, size=(1, length), dtype=np.int64))
    timestep = torch.tensor([499.0])
    return {
        "unet": lambda m: UNetWrapper(m)(sample, timestep, states).float().numpy(),
        "text_encoder": lambda m: TextEncoderWrapper(m)(ids).float().numpy(),
    }


def _scheduler(spatial: _Spatial, overrides: Mapping[str, Any]) -> tuple[SchedulerConfig, dict]:
    file = spatial.scheduler_file
    if file is not None and file.get("_class_name") == "LCMScheduler":
        return lcm_scheduler_config(file, overrides), {"source": "base folder scheduler/ (LCMScheduler)",
                                                      "overrides": dict(overrides)}
    merged = packaged(ANIMATELCM_SCHEDULER_CONFIG)
    merged.update(overrides)
    why = (f"AnimateLCM schedule (the base folder's {file.get('_class_name')} is not an LCM scheduler)"
           if file is not None else "AnimateLCM schedule")
    return SchedulerConfig.from_dict(merged, source="AnimateLCM scheduler config (+ overrides)"), \
        {"source": why, "overrides": dict(overrides)}


def load_components(base: str | Path, *, base_folder: str | Path | None = None,
                    motion_module: str | Path | None = None, motion_config: Mapping[str, Any] | None = None,
                    motion_variant: str | None = None, loras: Sequence[LoraRequest] = (),
                    scheduler_overrides: Mapping[str, Any] | None = None, gate_seed: int = 0) -> DiffusersComponents:
    """Load, assemble and fuse everything the user passed; see the module docstring for the recipe."""
    base = Path(base)
    overrides = dict(scheduler_overrides or {})
    # 1. Spatial model.
    if base.is_dir():
        if base_folder is not None and Path(base_folder).resolve() != base.resolve():
            raise InvalidArgumentError("--base-folder", "given with a --base folder",
                                       "use --base-folder only with a single-file --base")
        spatial = _load_folder(base, "--base")
    elif base.is_file():
        spatial = _load_single_file(base, Path(base_folder) if base_folder is not None else None, "--base")
    else:
        raise BundleNotFoundError(base, "--base: no such file or folder",
                                  "pass an SD1.5 diffusers folder or a single-file .safetensors/.ckpt checkpoint")
    source: dict[str, Any] = {"base": spatial.source}

    # 2. Motion module, assembled into a UNetMotionModel.
    from diffusers import UNetMotionModel

    unet = spatial.unet
    if isinstance(unet, UNetMotionModel) or spatial.motion_folder is not None:
        if motion_module is not None:
            raise InvalidArgumentError("--motion-module", f"'{base}' already contains a motion module",
                                       "drop --motion-module, or pass an SD1.5 base without one")
    if not isinstance(unet, UNetMotionModel):
        path = motion_module if motion_module is not None else spatial.motion_folder
        if path is None:
            raise InvalidArgumentError("--motion-module", "missing: the base is a 2D SD1.5 model",
                                       "pass --motion-module AnimateLCM_sd15_t2v.ckpt (or a MotionAdapter folder)")
        motion: LoadedMotionModule = load_motion_module(path, config=motion_config, variant=motion_variant)
        check_fits_unet(motion.config, unet.config, argument=f"--motion-module {path}")
        unet = assemble_motion_unet(unet, motion.adapter)
        # The 2D UNet and the adapter share their tensors with `unet`: drop them, so that
        # export_bundle(release_torch=True) really frees the memory.
        spatial.unet = None
        source["motion_module"] = {**motion.source, "config": motion.config,
                                   "record": file_record(Path(path)) if Path(path).is_file() else None}
        del motion
    models = {"unet": unet, "text_encoder": spatial.text_encoder}

    # 3. LoRAs, fused behind the gate.
    if loras:
        files: list[LoraFile] = [load_lora(r.path, models, weight=r.weight) for r in loras]
        report: FusionReport = fuse_loras(models, files, gate_probes(unet, spatial.text_encoder, gate_seed))
        for entry, request in zip(report.loras, loras):
            entry["sha256"] = file_record(request.path)["sha256"]
        source["loras"] = report.to_dict()

    # 4. Scheduler.
    scheduler_config, source["scheduler"] = _scheduler(spatial, overrides)
    return DiffusersComponents(unet=unet, vae=spatial.vae, text_encoder=spatial.text_encoder,
                               tokenizer=spatial.tokenizer, scheduler_config=scheduler_config,
                               motion_adapter=None, source=source)
