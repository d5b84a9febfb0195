"""The bundle: a self-describing folder, the only contract between export and runtime.

Layout (optimum's saved-pipeline layout, plus a manifest that makes it verifiable):

    bundle/
      bundle.json                 manifest: format version, model facts, graphs, sha256 of every file
      model_index.json            diffusers/optimum-style index of the components
      scheduler/scheduler_config.json
      tokenizer/vocab.json, merges.txt, tokenizer_config.json
      text_encoder/model.onnx, config.json    [openvino_model.xml/.bin]
      unet/model.onnx [model.onnx_data], config.json    [openvino_model.xml/.bin]
      vae_decoder/model.onnx, config.json    [openvino_model.xml/.bin]

The runtime reads everything it needs from here and never falls back to code defaults
for schedule or model parameters: a missing key is a `BundleFormatError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping

from .atomic_output import is_partial_name
from .errors import BundleFormatError, BundleIntegrityError, BundleNotFoundError, InvalidArgumentError
from .scheduler import LCMScheduler, SchedulerConfig

FORMAT_NAME = "lcm-edge-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
TOKENIZER_DIR = "tokenizer"
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
OPTIONAL_COMPONENTS = ("vae_encoder", "vae_decoder_tiny")  # vae_decoder_tiny: see lcm_edge.export.tiny_decoder
_HASH_CHUNK = 1 << 22
TENSOR_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
# Largest frame height or width a generation takes (pipeline.check_inputs), and the bound on every count in
# bundle.json's model facts: far above any real model, low enough that nothing sized by one can exhaust memory.
MAX_SIDE = 16384
MAX_MODEL_COUNT = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Symbolic dimensions are strings ("batch", "frames")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    onnx: str
    onnx_data: str | None
    openvino: str | None
    config: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str
    # The same graph with fused attention (com.microsoft::MultiHeadAttention) over the same weights file, for the
    # onnxruntime providers that run it (see backends.ort_backend.select_onnx_graph); `onnx` stays the plain
    # graph every runtime takes. None in bundles exported without it.
    onnx_fused: str | None = None
    # Graphs quantized from the fp32 ones (lcm_edge.export.quantize), by graph: {"onnx": {"precision": "int8",
    # "recipe": "hybrid"}, "openvino": {...}}; a graph not listed has `precision`. None in float bundles.
    quantization: Mapping[str, Mapping[str, str]] | None = None

    def graph_precision(self, graph: str) -> str:
        """Precision of the "onnx" or "openvino" graph, e.g. "fp32" or "int8 hybrid"."""
        q = (self.quantization or {}).get(graph)
        return f"{q['precision']} {q['recipe']}" if q else self.precision


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the model the runtime needs; all of them come from the exporter."""

    vae_scaling_factor: float
    vae_scale_factor: int
    latent_channels: int
    # Pixel height/width must be a multiple of this (VAE downscale x UNet downsamplers).
    size_multiple: int
    max_frames: int
    default_frames: int
    default_height: int
    default_width: int
    default_fps: int
    text_max_length: int
    text_hidden_size: int
    # Schedules tuned for this model by step count ({"4": (999, 699, 399, 199)}): a generation of that many steps
    # without explicit timesteps samples at these instead of the LCM spacing. Optional: most bundles have none.
    default_timesteps: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Bundle:
    root: Path
    format_version: int
    model: ModelInfo
    components: Mapping[str, ComponentInfo]
    files: Mapping[str, FileEntry]
    scheduler_config: SchedulerConfig
    provenance: Mapping[str, Any]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def path(self, relative: str) -> Path:
        return self.root / relative

    def has_openvino(self) -> bool:
        return all(c.openvino is not None for c in self.components.values())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _strict(cls, data: Any, where: str):
    """Build a frozen dataclass from a dict, rejecting missing and unknown keys."""
    if not isinstance(data, dict):
        raise BundleFormatError(where, f"expected an object for {cls.__name__}, got {type(data).__name__}",
                                "re-export the bundle with `lcm-edge export`")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - data.keys())
    unknown = sorted(data.keys() - names)
    if missing or unknown:
        raise BundleFormatError(where, f"{cls.__name__} has missing keys {missing} and unknown keys {unknown}",
                                "re-export the bundle with this version of lcm-edge")
    for f in dataclasses.fields(cls):
        _check_scalar(f"{cls.__name__}.{f.name}", str(f.type), data.get(f.name, f.default), where)
    return cls(**data)


_SCALARS = {"str": str, "int": int, "float": (int, float), "bool": bool, "None": type(None)}


def _check_scalar(name: str, annotation: str, value: Any, where: str) -> None:
    """A field annotated with scalars only (`int`, `str | None`, ...) holds one of them; a float is finite.
    Container fields are checked by their own parsers."""
    kinds = [k.strip() for k in annotation.split("|")]
    if not all(k in _SCALARS for k in kinds):
        return
    fits = any(isinstance(value, _SCALARS[k]) and (k == "bool" or not isinstance(value, bool)) for k in kinds)
    if not fits or (isinstance(value, float) and not math.isfinite(value)):
        raise BundleFormatError(where, f"{name} must be {annotation}, got {_short(value)}", "re-export the bundle")


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _check_quantization(value: Any, where: str) -> None:
    """components.*.quantization: None, or {"onnx"|"openvino": {"precision": str, "recipe": str}}."""
    if value is None:
        return
    if not isinstance(value, dict) or not all(
            graph in ("onnx", "openvino") and isinstance(q, dict) and set(q) == {"precision", "recipe"}
            and all(isinstance(v, str) for v in q.values()) for graph, q in value.items()):
        raise BundleFormatError(where, f"quantization must map 'onnx'/'openvino' to {{precision, recipe}}, got "
                                f"{_short(value)}", "re-quantize the bundle with `lcm-edge quantize`")


def _tensor_specs(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list):
        raise BundleFormatError(where, "expected a list of tensors", "re-export the bundle")
    specs = []
    for item in items:
        spec = _strict(TensorSpec, item, where)
        shape = spec.shape
        if spec.dtype not in TENSOR_DTYPES or not isinstance(shape, list) or len(shape) > 8 or not all(
                (isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31) or (isinstance(d, str) and d)
                for d in shape):
            raise BundleFormatError(where, f"tensor {spec.name!r}: dtype {_short(spec.dtype)} or shape "
                                    f"{_short(shape)} is not one a graph has", "re-export the bundle")
        specs.append(TensorSpec(spec.name, spec.dtype, tuple(shape)))
    return tuple(specs)


def read_json(path: Path, *, fix: str = "re-export the bundle or restore the file") -> Any:
    """A JSON file, or BundleNotFoundError / BundleFormatError naming it with `fix` (the exporter reads its source
    configs through this too, with its own fix)."""
    if not path.is_file():
        raise BundleNotFoundError(path, "file is missing", fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleFormatError(path, f"not valid JSON ({exc})", fix) from exc
    except RecursionError as exc:  # nesting deeper than Python's parser recurses
        raise BundleFormatError(path, "nests JSON deeper than any config or manifest does", fix) from exc


def bundle_file(root: Path, relative: Any) -> Path:
    """The path of a file the manifest lists, which must lie inside the bundle folder: a relative, normalised
    path (no `..`, no absolute or drive path) that no symlink leads out of. Raises BundleFormatError."""
    where = root / MANIFEST_NAME
    if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative \
            or PurePosixPath(relative).as_posix() != relative or PurePosixPath(relative).is_absolute() \
            or PureWindowsPath(relative).drive or any(part in ("..", ".") for part in relative.split("/")):
        raise BundleFormatError(where, f"file entry {_short(relative)} is not a plain path inside the bundle",
                                "re-export the bundle; a manifest never points outside its folder")
    path = root / relative
    try:
        inside = path.resolve().is_relative_to(root.resolve())
        path.is_file()
    except (OSError, RuntimeError) as exc:  # a name too long for the filesystem, a symlink loop
        raise BundleFormatError(where, f"file entry {_short(relative)} cannot be resolved ({exc})",
                                "re-export the bundle") from exc
    if not inside:
        raise BundleFormatError(where, f"file entry '{relative}' leads out of the bundle folder (a symlink)",
                                "copy the real files into the bundle instead of linking to them")
    return path


def verify_files(root: Path, files: Mapping[str, FileEntry], *, checksums: bool = True) -> None:
    """Every listed file exists with its recorded size (and sha256 when `checksums`)."""
    for relative, entry in sorted(files.items()):
        path = bundle_file(root, relative)
        if not path.is_file():
            raise BundleNotFoundError(path, "file listed in bundle.json is missing",
                                      "re-export the bundle or copy the whole folder again")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleIntegrityError(path, f"size {size} bytes, manifest says {entry.size} (truncated or replaced)",
                                       "re-export the bundle or copy the whole folder again")
        if checksums:
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise BundleIntegrityError(path, f"sha256 {actual[:16]}... differs from the manifest's "
                                           f"{entry.sha256[:16]}... (file altered or corrupt)",
                                           "re-export the bundle or copy the whole folder again")


def _check_model(model: ModelInfo, where: str) -> ModelInfo:
    """The model facts are ones a generation with the bundle's defaults can use."""
    counts = {f.name: getattr(model, f.name) for f in dataclasses.fields(ModelInfo) if f.type == "int"}
    bad = [f"{name}={value}" for name, value in counts.items() if not 1 <= value <= MAX_MODEL_COUNT]
    if model.vae_scaling_factor <= 0:
        bad.append(f"vae_scaling_factor={model.vae_scaling_factor}")
    if not bad:
        if model.default_frames > model.max_frames:
            bad.append(f"default_frames={model.default_frames} > max_frames={model.max_frames}")
        if model.size_multiple % model.vae_scale_factor:
            bad.append(f"size_multiple={model.size_multiple} is no multiple of vae_scale_factor")
        bad += [f"{name}={value} is no multiple of size_multiple={model.size_multiple} up to {MAX_SIDE}"
                for name, value in (("default_height", model.default_height), ("default_width", model.default_width))
                if value % model.size_multiple or value > MAX_SIDE]
    if bad:
        raise BundleFormatError(where, f"values out of range: {', '.join(bad)}", "re-export the bundle")
    return model


def load_bundle(path: str | os.PathLike, *, verify_checksums: bool = True) -> Bundle:
    """Read and verify a bundle. Raises a `BundleError` subclass naming the bad file."""
    root = Path(path)
    if is_partial_name(root.resolve().name):
        # Even complete-looking (an export killed on its final rename), it was never published.
        raise BundleFormatError(root, "is the temporary folder of an export that did not finish",
                                "load the export's target folder; the next export to that target removes this one")
    return load_unpublished_bundle(root, verify_checksums=verify_checksums)


def load_unpublished_bundle(path: str | os.PathLike, *, verify_checksums: bool = True) -> Bundle:
    """`load_bundle` for the exporter's own temporary folder: its last check before publishing it."""
    root = Path(path)
    if not root.is_dir():
        raise BundleNotFoundError(root, "bundle folder does not exist",
                                  "pass the folder written by `lcm-edge export` (it contains bundle.json)")
    manifest_path = root / MANIFEST_NAME
    manifest = read_json(manifest_path)
    where = str(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleFormatError(where, f"not an lcm-edge bundle manifest (format != '{FORMAT_NAME}')",
                                "pass a folder written by `lcm-edge export`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleFormatError(where, f"unknown format_version {version!r}; this lcm-edge reads version "
                                f"{FORMAT_VERSION}", "upgrade lcm-edge, or re-export the bundle with this version")
    expected = {"format", "format_version", "model", "components", "files", "provenance"}
    if set(manifest) != expected:
        raise BundleFormatError(where, f"manifest keys {sorted(manifest)} differ from {sorted(expected)}",
                                "re-export the bundle")

    files_raw = manifest["files"]
    if not isinstance(files_raw, dict):
        raise BundleFormatError(where, "'files' must be an object", "re-export the bundle")
    files = {rel: _strict(FileEntry, entry, f"{where}: files[{rel}]") for rel, entry in files_raw.items()}
    # Integrity first: every later read trusts the files it opens.
    verify_files(root, files, checksums=verify_checksums)

    model = _check_model(_strict(ModelInfo, manifest["model"], f"{where}: model"), f"{where}: model")
    components_raw = manifest["components"]
    if not isinstance(components_raw, dict):
        raise BundleFormatError(where, "'components' must be an object", "re-export the bundle")
    missing = [c for c in REQUIRED_COMPONENTS if c not in components_raw]
    unknown = [c for c in components_raw if c not in REQUIRED_COMPONENTS + OPTIONAL_COMPONENTS]
    if missing or unknown:
        raise BundleFormatError(where, f"components missing {missing}, unknown {unknown}", "re-export the bundle")
    components = {}
    for name, raw in components_raw.items():
        cwhere = f"{where}: components.{name}"
        if not isinstance(raw, dict):
            raise BundleFormatError(cwhere, "expected an object", "re-export the bundle")
        raw = dict(raw, inputs=_tensor_specs(raw.get("inputs"), cwhere),
                   outputs=_tensor_specs(raw.get("outputs"), cwhere))
        info = _strict(ComponentInfo, raw, cwhere)
        _check_quantization(info.quantization, cwhere)
        for rel in (info.onnx, info.onnx_data, info.openvino, info.config, info.onnx_fused):
            if rel is not None and rel not in files:
                raise BundleFormatError(cwhere, f"'{rel}' is not listed in the manifest's files",
                                        "re-export the bundle")
        components[name] = info

    for rel in (SCHEDULER_CONFIG, f"{TOKENIZER_DIR}/vocab.json", f"{TOKENIZER_DIR}/merges.txt",
                f"{TOKENIZER_DIR}/tokenizer_config.json"):
        if rel not in files:
            raise BundleFormatError(where, f"'{rel}' is not listed in the manifest's files", "re-export the bundle")
    scheduler_path = root / SCHEDULER_CONFIG
    scheduler = SchedulerConfig.from_dict(read_json(scheduler_path), source=str(scheduler_path))
    try:
        model = dataclasses.replace(model, default_timesteps=check_default_timesteps(model.default_timesteps,
                                                                                      scheduler))
    except InvalidArgumentError as exc:
        raise BundleFormatError(where, f"model.{exc.argument} {exc.problem}", "re-export the bundle") from exc
    return Bundle(root=root, format_version=version, model=model, components=components, files=files,
                  scheduler_config=scheduler, provenance=manifest["provenance"])


def check_default_timesteps(schedules: Any, scheduler: SchedulerConfig) -> dict[str, tuple[int, ...]]:
    """Schedules tuned for a model, {steps: [t_1, ..., t_steps]}, as bundle.json keeps them ({"4": (...)}):
    each step count in 1..original_inference_steps, each schedule one the scheduler takes as custom timesteps.
    Raises InvalidArgumentError naming `default_timesteps` (the exporter's argument)."""
    ots = scheduler.original_inference_steps
    if not isinstance(schedules, Mapping):
        raise InvalidArgumentError("default_timesteps", f"expected a mapping, got {type(schedules).__name__}",
                                   "pass e.g. {4: [999, 699, 399, 199]}")
    checked = {}
    for key, timesteps in schedules.items():
        steps = int(key) if (isinstance(key, int) and not isinstance(key, bool)) or \
            (isinstance(key, str) and key.isdigit()) else 0
        if not 1 <= steps <= ots:
            raise InvalidArgumentError("default_timesteps", f"key {key!r} is not a step count in 1..{ots}",
                                       "key each schedule by its number of steps, within original_inference_steps")
        try:
            schedule = LCMScheduler(scheduler).set_timesteps(timesteps=timesteps)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError("default_timesteps", f"[{steps}]: {exc.problem}", exc.fix) from exc
        if len(schedule) != steps:
            raise InvalidArgumentError("default_timesteps", f"[{steps}] lists {len(schedule)} timesteps",
                                       f"list exactly {steps}, largest first")
        checked[str(steps)] = tuple(int(t) for t in schedule)
    return checked


def write_manifest(root: Path, *, model: ModelInfo, components: Mapping[str, ComponentInfo],
                   provenance: Mapping[str, Any], known: Mapping[str, FileEntry] | None = None) -> Path:
    """Hash every file under `root` and write bundle.json (used by the exporter).

    `known`: entries of files just verified against their sha256 (a bundle being extended), reused rather
    than hashed again when the size still matches. bundle.json is replaced in one rename, so a reader sees
    the old manifest or the new one, never a partial file."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST_NAME)):
        rel = path.relative_to(root).as_posix()
        size = path.stat().st_size
        entry = (known or {}).get(rel)
        files[rel] = {"sha256": entry.sha256 if entry is not None and entry.size == size else sha256_file(path),
                      "size": size}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model),
        "components": {
            name: {**dataclasses.asdict(info),
                   "inputs": [t.to_dict() for t in info.inputs],
                   "outputs": [t.to_dict() for t in info.outputs]}
            for name, info in components.items()
        },
        "files": files,
        "provenance": dict(provenance),
    }
    out = root / MANIFEST_NAME
    tmp = root / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
