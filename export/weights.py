"""Reading weight files and loading them strictly: every key accounted for, or a typed error.

Rules shared by every loader in lcm_edge.export:
- `.safetensors` is read lazily with safetensors; `.ckpt`/`.pt`/`.bin` are pickles and are read
  with `torch.load(weights_only=True)`, which refuses to run code hidden in the pickle.
- Weights are loaded into a model built on the `meta` device with `assign=True`, so a 5 GB UNet
  is never allocated twice (random init + copy) and nothing of it stays uninitialised: a
  tensor left on `meta` after loading is a partial load and raises.
- Missing, unexpected and wrongly shaped keys are all listed in one `WeightsMismatchError`.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from lcm_edge.bundle import read_json
from lcm_edge.errors import BundleFormatError, BundleNotFoundError, InvalidArgumentError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# How many keys of each kind an error message shows; the exception keeps the full lists.
_SHOWN_KEYS = 12
# torch.save stores every zip entry uncompressed, so a checkpoint's entries add up to its own size (plus the
# zip headers). One whose entries claim more than this many times its size, plus the slack, is refused
# unread: a zip bomb is a small file that inflates until memory runs out.
ZIP_MAX_EXPANSION = 2
ZIP_SLACK_BYTES = 1 << 20


class WeightsMismatchError(InvalidArgumentError):
    """A weight file does not fit the architecture it is loaded into.

    `missing`, `unexpected` and `mismatched` ("key: file shape vs model shape") are complete lists.
    """

    def __init__(self, argument: str, what: str, *, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 mismatched: Iterable[str] = (), fix: str):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("wrong shape", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:_SHOWN_KEYS])
                more = f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
                parts.append(f"{len(keys)} {label} key(s): {shown}{more}")
        super().__init__(argument, f"{what} does not fit: " + "; ".join(parts), fix)


@dataclass
class LoadedWeights:
    """A state dict read from one file (or one diffusers sub-folder), with where it came from."""

    tensors: dict[str, torch.Tensor]
    files: list[Path]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata

    def dtypes(self) -> list[str]:
        return sorted({str(t.dtype).replace("torch.", "") for t in self.tensors.values()})


def file_record(path: Path) -> dict:
    """Provenance entry of a source file: name, size and sha256 (the id model sites publish)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return {"file": str(path.resolve()), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def _require_file(path: Path, argument: str) -> Path:
    if not path.is_file():
        raise BundleNotFoundError(path, f"{argument}: file does not exist", "check the path")
    return path


def _unwrap(obj, path: Path, argument: str) -> dict:
    # Lightning/LDM checkpoints wrap the weights in {"state_dict": {...}, "global_step": ...}.
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InvalidArgumentError(argument, f"'{path}' holds a {type(obj).__name__}, not a dict of tensors",
                                   "pass a state-dict checkpoint (.safetensors or .ckpt)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if others:
        raise InvalidArgumentError(argument, f"'{path}' has non-tensor entries {others[:_SHOWN_KEYS]}",
                                   "pass a file that holds only weights")
    return tensors


def read_weight_file(path: str | Path, argument: str, *,
                     keep: Callable[[str], bool] = lambda key: True) -> LoadedWeights:
    """All tensors of one file whose key passes `keep` (others are never read into memory)."""
    path = _require_file(Path(path), argument)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                tensors = {key: fh.get_tensor(key) for key in fh.keys() if keep(key)}
        except (SafetensorError, OSError) as exc:
            raise InvalidArgumentError(argument, f"'{path}' is not a readable safetensors file ({exc})",
                                       "re-download the file; check it is complete") from exc
        return LoadedWeights(tensors, [path], metadata)
    if suffix in PICKLE_SUFFIXES:
        _check_archive(path, argument)
        try:
            # weights_only: never execute code from a pickle; mmap: do not read what `keep` drops.
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise InvalidArgumentError(
                argument, f"'{path}' contains Python objects besides tensors, which lcm-edge refuses to "
                f"unpickle ({str(exc).splitlines()[0]})",
                "convert the checkpoint to .safetensors with a tool you trust, or use the .safetensors "
                "release of the model") from exc
        except (RuntimeError, OSError, EOFError) as exc:
            raise InvalidArgumentError(argument, f"'{path}' is not a readable torch checkpoint ({exc})",
                                       "re-download the file; check it is complete") from exc
        tensors = {k: v for k, v in _unwrap(obj, path, argument).items() if keep(k)}
        return LoadedWeights(tensors, [path])
    raise InvalidArgumentError(argument, f"'{path}' has suffix '{path.suffix}'",
                               f"pass a {'/'.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} file")


def _check_archive(path: Path, argument: str) -> None:
    """Refuse a zip whose entries claim far more bytes than the file holds, before torch inflates any of it."""
    if not zipfile.is_zipfile(path):
        return  # a legacy (non-zip) pickle: torch.load reads it, or fails, without inflating anything
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise InvalidArgumentError(argument, f"'{path}' is not a readable torch checkpoint ({exc})",
                                   "re-download the file; check it is complete") from exc
    size = path.stat().st_size
    declared = sum(info.file_size for info in entries)
    if declared > ZIP_MAX_EXPANSION * size + ZIP_SLACK_BYTES:
        largest = max(entries, key=lambda info: info.file_size)
        raise InvalidArgumentError(
            argument, f"'{path}' ({size} bytes) is a zip archive whose entries expand to {declared} bytes (entry "
            f"'{largest.filename}': {largest.file_size}); torch.save writes entries uncompressed, so this is a zip "
            "bomb or not a torch checkpoint", "use the model's original .safetensors or .ckpt release")


def read_config_json(path: Path) -> dict:
    """A source folder's config (or weights index) file, through the runtime's one JSON reader."""
    return read_json(path, fix="pass a complete diffusers folder, or restore the file")


def read_diffusers_weights(folder: Path, argument: str, *, stem: str = "diffusion_pytorch_model",
                           variant: str | None = None) -> LoadedWeights:
    """The weights of one diffusers/transformers sub-folder.

    Order of preference: `<stem>.safetensors`, its sharded index, `<stem>.fp16.safetensors`,
    then the `.bin` pickles. `variant="fp16"` asks for the fp16 file explicitly.
    """
    names = [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors",
             f"{stem}.fp16.safetensors.index.json", f"{stem}.bin", f"{stem}.fp16.bin"]
    if variant is not None:
        names = [n for n in names if f".{variant}." in n]
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = read_config_json(path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            shards = sorted({str(s) for s in weight_map.values()}) if isinstance(weight_map, dict) else []
            if not shards:
                raise BundleFormatError(path, "weight_map is empty", "restore the index file")
            outside = [s for s in shards if s in ("", ".", "..") or Path(s).name != s or "\\" in s]
            if outside:
                raise BundleFormatError(path, f"weight_map names shard files outside its folder: {outside}",
                                        "list only file names of shards beside the index")
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                merged.update(read_weight_file(folder / shard, argument).tensors)
            return LoadedWeights(merged, [path] + [folder / s for s in shards])
        return read_weight_file(path, argument)
    raise BundleNotFoundError(folder, f"{argument}: no weight file ({', '.join(names)})",
                              "pass a complete diffusers folder (save_pretrained writes one)")


def as_float32(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16/bf16 checkpoints are upcast once: export traces and gates in fp32."""
    return {k: (v.to(torch.float32) if v.is_floating_point() and v.dtype != torch.float32 else v)
            for k, v in tensors.items()}


def match_text_encoder_keys(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIP keys as `model` names them: transformers 5 dropped the `text_model.` level that
    SD1.5 folders and LDM checkpoints (saved with transformers 4) still carry."""
    prefixed = any(k.startswith("text_model.") for k in model.state_dict())
    out = {}
    for key, value in tensors.items():
        bare = key.removeprefix("text_model.")
        out["text_model." + bare if prefixed else bare] = value
    return out


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def dtype_problem(provided: torch.Tensor, expected: torch.Tensor) -> str | None:
    """' file dtype int64 vs model float32' when a float weight is given as integers, booleans or complex
    numbers (torch would refuse them with an untyped error, or cast them silently); None when it fits."""
    if expected.is_floating_point() and (not provided.is_floating_point() or provided.is_complex()):
        return f"file dtype {str(provided.dtype).removeprefix('torch.')} vs model " \
               f"{str(expected.dtype).removeprefix('torch.')}"
    return None


def compare_keys(expected: Mapping[str, tuple[int, ...]], provided: Mapping[str, torch.Tensor], *,
                 optional: Callable[[str], bool] = lambda key: False) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mismatched): `optional` keys may be absent (regenerated buffers)."""
    missing = [k for k in expected if k not in provided and not optional(k)]
    unexpected = [k for k in provided if k not in expected]
    mismatched = [f"{k}: file {list(provided[k].shape)} vs model {list(shape)}"
                  for k, shape in expected.items() if k in provided and tuple(provided[k].shape) != shape]
    return missing, unexpected, mismatched


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, argument: str, what: str,
                fix: str) -> torch.nn.Module:
    """Load every key or raise. A model built on `meta` gets the tensors assigned, not copied."""
    missing, unexpected, mismatched = compare_keys(expected_shapes(model), state_dict)
    model_tensors = model.state_dict()
    mismatched += [f"{k}: {problem}" for k, v in state_dict.items() if k in model_tensors
                   and (problem := dtype_problem(v, model_tensors[k]))]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(argument, what, missing=missing, unexpected=unexpected, mismatched=mismatched,
                                   fix=fix)
    assign = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(dict(state_dict), strict=True, assign=assign)
    # A non-persistent buffer is in no state dict; on `meta` it would stay uninitialised.
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise WeightsMismatchError(argument, what, missing=left, fix=fix)
    return model.eval()


def on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model without allocating or initialising its weights."""
    with torch.device("meta"):
        return factory()
