"""LoRAs (kohya, diffusers/peft, AnimateDiff motion LoRAs) fused into the weights, behind a gate.

Formats read (one file may mix them):
- kohya: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `lora_te_...` for the text encoder. Underscore names are resolved against the model's own
  module names (diffusers names, or LDM names for the UNet), never by string heuristics.
- peft: `[unet.|text_encoder.]<module>.lora_A.weight` / `.lora_B.weight`, alpha from per-module
  `.alpha` keys or the `lora_adapter_metadata` header diffusers writes; without either,
  alpha = rank (scale 1, the diffusers/PEFT convention).
- old diffusers / AnimateDiff motion LoRAs: `<attn>.processor.to_q_lora.down.weight`,
  `<module>.lora.down.weight`, `<module>.lora_linear_layer.down.weight`; original motion-module
  names (`temporal_transformer`, `attention_blocks.N`) are renamed as motion_module.py does.

Fusion: W += user_weight * (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape).
The gate runs each touched model with the adapters applied at run time (forward hooks,
y + s * up(down(x))), fuses, runs again, and requires equal outputs within LORA_FUSION_TOLERANCE.
That gate shares this module's reading of each file (scale, target module); the reference check reads the
file again with diffusers (lora_state_dict + load_lora_into_unet/_text_encoder, peft: what load_lora_weights
does) and requires every weight delta its fuse_lora would add to equal ours within LORA_REFERENCE_TOLERANCE,
so a misread alpha or a wrong target module fails loudly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lcm_edge.errors import InvalidArgumentError, ParityError

from .checkpoints import unet_ldm_name
from .parity import compare
from .specs import Tolerance
from .weights import WeightsMismatchError, read_weight_file

# fp32, adapters at run time vs fused: only the order of float additions differs. Measured
# max abs: tiny UNet 1.2e-7, tiny CLIP 1.1e-6, full-size UNet with a rank-64 LoRA 1.1e-6
# (benchmarks/full_size_export.py). A LoRA fused into the wrong module, transposed or with the
# wrong scale is off by O(LoRA effect) instead: 0.08 (full-size UNet) to 0.6 (tiny CLIP).
LORA_FUSION_TOLERANCE = Tolerance("lora-fused-vs-unfused", atol=1e-4, rtol=1e-3)
# Our weight delta against diffusers/peft's get_delta_weight for the same module: the same float32 products,
# summed in another order.
LORA_REFERENCE_TOLERANCE = Tolerance("lora-delta-vs-diffusers", atol=1e-6, rtol=1e-4)
# Formats diffusers' SD1.5 loader reads; motion LoRAs in the attention-processor layouts it does not.
DIFFUSERS_READABLE = frozenset({"kohya", "peft"})
# diffusers 0.42 with transformers 5 drops kohya text-encoder attention LoRAs (with only a load report), so
# those modules of ours have no reference; every other module of ours must have one.
_UNREFERENCED_OK = re.compile(r"(?:^|\.)encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj$")

COMPONENTS = ("unet", "text_encoder")
FIX_LORA = ("pass an SD1.5 LoRA (kohya lora_unet_*/lora_te_*, or diffusers/peft lora_A/lora_B) or an "
            "AnimateDiff motion LoRA; LoRAs for SDXL/SD2 or LyCORIS variants (LoHa, LoKr, DoRA) do not fit")

_KOHYA = re.compile(r"^(lora_unet|lora_te1?|lora_te2)_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PREFIX = r"(?:(unet|text_encoder|text_encoder_2)\.)?"
_ATTN_PROCESSOR = re.compile(rf"^{_PREFIX}(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LORA_LAYER = re.compile(rf"^{_PREFIX}(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_PEFT = re.compile(rf"^{_PREFIX}(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$")
_ALPHA = re.compile(rf"^{_PREFIX}(.+)\.alpha$")
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "down": "down", "up": "up",
         "lora_A": "down", "lora_B": "up"}
_TEXT_ATTENTION = {".to_q": ".q_proj", ".to_k": ".k_proj", ".to_v": ".v_proj", ".to_out.0": ".out_proj"}


@dataclass(frozen=True)
class LoraRequest:
    """One `--lora FILE[:WEIGHT]`."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraRequest":
        # Split at the last colon only when what follows is a number (Windows paths have colons).
        head, sep, tail = text.rpartition(":")
        if sep:
            try:
                weight = float(tail)
            except ValueError:
                return cls(Path(text))
            if not math.isfinite(weight):
                raise InvalidArgumentError("--lora", f"weight {tail!r} is not finite", "use e.g. FILE:0.8")
            return cls(Path(head), weight)
        return cls(Path(text))


@dataclass
class LoraLayer:
    component: str
    module: str
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float
    scale: float  # alpha / rank (or alpha / sqrt(rank) for rsLoRA), before the user weight

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        return (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(weight_shape)


@dataclass
class LoraFile:
    path: Path
    weight: float
    formats: list[str]
    layers: list[LoraLayer]

    def summary(self) -> dict:
        ranks = sorted({layer.rank for layer in self.layers})
        alphas = sorted({layer.alpha for layer in self.layers})
        return {"file": str(self.path.resolve()), "weight": self.weight, "formats": self.formats,
                "layers": len(self.layers), "ranks": ranks, "alphas": alphas,
                "components": sorted({layer.component for layer in self.layers}),
                "motion_layers": sum("motion_modules" in layer.module for layer in self.layers)}


@dataclass
class _Entry:
    component: str
    name: str  # module path, or the underscore name for kohya keys
    kohya: bool
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key


def _motion_rename(path: str) -> str:
    return (path.replace(".norms.0", ".norm1").replace(".norms.1", ".norm2").replace(".ff_norm", ".norm3")
            .replace(".attention_blocks.0", ".attn1").replace(".attention_blocks.1", ".attn2")
            .replace(".temporal_transformer", ""))


def _classify(key: str) -> tuple[str, str, str, bool, str] | None:
    """(format, component, module-or-kohya-name, is_kohya, role) of one key, or None if unknown."""
    if m := _KOHYA.match(key):
        component = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                     "lora_te2": "text_encoder_2"}[m[1]]
        return "kohya", component, m[2], True, _ROLE[m[3]]
    if m := _ATTN_PROCESSOR.match(key):
        target = "to_out.0" if m[3] == "to_out" else m[3]
        return "diffusers-attn-procs", m[1] or "", f"{m[2]}.{target}", False, m[4]
    if m := _LORA_LAYER.match(key):
        return "diffusers-old", m[1] or "", m[2], False, m[3]
    if m := _PEFT.match(key):
        return "peft", m[1] or "", m[2], False, _ROLE[m[3]]
    if m := _ALPHA.match(key):
        return "alpha", m[1] or "", m[2], False, "alpha"
    return None


def _module_path(component: str, path: str) -> tuple[str, str]:
    path = _motion_rename(path)
    if not component:
        component = "text_encoder" if path.startswith("text_model.") else "unet"
    if component == "text_encoder":
        for old, new in _TEXT_ATTENTION.items():
            if path.endswith(old):
                path = path[: -len(old)] + new
    return component, path


def _module_lookup(model: nn.Module, component: str) -> dict[str, str]:
    """Every name a LoRA may use for a Linear/Conv2d of `model` -> its module name.

    Aliases: the dotted name; its underscore form (kohya); for the UNet the LDM name (kohya
    LoRAs trained on LDM checkpoints); for CLIP with and without the `text_model.` level that
    transformers 5 dropped. Two modules claiming one alias is an error, never a guess.
    """
    lookup: dict[str, str] = {}
    config = getattr(model, "config", None)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        dotted = {name}
        if component == "text_encoder":
            dotted.add("text_model." + name.removeprefix("text_model."))
            dotted.add(name.removeprefix("text_model."))
        if component == "unet" and "motion_modules" not in name:
            try:
                dotted.add(unet_ldm_name(f"{name}.weight", config).removesuffix(".weight"))
            except (KeyError, InvalidArgumentError):
                pass
        for alias in dotted | {d.replace(".", "_") for d in dotted}:
            if lookup.get(alias, name) != name:
                raise InvalidArgumentError(component, f"module names '{lookup[alias]}' and '{name}' both read "
                                           f"'{alias}'", "this model cannot take LoRAs by name")
            lookup[alias] = name
    return lookup


def _metadata_alphas(metadata: Mapping[str, str], path: Path, argument: str) -> dict[str, dict]:
    """Per-component LoraConfig fields from diffusers' `lora_adapter_metadata` header."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(argument, f"'{path}' has unreadable lora_adapter_metadata ({exc})",
                                   "re-save the LoRA with diffusers") from exc
    out: dict[str, dict] = {}
    for key, value in data.items():
        component, _, field_name = key.partition(".")
        out.setdefault(component, {})[field_name] = value
    return out


def _alpha_from_config(config: Mapping, module: str, rank: int) -> tuple[float, float]:
    """(alpha, scale) under PEFT's rules: alpha_pattern/rank_pattern match a module-name suffix."""
    if config.get("use_dora"):
        raise InvalidArgumentError("--lora", "DoRA adapters are not supported", FIX_LORA)

    names = (module, "text_model." + module)  # patterns may carry CLIP's pre-transformers-5 level

    def pattern_value(patterns: Mapping, default):
        for pattern, value in (patterns or {}).items():
            if any(re.fullmatch(rf"(.*\.)?({pattern})", name) for name in names):
                return value
        return default

    alpha = float(pattern_value(config.get("alpha_pattern"), config.get("lora_alpha", rank)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return alpha, scale


def load_lora(path: str | Path, models: Mapping[str, nn.Module], *, weight: float = 1.0,
              argument: str = "--lora") -> LoraFile:
    """Parse a LoRA file and resolve every layer against `models` ({"unet": UNetMotionModel, ...})."""
    path = Path(path)
    arg = f"{argument} {path}"
    loaded = read_weight_file(path, arg)
    metadata = _metadata_alphas(loaded.metadata, path, arg)
    entries: dict[tuple[str, str], _Entry] = {}
    unknown, formats = [], set()
    for key in loaded.tensors:
        parsed = _classify(key)
        if parsed is None:
            unknown.append(key)
            continue
        fmt, component, name, kohya, role = parsed
        if not kohya:
            component, name = _module_path(component, name)
        if fmt != "alpha":
            formats.add(fmt)
        entry = entries.setdefault((component, name), _Entry(component, name, kohya))
        if role in entry.keys:
            unknown.append(key)  # two keys for one role (e.g. lora_A and lora.down): ambiguous
            continue
        entry.keys[role] = key

    lookups = {c: _module_lookup(m, c) for c, m in models.items()}
    modules = {c: dict(m.named_modules()) for c, m in models.items()}
    layers, missing, unexpected, mismatched = [], [], list(unknown), []
    for entry in entries.values():
        if "down" not in entry.keys or "up" not in entry.keys:
            present = list(entry.keys.values())
            if set(entry.keys) == {"alpha"}:
                unexpected.extend(present)
            else:
                lacking = " and ".join(r for r in ("down", "up") if r not in entry.keys)
                missing.append(f"{lacking} weight of '{entry.name}' (the file has only {present})")
            continue
        if entry.component not in models:
            unexpected.extend(entry.keys.values())
            continue
        module_name = lookups[entry.component].get(entry.name, "")
        module = modules[entry.component].get(module_name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            unexpected.extend(entry.keys.values())
            continue
        down, up = loaded.tensors[entry.keys["down"]].float(), loaded.tensors[entry.keys["up"]].float()
        problem = _shape_problem(module, down, up)
        if problem:
            mismatched.append(f"{entry.keys['down']}: {problem}")
            continue
        rank = int(down.shape[0])
        if "alpha" in entry.keys:
            alpha = float(loaded.tensors[entry.keys["alpha"]].float().item())
            alpha, scale = alpha, alpha / rank
        else:
            alpha, scale = _alpha_from_config(metadata.get(entry.component, {}), module_name, rank)
        layers.append(LoraLayer(entry.component, module_name, down, up, alpha, scale))
    if missing or unexpected or mismatched or not layers:
        if not (missing or unexpected or mismatched):
            missing = ["(no LoRA layers in the file)"]
        raise WeightsMismatchError(arg, f"LoRA '{path}'", missing=missing, unexpected=unexpected,
                                   mismatched=mismatched, fix=FIX_LORA)
    return LoraFile(path=path, weight=weight, formats=sorted(formats), layers=layers)


def _shape_problem(module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    weight = module.weight
    kernel = tuple(weight.shape[2:])
    pointwise = all(k == 1 for k in kernel)  # Linear, or a 1x1 convolution
    down_kernel = tuple(down.shape[2:])
    down_ok = down.dim() in (2, 4) and down.shape[1] == weight.shape[1] and (
        (down.dim() == 2 and pointwise) or down_kernel == kernel or (down_kernel == (1, 1) and pointwise))
    up_ok = up.dim() in (2, 4) and up.shape[0] == weight.shape[0] and up.shape[1] == down.shape[0] and \
        tuple(up.shape[2:]) in ((), (1, 1))
    if down_ok and up_ok:
        return None
    return f"down {list(down.shape)}, up {list(up.shape)} vs weight {list(weight.shape)}"


# --------------------------------------------------------------------------- fusion and its gate


def _runtime_delta(module: nn.Module, x: torch.Tensor, layer: LoraLayer, scale: float) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        down = layer.down if layer.down.dim() == 4 else layer.down[:, :, None, None]
        up = layer.up if layer.up.dim() == 4 else layer.up[:, :, None, None]
        hidden = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
        return scale * F.conv2d(hidden, up)
    return scale * F.linear(F.linear(x, layer.down.flatten(1)), layer.up.flatten(1))


def _attach(models: Mapping[str, nn.Module], loras: Sequence[LoraFile]) -> list:
    handles = []
    modules = {c: dict(m.named_modules()) for c, m in models.items()}
    for lora in loras:
        for layer in lora.layers:
            module = modules[layer.component][layer.module]
            scale = lora.weight * layer.scale

            def hook(mod, inputs, output, layer=layer, scale=scale):
                return output + _runtime_delta(mod, inputs[0], layer, scale)

            handles.append(module.register_forward_hook(hook))
    return handles


@dataclass(frozen=True)
class FusionCheck:
    component: str
    max_abs: float  # fused vs adapters at run time
    max_rel: float
    effect_max_abs: float  # with LoRAs vs without: shows the gate compared something that changed
    passed: bool


@dataclass
class FusionReport:
    tolerance: Tolerance
    checks: list[FusionCheck]
    loras: list[dict]
    reference: list[dict] = field(default_factory=list)  # check_against_diffusers, one entry per file

    def to_dict(self) -> dict:
        return {"tolerance": {"name": self.tolerance.name, "atol": self.tolerance.atol, "rtol": self.tolerance.rtol},
                "checks": [vars(c) for c in self.checks], "loras": self.loras, "reference": self.reference}


def check_against_diffusers(models: Mapping[str, nn.Module], lora: LoraFile, *,
                            tolerance: Tolerance = LORA_REFERENCE_TOLERANCE) -> dict:
    """diffusers' own reading of `lora.path` against ours, on the unfused `models` (left as they were).

    diffusers loads the file into the models as peft adapters (as load_lora_weights does); for every module it
    adapted, the delta its fuse_lora would add (peft's get_delta_weight: scaling alpha / rank included) must equal
    ours (scale x up @ down) on the same module, and every module of ours must be one diffusers adapted
    (_UNREFERENCED_OK aside). Raises ParityError otherwise; a file in a format diffusers does not read is
    reported as skipped, and so is one whose module names diffusers' SD1.5 loader does not map (kohya files with
    LDM names: this module resolves those against the checkpoint's own layout).
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from peft.utils.error import NoMatchingPeftModuleError

    summary = {"file": str(lora.path.resolve()), "tolerance": tolerance.name}
    unread = sorted(set(lora.formats) - DIFFUSERS_READABLE)
    if unread:
        return {**summary, "skipped": f"diffusers does not read the {unread} layout"}
    name = "lcm_edge_reference"
    state_dict, network_alphas, metadata = Loader.lora_state_dict(str(lora.path), return_lora_metadata=True)
    failures, compared, worst = [], 0, 0.0
    try:
        with torch.no_grad():
            try:
                if "unet" in models:
                    Loader.load_lora_into_unet(state_dict, network_alphas, unet=models["unet"], adapter_name=name,
                                               metadata=metadata)
                if "text_encoder" in models:
                    Loader.load_lora_into_text_encoder(state_dict, network_alphas,
                                                       text_encoder=models["text_encoder"], prefix="text_encoder",
                                                       adapter_name=name, metadata=metadata)
            except NoMatchingPeftModuleError as error:
                return {**summary, "skipped": f"diffusers maps none of its names onto the model ({error})"}
            for component, model in models.items():
                theirs = {path: module for path, module in model.named_modules()
                          if isinstance(module, PeftLoraLayer) and name in module.lora_A}
                ours = {layer.module: layer for layer in lora.layers if layer.component == component}
                failures += [f"{component}.{path}: diffusers adapts it, this reading does not"
                             for path in sorted(set(theirs) - set(ours))]
                failures += [f"{component}.{path}: this reading adapts it, diffusers does not"
                             for path in sorted(set(ours) - set(theirs)) if not _UNREFERENCED_OK.match(path)]
                for path in sorted(set(theirs) & set(ours)):
                    reference = theirs[path].get_delta_weight(name).float()
                    delta = ours[path].scale * ours[path].delta(reference.shape)
                    max_abs, _, ok = compare(reference.numpy(), delta.numpy(), tolerance)
                    compared, worst = compared + 1, max(worst, max_abs)
                    if not ok:
                        failures.append(f"{component}.{path}: delta max abs {max_abs:.3g} from diffusers' (alpha "
                                        f"{ours[path].alpha}, rank {ours[path].rank})")
    finally:
        for model in models.values():
            recurse_remove_peft_layers(model)
            if hasattr(model, "peft_config"):
                model.peft_config.pop(name, None)
                if not model.peft_config:
                    del model.peft_config
                    model._hf_peft_config_loaded = False
    if failures:
        raise ParityError(f"LoRA {lora.path.name} read by lcm_edge vs diffusers", failures)
    return {**summary, "modules_compared": compared, "max_abs": worst}


def fuse_loras(models: Mapping[str, nn.Module], loras: Sequence[LoraFile],
               probes: Mapping[str, Callable[[nn.Module], np.ndarray]], *,
               tolerance: Tolerance = LORA_FUSION_TOLERANCE) -> FusionReport:
    """Fuse `loras` into `models` in place; raise ParityError if fused != unfused (models are then unusable).

    `probes[component](model)` runs the model on fixed inputs and returns its output.
    """
    touched = sorted({layer.component for lora in loras for layer in lora.layers})
    missing_probe = [c for c in touched if c not in probes]
    if missing_probe:
        raise InvalidArgumentError("probes", f"no probe for {missing_probe}", "pass one probe per touched model")
    reference = [check_against_diffusers({c: models[c] for c in touched}, lora) for lora in loras]
    with torch.no_grad():
        base = {c: probes[c](models[c]) for c in touched}
        handles = _attach(models, loras)
        try:
            unfused = {c: probes[c](models[c]) for c in touched}
        finally:
            for handle in handles:
                handle.remove()
        modules = {c: dict(m.named_modules()) for c, m in models.items()}
        for lora in loras:
            for layer in lora.layers:
                weight = modules[layer.component][layer.module].weight
                weight.add_((lora.weight * layer.scale) * layer.delta(weight.shape).to(weight.dtype))
        fused = {c: probes[c](models[c]) for c in touched}
    checks = []
    for c in touched:
        max_abs, max_rel, ok = compare(unfused[c], fused[c], tolerance)
        effect = float(np.abs(unfused[c].astype(np.float64) - base[c]).max())
        checks.append(FusionCheck(c, max_abs, max_rel, effect, ok))
    failures = [f"{c.component}: fused vs unfused max abs {c.max_abs:.3g}, max rel {c.max_rel:.3g} > tolerance "
                f"{tolerance.name} (atol {tolerance.atol}, rtol {tolerance.rtol})" for c in checks if not c.passed]
    if failures:
        raise ParityError("LoRA fused vs adapters at run time", failures)
    return FusionReport(tolerance, checks, [lora.summary() for lora in loras], reference)
