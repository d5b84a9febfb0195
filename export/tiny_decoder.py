"""A tiny VAE decoder (TAESD / diffusers AutoencoderTiny) as the optional bundle component `vae_decoder_tiny`.

Weights come in two layouts, both read here:

    diffusers   an AutoencoderTiny folder: config.json + diffusion_pytorch_model.safetensors, keys
                `decoder.layers.{i}...` (the encoder's keys, if present, are ignored)
    original    madebyollin/taesd's single file `taesd_decoder.safetensors` / `.pth`: the decoder is one
                nn.Sequential whose index 0 is the Clamp (tanh(x / 3) * 3) and whose keys are `{i}...`;
                diffusers' DecoderTiny does the clamp in forward(), so original index i is `layers.{i - 1}`.
                The architecture (channels, blocks per stage, where the upsamplers sit) is read off the keys.

Latent convention. TAESD decodes the diffusion model's latents as they are (diffusers' AutoencoderTiny has
scaling_factor 1.0, and a pipeline decodes `latents / scaling_factor + shift_factor`); SD's VAE decoder takes
them divided by its scaling factor (0.18215 for SD1.5). A bundle's decoders both take the VAE's convention
(`latent_sample` = latents / bundle vae_scaling_factor, images in [-1, 1]), so the exported tiny graph
multiplies back: decoder input = latent_sample * vae_scaling_factor / tiny scaling_factor + tiny shift_factor.
One decode function in the runtime then serves both decoders.

Fit checks (before any tracing): latent channels = the bundle's, 3 output channels, total upsampling =
the bundle's vae_scale_factor. Whether the weights belong to this latent space (TAESD for SD1.5, not
TAESDXL) no shape can tell: the fidelity gate decodes latents the bundle's own sampler made with both
decoders and requires TINY_DECODER_MIN_PSNR_DB and a flicker within TINY_DECODER_FLICKER_MARGIN of the
full decoder's.

Adding to an existing bundle never leaves it invalid: the component is written and gated in a folder
beside the bundle, moved in under a name the manifest does not list yet, and bundle.json is replaced
last (write to a temporary file, then rename). An interrupted add leaves the old manifest, which does
not list the new files, so the bundle loads as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lcm_edge.backends import create_backend
from lcm_edge.atomic_output import Partial, recover
from lcm_edge.bundle import (MANIFEST_NAME, Bundle, ComponentInfo, ModelInfo, load_bundle, load_unpublished_bundle,
                             write_manifest)
from lcm_edge.errors import InvalidArgumentError, LcmEdgeError
from lcm_edge.fidelity import psnr_db

from .graph_export import export_graph
from .openvino_ir import openvino_gate_backend
from .parity import ParityReport
from .specs import ComponentSpec, GraphSpec, model_shape_cases, vae_decoder_spec
from .weights import (as_float32, file_record, load_strict, read_config_json,
                      read_diffusers_weights, read_weight_file)

TINY_DECODER = "vae_decoder_tiny"
ORIGINAL_LAYOUT_FILES = ("taesd_decoder.safetensors", "taesd_decoder.pth")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Fidelity gate, on latents from the bundle's own sampler (never the ones a distilled decoder trained on):
# PSNR of the tiny decoder's frames against the full decoder's, in dB over [0, 1] pixels. TAESD against SD1.5's
# VAE decoder reads about 25-29 dB on natural images; a decoder for another latent space (TAESDXL on SD1.5,
# random weights) reads 5-15 dB. The shipped default model's distilled decoder reads 32.0 dB on its 8 held-out
# clips, 29.5-30.5 dB on other samples (this gate's own 2 clips, the test's 3).
TINY_DECODER_MIN_PSNR_DB = 24.0
# Flicker = mean |frame t+1 - frame t| over a clip's [0, 1] pixels; the tiny decoder's may exceed the full
# decoder's by at most this (a decoder that sees one frame at a time can only add flicker through noise in
# its errors). 0.004 is one grey level in 255 on average.
TINY_DECODER_FLICKER_MARGIN = 0.004
# Latents the add/export gate samples when the caller gives none: seeds far from any training seed.
FIDELITY_SEED_BASE = 20_000
FIDELITY_CLIPS = 2
FIDELITY_MAX_FRAMES = 8
FIDELITY_PROMPTS = ("a red circle moving right", "a cat walking on a beach")
# AutoencoderTiny config keys that describe the decoder and its latent convention.
DECODER_CONFIG_KEYS = ("latent_channels", "out_channels", "decoder_block_out_channels", "num_decoder_blocks",
                       "upsampling_scaling_factor", "act_fn", "upsample_fn", "scaling_factor", "shift_factor")


class TinyDecoderFidelityError(LcmEdgeError):
    """A tiny decoder's frames are too far from the full decoder's (PSNR or flicker gate)."""

    def __init__(self, argument: str, problem: str, fix: str, figures: Mapping[str, float]):
        self.argument = argument
        self.figures = dict(figures)
        self._explain(argument, problem, fix)


@dataclass
class TinyDecoderWeights:
    """A DecoderTiny with its AutoencoderTiny config (decoder keys) and where it came from."""

    decoder: nn.Module  # diffusers DecoderTiny
    config: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def upscale(self) -> int:
        return int(self.config["upsampling_scaling_factor"]) ** (len(self.config["num_decoder_blocks"]) - 1)


def decoder_config(latent_channels: int = 4, block_out_channels: Sequence[int] = (64, 64, 64, 64),
                   num_blocks: Sequence[int] = (3, 3, 3, 1), upsampling_scaling_factor: int = 2,
                   act_fn: str = "relu", upsample_fn: str = "nearest", out_channels: int = 3,
                   scaling_factor: float = 1.0, shift_factor: float = 0.0) -> dict[str, Any]:
    """AutoencoderTiny's decoder keys (defaults: TAESD). DecoderTiny feeds each stage's output to the next
    stage's blocks unchanged, so every stage has the same width."""
    channels, blocks = [int(c) for c in block_out_channels], [int(n) for n in num_blocks]
    if not channels or len(channels) != len(blocks) or len(set(channels)) != 1 or channels[0] < 1 \
            or any(n < 0 for n in blocks):
        raise InvalidArgumentError("block_out_channels", f"{channels} with num_blocks {blocks}: DecoderTiny needs "
                                   "one width for every stage and a block count (>= 0) per stage",
                                   "use e.g. block_out_channels [16, 16, 16] with num_blocks [2, 2, 1]")
    return {"latent_channels": int(latent_channels), "out_channels": int(out_channels),
            "decoder_block_out_channels": channels, "num_decoder_blocks": blocks,
            "upsampling_scaling_factor": int(upsampling_scaling_factor), "act_fn": act_fn,
            "upsample_fn": upsample_fn, "scaling_factor": float(scaling_factor),
            "shift_factor": float(shift_factor)}


def build_decoder(config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised diffusers DecoderTiny for `config` (decoder_config's keys)."""
    from diffusers.models.autoencoders.vae import DecoderTiny

    return DecoderTiny(in_channels=config["latent_channels"], out_channels=config["out_channels"],
                       num_blocks=tuple(config["num_decoder_blocks"]),
                       block_out_channels=tuple(config["decoder_block_out_channels"]),
                       upsampling_scaling_factor=config["upsampling_scaling_factor"], act_fn=config["act_fn"],
                       upsample_fn=config["upsample_fn"])


# ----------------------------------------------------------------------------------------------
# Reading and writing both layouts


def _original_architecture(tensors: Mapping[str, torch.Tensor], path: Path, argument: str) -> dict[str, Any]:
    """decoder_config of an original-layout TAESD decoder, read off its nn.Sequential keys."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, rest = key.partition(".")
        layers.setdefault(int(index), {})[rest] = value
    indices = sorted(layers)
    fix = "pass madebyollin/taesd's taesd_decoder.safetensors/.pth or a diffusers AutoencoderTiny folder"
    if indices[0] != 1:
        raise InvalidArgumentError(argument, f"'{path}': first layer index {indices[0]}; TAESD's decoder starts "
                                   "with Clamp (0) and a conv (1)", fix)
    first = layers[1].get("weight")
    if first is None or first.ndim != 4:
        raise InvalidArgumentError(argument, f"'{path}': layer 1 is not a conv", fix)
    latent_channels, width = int(first.shape[1]), int(first.shape[0])
    # After the first conv (1) and its activation (2): per stage, blocks, an upsampler (no weights: an index
    # gap) unless final, then a conv (bias only in the final one).
    blocks, current, expected = [], 0, 3
    out_channels = None
    for index in indices[1:]:
        entry = layers[index]
        gap = index - expected
        if any(k.startswith("conv.") for k in entry):
            if gap:
                raise InvalidArgumentError(argument, f"'{path}': unexpected layer gap before block {index}", fix)
            current += 1
        else:
            if "weight" not in entry or entry["weight"].ndim != 4:
                raise InvalidArgumentError(argument, f"'{path}': layer {index} is neither a block nor a conv", fix)
            if "bias" in entry:  # the final conv
                if gap or index != indices[-1]:
                    raise InvalidArgumentError(argument, f"'{path}': conv {index} has a bias but is not last", fix)
                out_channels = int(entry["weight"].shape[0])
            elif gap != 1:
                raise InvalidArgumentError(argument, f"'{path}': conv {index} does not follow an upsampler", fix)
            blocks.append(current)
            current = 0
        expected = index + 1
    if out_channels is None:
        raise InvalidArgumentError(argument, f"'{path}': no final conv with a bias", fix)
    return decoder_config(latent_channels=latent_channels, block_out_channels=[width] * len(blocks),
                          num_blocks=blocks, out_channels=out_channels)


def _from_original(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original nn.Sequential keys `{i}.rest` -> DecoderTiny keys `layers.{i - 1}.rest` (index 0 is the Clamp)."""
    out = {}
    for key, value in tensors.items():
        index, _, rest = key.partition(".")
        out[f"layers.{int(index) - 1}.{rest}"] = value
    return out


def _to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        out[f"{int(match.group(1)) + 1}.{match.group(2)}"] = value
    return out


def load_tiny_decoder(path: str | os.PathLike, *, argument: str = "weights") -> TinyDecoderWeights:
    """Read TAESD-format decoder weights: a diffusers AutoencoderTiny folder, or an original single file
    (`taesd_decoder.safetensors`/`.pth`, or a folder holding one). Raises InvalidArgumentError /
    WeightsMismatchError naming `argument`."""
    path = Path(path)
    fix = "pass a diffusers AutoencoderTiny folder (config.json + weights) or taesd_decoder.safetensors/.pth"
    if path.is_dir() and (path / "config.json").is_file():
        raw = read_config_json(path / "config.json")
        if raw.get("_class_name") not in (None, "AutoencoderTiny"):
            raise InvalidArgumentError(argument, f"'{path}' holds a {raw.get('_class_name')}, not an "
                                       "AutoencoderTiny", fix)
        config = decoder_config(
            latent_channels=raw.get("latent_channels", 4), out_channels=raw.get("out_channels", 3),
            block_out_channels=raw.get("decoder_block_out_channels", (64, 64, 64, 64)),
            num_blocks=raw.get("num_decoder_blocks", (3, 3, 3, 1)),
            upsampling_scaling_factor=raw.get("upsampling_scaling_factor", 2), act_fn=raw.get("act_fn", "relu"),
            upsample_fn=raw.get("upsample_fn", "nearest"), scaling_factor=raw.get("scaling_factor", 1.0),
            shift_factor=raw.get("shift_factor") or 0.0)
        loaded = read_diffusers_weights(path, argument)
        tensors = {k.removeprefix("decoder."): v for k, v in loaded.tensors.items() if k.startswith("decoder.")}
        layout = "diffusers"
    else:
        if path.is_dir():
            found = [path / name for name in ORIGINAL_LAYOUT_FILES if (path / name).is_file()]
            if not found:
                raise InvalidArgumentError(argument, f"'{path}' has neither config.json nor "
                                           f"{' / '.join(ORIGINAL_LAYOUT_FILES)}", fix)
            path = found[0]
        loaded = read_weight_file(path, argument)
        tensors = dict(loaded.tensors)
        if tensors and all(k.startswith("decoder.layers.") for k in tensors):  # diffusers keys in one file
            raise InvalidArgumentError(argument, f"'{path}' holds diffusers AutoencoderTiny keys without the "
                                       "config.json that says its architecture", "pass the whole folder")
        if not tensors or not all(re.fullmatch(r"\d+\..+", k) for k in tensors):
            shown = sorted(tensors)[:5]
            raise InvalidArgumentError(argument, f"'{path}' is not a TAESD decoder (keys {shown}); encoder "
                                       "files (taesd_encoder.*) and whole-VAE checkpoints do not fit", fix)
        config = _original_architecture(tensors, path, argument)
        tensors = _from_original(tensors)
        layout = "original"
    if not tensors:
        raise InvalidArgumentError(argument, f"'{path}' has no decoder weights", fix)
    decoder = build_decoder(config)
    load_strict(decoder, as_float32(tensors), argument=argument, what=f"'{path}' as a TAESD decoder", fix=fix)
    source = {"layout": layout, **file_record(loaded.files[0])}
    return TinyDecoderWeights(decoder.float().eval(), config, source)


def save_tiny_decoder(weights: TinyDecoderWeights, folder: str | os.PathLike) -> Path:
    """Write both layouts into `folder`: config.json + diffusion_pytorch_model.safetensors (diffusers
    AutoencoderTiny, decoder keys only) and taesd_decoder.safetensors (original layout)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in weights.decoder.state_dict().items()}
    save_file({f"decoder.{k}": v for k, v in state.items()}, str(folder / DIFFUSERS_WEIGHTS))
    save_file(_to_original(state), str(folder / ORIGINAL_LAYOUT_FILES[0]))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", **weights.config},
                                                   indent=2) + "\n", encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------
# Fit, export, gates


def check_fit(weights: TinyDecoderWeights, model: ModelInfo, argument: str = "weights") -> None:
    """The decoder fits the bundle's latent space in every way a shape can tell."""
    c = weights.config
    if c["latent_channels"] != model.latent_channels:
        raise InvalidArgumentError(argument, f"the tiny decoder takes {c['latent_channels']} latent channels, the "
                                   f"bundle's latents have {model.latent_channels}",
                                   "use a tiny decoder made for this model's VAE (TAESD for SD1.5), or distill one "
                                   "for this bundle (lcm_edge.distill.decoder)")
    if c["out_channels"] != 3:
        raise InvalidArgumentError(argument, f"the tiny decoder writes {c['out_channels']} channels, not RGB",
                                   "use a TAESD decoder (3 output channels)")
    if weights.upscale != model.vae_scale_factor:
        raise InvalidArgumentError(argument, f"the tiny decoder upsamples latents {weights.upscale}x, the bundle's "
                                   f"VAE {model.vae_scale_factor}x",
                                   f"use a decoder with {int(np.log2(model.vae_scale_factor)) + 1} stages "
                                   "(num_decoder_blocks), or distill one for this bundle")
    if not (np.isfinite(c["scaling_factor"]) and c["scaling_factor"] > 0 and np.isfinite(c["shift_factor"])):
        raise InvalidArgumentError(argument, f"scaling_factor {c['scaling_factor']} / shift_factor "
                                   f"{c['shift_factor']} cannot map latents", "fix the AutoencoderTiny config.json")


class TinyDecoderWrapper(nn.Module):
    """The bundle's decoder convention around DecoderTiny: latents divided by the bundle's VAE scaling
    factor in, images in [-1, 1] out (see the module docstring for the mapping)."""

    def __init__(self, decoder: nn.Module, config: Mapping[str, Any], vae_scaling_factor: float):
        super().__init__()
        self.decoder = decoder
        self.scale = float(vae_scaling_factor) / float(config["scaling_factor"])
        self.shift = float(config["shift_factor"])

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        latents = latent_sample * self.scale
        if self.shift:
            latents = latents + self.shift
        return self.decoder(latents)


def tiny_decoder_spec(latent_channels: int) -> ComponentSpec:
    """The full decoder's inputs, outputs and parity tolerance under the tiny decoder's name."""
    return dataclasses.replace(vae_decoder_spec(latent_channels), name=TINY_DECODER)


def tiny_decoder_graph(weights: TinyDecoderWeights, model: ModelInfo) -> GraphSpec:
    """The tiny decoder as one more graph for export_graph: plain attention, fp32 only."""
    module = TinyDecoderWrapper(weights.decoder, weights.config, model.vae_scaling_factor).eval().float()
    trace_case, cases = model_shape_cases(model)
    return GraphSpec(tiny_decoder_spec(model.latent_channels), module,
                     {"_class_name": "AutoencoderTiny", **weights.config, "input_scale": module.scale},
                     trace_case=trace_case, cases=cases)


def export_component(weights: TinyDecoderWeights, model: ModelInfo, root: Path, *, openvino: bool,
                     seed: int = 0) -> tuple[ComponentInfo, dict[str, ParityReport]]:
    """Trace `weights` into root/vae_decoder_tiny/ (model.onnx, config.json [, OpenVINO IR]) and gate every graph
    against torch at two shapes; raises ParityError."""
    exported = export_graph(tiny_decoder_graph(weights, model), root, rng=np.random.default_rng(seed),
                            ort_backend=create_backend("onnxruntime", "cpu"),
                            ov_backend=openvino_gate_backend() if openvino else None, external_data=False)
    return exported.info, exported.parity


def decoder_batches(latents: np.ndarray, vae_scaling_factor: float, chunk: int = 8) -> list[np.ndarray]:
    """(1, c, f, h, w) latents -> the decoder's `latent_sample` feeds, (<= chunk, c, h, w) each."""
    per_frame = (latents[0] / np.float32(vae_scaling_factor)).transpose(1, 0, 2, 3).astype(np.float32)
    return [np.ascontiguousarray(per_frame[i:i + chunk]) for i in range(0, per_frame.shape[0], chunk)]


def unit_frames(session, latents: np.ndarray, vae_scaling_factor: float, chunk: int = 8) -> np.ndarray:
    """(1, c, f, h, w) latents -> float (f, 3, H, W) frames in [0, 1] through a decoder session."""
    images = [session.run({"latent_sample": batch})["sample"]
              for batch in decoder_batches(latents, vae_scaling_factor, chunk)]
    return np.clip(np.concatenate(images).astype(np.float32) / 2 + 0.5, 0.0, 1.0)


def flicker(frames: np.ndarray) -> float:
    """Mean |frame t+1 - frame t| of one clip's (f, ...) [0, 1] frames."""
    return float(np.mean(np.abs(np.diff(frames.astype(np.float64), axis=0)))) if len(frames) > 1 else 0.0


def fidelity(full, tiny, clips: Sequence[np.ndarray], vae_scaling_factor: float) -> dict[str, float]:
    """PSNR (all frames pooled) and flicker of the tiny decoder against the full one on (1, c, f, h, w) clips."""
    ref, got, flicker_full, flicker_tiny = [], [], [], []
    for latents in clips:
        a, b = unit_frames(full, latents, vae_scaling_factor), unit_frames(tiny, latents, vae_scaling_factor)
        ref.append(a)
        got.append(b)
        flicker_full.append(flicker(a))
        flicker_tiny.append(flicker(b))
    return {"psnr_db": psnr_db(np.concatenate(ref), np.concatenate(got), peak=1.0), "clips": len(clips),
            "frames": int(sum(len(a) for a in ref)), "flicker_full": float(np.mean(flicker_full)),
            "flicker_tiny": float(np.mean(flicker_tiny)),
            "flicker_excess": float(np.mean(flicker_tiny) - np.mean(flicker_full))}


def check_fidelity(figures: Mapping[str, float], *, argument: str, min_psnr_db: float,
                   flicker_margin: float) -> None:
    problems = []
    if not figures["psnr_db"] >= min_psnr_db:
        problems.append(f"PSNR against the full decoder {figures['psnr_db']:.2f} dB < {min_psnr_db} dB "
                        "(TINY_DECODER_MIN_PSNR_DB)")
    if not figures["flicker_excess"] <= flicker_margin:
        problems.append(f"flicker {figures['flicker_tiny']:.4f} exceeds the full decoder's "
                        f"{figures['flicker_full']:.4f} by more than {flicker_margin} (TINY_DECODER_FLICKER_MARGIN)")
    if problems:
        raise TinyDecoderFidelityError(argument, "the tiny decoder's frames do not match the bundle's VAE decoder on "
                                       f"{figures['clips']} sampled clips: " + "; ".join(problems),
                                       "use weights made for this model's latent space (TAESD for SD1.5), or "
                                       "distill one for this bundle (lcm_edge.distill.decoder)", figures)


def sample_latents(bundle: Bundle, *, prompts: Sequence[str] = FIDELITY_PROMPTS, clips: int = FIDELITY_CLIPS,
                   seed_base: int = FIDELITY_SEED_BASE, num_frames: int | None = None, threads: int | None = None,
                   steps: int = 4) -> list[np.ndarray]:
    """Final latents (1, c, f, h, w) of `clips` clips from the bundle's own sampler, prompt i % len at seed base + i."""
    from lcm_edge.pipeline import AnimateLCMPipeline, PromptTruncatedWarning

    frames = num_frames or min(bundle.model.default_frames, FIDELITY_MAX_FRAMES)
    pipe = AnimateLCMPipeline(bundle, create_backend("onnxruntime", "cpu", **({"threads": threads} if threads
                                                                              else {})))
    with warnings.catch_warnings():
        # A prompt the text encoder truncates still samples this model's latent space, which is all the gate needs.
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return [pipe(prompts[i % len(prompts)], num_frames=frames, num_inference_steps=steps,
                     seed=seed_base + i).latents for i in range(clips)]


# ----------------------------------------------------------------------------------------------
# Adding to a bundle


@dataclass
class TinyDecoderReport:
    bundle: Path
    parity: dict[str, ParityReport]
    fidelity: dict[str, float] | None

    def summary(self) -> str:
        lines = [f"{TINY_DECODER} added to {self.bundle}"]
        for key, report in self.parity.items():
            lines.append(f"  {key}: worst max abs {report.worst_abs():.3g} (tolerance {report.tolerance.name})")
        if self.fidelity is not None:
            f = self.fidelity
            lines.append(f"  fidelity on {f['clips']} sampled clips ({f['frames']} frames): PSNR {f['psnr_db']:.2f} dB "
                         f"against the full decoder; flicker {f['flicker_tiny']:.4f} vs {f['flicker_full']:.4f}")
        return "\n".join(lines)


def _write_manifest_atomically(root: Path, bundle: Bundle, components: Mapping[str, ComponentInfo],
                               provenance: Mapping[str, Any]) -> None:
    """bundle.json for `components`, through a temporary manifest renamed over the old one."""
    write_manifest(root, model=bundle.model, components=components, provenance=provenance,
                   known=bundle.files)


def install_tiny_decoder(root: str | os.PathLike, weights: TinyDecoderWeights | str | os.PathLike, *,
                         argument: str = "weights", openvino: bool | None = None,
                         check_latents: Sequence[np.ndarray] | None = None,
                         min_psnr_db: float | None = TINY_DECODER_MIN_PSNR_DB,
                         flicker_margin: float = TINY_DECODER_FLICKER_MARGIN, overwrite: bool = False,
                         threads: int | None = None, provenance: Mapping[str, Any] | None = None
                         ) -> TinyDecoderReport:
    """Add `weights` as vae_decoder_tiny to the bundle folder `root`, in place (a published bundle, or the
    exporter's own temporary folder: add_tiny_decoder is the entry point for users).

    Checks the fit, exports and parity-gates the graph (OpenVINO IR too when `openvino`, default: when the
    bundle has IR), gates fidelity on `check_latents` ((1, c, f, h, w) latents; default: FIDELITY_CLIPS clips
    from the bundle's own sampler at FIDELITY_SEED_BASE) unless `min_psnr_db` is None (weights checked
    elsewhere), then rewrites bundle.json. Nothing changes in the bundle unless every gate passed.
    """
    root = Path(root)
    bundle = load_unpublished_bundle(root, verify_checksums=True)
    if not isinstance(weights, TinyDecoderWeights):
        weights = load_tiny_decoder(weights, argument=argument)
    check_fit(weights, bundle.model, argument)
    if TINY_DECODER in bundle.components and not overwrite:
        raise InvalidArgumentError("overwrite", f"{root} already has a {TINY_DECODER}",
                                   "pass overwrite=True to replace it")
    if openvino is None:
        openvino = bundle.has_openvino()
    if min_psnr_db is not None and check_latents is None:
        check_latents = sample_latents(bundle, threads=threads)
    for i, latents in enumerate(check_latents or ()):
        m = bundle.model
        if not isinstance(latents, np.ndarray) or latents.ndim != 5 or latents.shape[:2] != (1, m.latent_channels):
            raise InvalidArgumentError("check_latents", f"[{i}] has shape {getattr(latents, 'shape', None)}",
                                       f"pass (1, {m.latent_channels}, frames, h, w) latents")

    # The component is written and gated beside the bundle, in a claimed temporary folder that the next add to this
    # bundle removes if this process dies (lcm_edge.atomic_output).
    target = root.parent / f"{root.name}.{TINY_DECODER}"
    recover(target)
    partial = Partial(target)
    staging = partial.path
    staging.mkdir()
    try:
        info, parity = export_component(weights, bundle.model, staging, openvino=openvino)
        figures = None
        if min_psnr_db is not None:
            backend = create_backend("onnxruntime", "cpu", **({"threads": threads} if threads else {}))
            figures = fidelity(backend.open(root, bundle.components["vae_decoder"]), backend.open(staging, info),
                               check_latents, bundle.model.vae_scaling_factor)
            check_fidelity(figures, argument=argument, min_psnr_db=min_psnr_db, flicker_margin=flicker_margin)
        components = {k: v for k, v in bundle.components.items() if k != TINY_DECODER}
        old_provenance = dict(bundle.provenance)
        if TINY_DECODER in bundle.components:
            # 1. A manifest without the old tiny decoder, so its files can go while the bundle stays valid.
            kept_files = {k: v for k, v in bundle.files.items() if not k.startswith(f"{TINY_DECODER}/")}
            _write_manifest_atomically(root, dataclasses.replace(bundle, files=kept_files), components,
                                       {k: v for k, v in old_provenance.items() if k != "tiny_decoder"})
            shutil.rmtree(root / TINY_DECODER)
        elif (root / TINY_DECODER).exists():
            shutil.rmtree(root / TINY_DECODER)  # left by an interrupted add: the manifest never listed it
        # 2. The gated files move in; the manifest does not list them yet.
        os.replace(staging / TINY_DECODER, root / TINY_DECODER)
        # 3. The manifest that lists them replaces the old one in one rename.
        parity_all = dict(old_provenance.get("parity", {}))
        parity_all.update({key: r.to_dict() for key, r in parity.items()})
        record = {"source": {**weights.source, **dict(provenance or {})}, "config": weights.config,
                  "fidelity": figures, "gates": {"min_psnr_db": min_psnr_db, "flicker_margin": flicker_margin}}
        _write_manifest_atomically(root, dataclasses.replace(bundle, files={
            k: v for k, v in bundle.files.items() if not k.startswith(f"{TINY_DECODER}/")}),
            {**components, TINY_DECODER: info},
            {**old_provenance, "parity": parity_all, "tiny_decoder": record})
    finally:
        partial.close()
    load_unpublished_bundle(root, verify_checksums=True)
    return TinyDecoderReport(root, parity, figures)


def add_tiny_decoder(bundle: str | os.PathLike, weights: TinyDecoderWeights | str | os.PathLike, *,
                     out: str | os.PathLike | None = None, **options) -> TinyDecoderReport:
    """Add a tiny decoder to `bundle` (in place), or to a copy of it at `out` (which must not exist; the copy
    appears under that name only once the tiny decoder is in). `options`: see install_tiny_decoder."""
    if out is None:
        load_bundle(bundle, verify_checksums=False)  # refuses an export's temporary folder
        return install_tiny_decoder(bundle, weights, **options)
    out = Path(out)
    source = load_bundle(bundle, verify_checksums=True)
    if not out.parent.is_dir():
        raise InvalidArgumentError("out", f"folder '{out.parent}' does not exist", "create it first")
    recover(out)  # what an add or export to `out` that was killed left behind
    if out.exists():
        raise InvalidArgumentError("out", f"'{out}' already exists", "choose a new folder")
    with Partial(out) as partial:
        shutil.copytree(source.root, partial.path, ignore=shutil.ignore_patterns(f"{MANIFEST_NAME}.tmp"))
        report = install_tiny_decoder(partial.path, weights, **options)
        partial.publish()
    return dataclasses.replace(report, bundle=out)


__all__ = ["DECODER_CONFIG_KEYS", "FIDELITY_SEED_BASE", "TINY_DECODER", "TINY_DECODER_FLICKER_MARGIN",
           "TINY_DECODER_MIN_PSNR_DB", "TinyDecoderFidelityError", "TinyDecoderReport", "TinyDecoderWeights",
           "TinyDecoderWrapper", "add_tiny_decoder", "build_decoder", "check_fidelity", "check_fit",
           "decoder_config", "export_component", "fidelity", "flicker", "install_tiny_decoder",
           "load_tiny_decoder", "psnr_db", "sample_latents", "save_tiny_decoder", "tiny_decoder_graph",
           "tiny_decoder_spec", "decoder_batches", "unit_frames"]
