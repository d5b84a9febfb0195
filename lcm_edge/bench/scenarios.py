"""Benchmark scenarios as data: a matrix on the command line, or a TOML/JSON file.

A scenario is one bundle on one runtime (backend + device + options) at one clip size, step count
and guidance. Runtimes are written `backend:device[,option=value...]`, e.g. `onnxruntime:cpu`,
`openvino:CPU,inference_precision=bf16`, `pytorch:cpu` (diffusers eager, the reference) or
`pytorch-compile:cpu` (the same with torch.compile). Sizes are `HEIGHTxWIDTHxFRAMES`, e.g. `512x512x16`.

Everything here is checked before any model is loaded: a bad scenario is an InvalidArgumentError
naming the argument and the fix.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import InvalidArgumentError

# Runtime families and the devices each takes. lcm_edge backends run bundles; the pytorch ones run
# diffusers' AnimateDiffPipeline on the bundle's source weights (the [export] extra).
RUNTIME_DEVICES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("cpu", "cuda", "tensorrt", "directml", "openvino"),
    "openvino": ("CPU", "GPU", "NPU", "AUTO"),
    "pytorch": ("cpu", "cuda"),
    "pytorch-compile": ("cpu", "cuda"),
}
LCM_EDGE_BACKENDS = ("onnxruntime", "openvino")
TORCH_RUNTIMES = ("pytorch", "pytorch-compile")
DEFAULT_PROMPT = "a red circle moving right"
# As onnxruntime's own stable-diffusion benchmark: 2 warm-ups, then timed runs.
DEFAULT_WARMUP = 2
DEFAULT_RUNS = 3
SETTING_KEYS = ("warmup", "runs", "seed", "prompt", "decode_frames", "timeout_s", "torch_source")


@dataclass(frozen=True)
class Runtime:
    backend: str  # a RUNTIME_DEVICES key
    device: str
    options: tuple[tuple[str, Any], ...] = ()  # sorted (name, value) pairs, handed to the backend

    @property
    def is_torch(self) -> bool:
        return self.backend in TORCH_RUNTIMES

    @property
    def label(self) -> str:
        opts = "".join(f",{k}={_format_value(v)}" for k, v in self.options)
        return f"{self.backend}:{self.device}{opts}"


@dataclass(frozen=True)
class Scenario:
    bundle: str  # folder path
    runtime: Runtime
    frames: int
    height: int
    width: int
    steps: int = 4
    guidance: float = 1.0
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    warmup: int = DEFAULT_WARMUP
    runs: int = DEFAULT_RUNS
    decode_frames: int | None = None  # decode only the first N frames (labelled per-frame VAE figures)
    timeout_s: float | None = None
    torch_source: Mapping[str, Any] | None = field(default=None, compare=False)  # pytorch rows: load_components kwargs

    @property
    def size(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    @property
    def group(self) -> tuple:
        """Rows with the same group see the same latents and noise: their frames are comparable."""
        return (self.size, self.steps, self.guidance, self.seed, self.prompt, self.decoded_frames)

    @property
    def decoded_frames(self) -> int:
        return self.frames if self.decode_frames is None else min(self.decode_frames, self.frames)

    @property
    def id(self) -> str:
        decode = f" decode {self.decode_frames}" if self.decode_frames is not None else ""
        return (f"{Path(self.bundle).name} | {self.runtime.label} | {self.size} | {self.steps} steps | "
                f"guidance {self.guidance:g}{decode}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["runtime"] = {"backend": self.runtime.backend, "device": self.runtime.device,
                           "options": dict(self.runtime.options), "label": self.runtime.label}
        data["torch_source"] = dict(self.torch_source) if self.torch_source else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scenario":
        rt = data["runtime"]
        runtime = Runtime(rt["backend"], rt["device"], tuple(sorted(rt["options"].items())))
        return cls(**{**data, "runtime": runtime})


def _format_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_runtime(text: str, argument: str = "runtime") -> Runtime:
    """`backend:device[,key=value...]` -> Runtime; unknown backends and devices are errors."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(argument, f"{text!r} is not a runtime", "write backend:device, e.g. onnxruntime:cpu")
    head, *option_texts = text.strip().split(",")
    backend, _, device = head.partition(":")
    if backend not in RUNTIME_DEVICES:
        raise InvalidArgumentError(argument, f"unknown runtime '{backend}' in {text!r}",
                                   f"use one of {sorted(RUNTIME_DEVICES)}, e.g. onnxruntime:cpu or openvino:CPU")
    devices = RUNTIME_DEVICES[backend]
    device = device or devices[0]
    match = [d for d in devices if d.lower() == device.lower()]
    if not match:
        raise InvalidArgumentError(argument, f"unknown device '{device}' for {backend} in {text!r}",
                                   f"use one of {list(devices)}")
    options = {}
    for option in option_texts:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise InvalidArgumentError(argument, f"option {option!r} in {text!r} is not key=value",
                                       "write e.g. onnxruntime:cpu,memory_arena=false")
        options[key.strip()] = _parse_value(value.strip())
    return Runtime(backend, match[0], tuple(sorted(options.items())))


def parse_size(text: str, argument: str = "size") -> tuple[int, int, int]:
    """`HEIGHTxWIDTHxFRAMES` -> (height, width, frames)."""
    parts = str(text).lower().split("x")
    try:
        height, width, frames = (int(p) for p in parts)
    except ValueError:
        raise InvalidArgumentError(argument, f"cannot read {text!r}",
                                   "write HEIGHTxWIDTHxFRAMES, e.g. 256x256x8 or 512x512x16") from None
    if min(height, width, frames) < 1:
        raise InvalidArgumentError(argument, f"{text!r} has a size below 1", "use positive sizes, e.g. 256x256x8")
    return height, width, frames


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_setting(name: str, value: Any) -> Any:
    if name in ("warmup", "runs", "seed", "decode_frames"):
        low = 1 if name in ("runs", "decode_frames") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(name, f"{value!r} is not an integer >= {low}", f"pass e.g. {max(low, 2)}")
    elif name == "timeout_s":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InvalidArgumentError(name, f"{value!r} is not a positive number of seconds", "pass e.g. 3600")
    elif name == "prompt":
        if not isinstance(value, str):
            raise InvalidArgumentError(name, f"{value!r} is not text", "pass a prompt string")
    elif name == "torch_source":
        if not isinstance(value, Mapping) or "base" not in value:
            raise InvalidArgumentError(name, f"{value!r} has no 'base'", "give base=PATH (and base_folder, "
                                       "motion_module, loras as for `lcm-edge export`)")
    return value


def expand_matrix(*, bundles: Sequence[str], runtimes: Sequence[str], sizes: Sequence[str | None],
                  steps: Sequence[int] = (4,), guidance: Sequence[float] = (1.0,),
                  settings: Mapping[str, Any] | None = None) -> list[Scenario]:
    """The cartesian product of the matrix axes; `None` as a size means the bundle's default clip."""
    settings = {k: _check_setting(k, v) for k, v in dict(settings or {}).items() if v is not None}
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise InvalidArgumentError("settings", f"unknown {unknown}", f"use some of {list(SETTING_KEYS)}")
    parsed = [parse_runtime(r) for r in runtimes]
    scenarios = []
    for bundle, runtime, size, n_steps, g in itertools.product(bundles, parsed, sizes, steps, guidance):
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise InvalidArgumentError("steps", f"{n_steps!r} is not a positive integer", "pass e.g. 4")
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 1.0:
            raise InvalidArgumentError("guidance", f"{g!r} is below 1", "use 1.0 (no guidance) or e.g. 1.5")
        height, width, frames = parse_size(size) if size is not None else (0, 0, 0)
        scenarios.append(Scenario(bundle=str(bundle), runtime=runtime, frames=frames, height=height, width=width,
                                  steps=int(n_steps), guidance=float(g), **settings))
    if not scenarios:
        raise InvalidArgumentError("runtime", "the matrix is empty", "give at least one bundle, runtime and size")
    return scenarios


def load_scenario_file(path: str | Path) -> tuple[list[Scenario], dict]:
    """A TOML or JSON file: `[settings]` (warmup, runs, seed, ...), `[matrix]` (lists of bundle, runtime,
    size, steps, guidance -> their product) and/or `[[scenario]]` tables (one row each, the same keys
    as single values). Returns the scenarios and the file's settings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgumentError("scenarios", f"cannot read '{path}' ({exc.strerror})", "check the path") from exc
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError("scenarios", f"'{path}' is not valid {path.suffix.lstrip('.').upper() or 'JSON'}"
                                   f" ({exc})", "fix the file; see `lcm-edge bench --help` for its keys") from exc
    if not isinstance(data, dict):
        raise InvalidArgumentError("scenarios", f"'{path}' holds no table", "write [matrix] or [[scenario]] tables")
    unknown = sorted(set(data) - {"settings", "matrix", "scenario"})
    if unknown:
        raise InvalidArgumentError("scenarios", f"'{path}' has unknown sections {unknown}",
                                   "use [settings], [matrix] and [[scenario]]")
    settings = dict(data.get("settings", {}))
    scenarios: list[Scenario] = []
    rows = [data["matrix"]] if "matrix" in data else []
    rows += list(data.get("scenario", []))
    for row in rows:
        if not isinstance(row, dict):
            raise InvalidArgumentError("scenarios", f"'{path}': {row!r} is not a table", "write key = value tables")
        row = dict(row)
        axes = {key: _as_list(row.pop(key)) for key in ("bundle", "runtime", "size", "steps", "guidance") if key in row}
        for key in ("bundle", "runtime"):
            if key not in axes:
                raise InvalidArgumentError("scenarios", f"'{path}': a table has no '{key}'", f"add {key} = ...")
        bundles = [str((path.parent / b).resolve()) if not Path(b).is_absolute() and b != "default" else b
                   for b in axes["bundle"]]
        scenarios += expand_matrix(bundles=bundles, runtimes=axes["runtime"], sizes=axes.get("size", [None]),
                                   steps=axes.get("steps", [4]), guidance=axes.get("guidance", [1.0]),
                                   settings={**settings, **row})
    if not scenarios:
        raise InvalidArgumentError("scenarios", f"'{path}' defines no scenario", "add a [matrix] or [[scenario]]")
    return scenarios, settings


def resolve_against_bundles(scenarios: Iterable[Scenario]) -> list[Scenario]:
    """Fill default sizes from each bundle and check every scenario against it (frames, size multiple,
    steps), reading only the manifests."""
    from ..bundle import load_bundle
    from ..default import default_bundle_path
    from ..pipeline import check_inputs
    from .child import split_options

    manifests = {}
    resolved = []
    for s in scenarios:
        bundle_path = str(default_bundle_path()) if s.bundle == "default" else s.bundle
        if bundle_path not in manifests:
            manifests[bundle_path] = load_bundle(bundle_path, verify_checksums=False)
        bundle = manifests[bundle_path]
        m = bundle.model
        s = replace(s, bundle=bundle_path, frames=s.frames or m.default_frames, height=s.height or m.default_height,
                    width=s.width or m.default_width)
        _, call_options = split_options(dict(s.runtime.options)) if not s.runtime.is_torch else ({}, {})
        try:
            check_inputs(bundle, s.prompt, num_frames=s.frames, height=s.height, width=s.width,
                         num_inference_steps=s.steps, guidance_scale=s.guidance, seed=s.seed, **call_options)
        except InvalidArgumentError as exc:
            argument = {"num_frames": "size", "height": "size", "width": "size", "num_inference_steps": "steps",
                        "guidance_scale": "guidance"}.get(exc.argument, exc.argument)
            argument = "runtime" if exc.argument in call_options else argument
            raise InvalidArgumentError(argument, f"scenario '{s.id}' does not fit bundle '{bundle_path}': "
                                       f"{exc.problem}", exc.fix) from exc
        resolved.append(s)
    return resolved
