"""Compute precision: the fidelity gate for bf16/f16 against f32, its records, and precision="auto".

A reduced precision is used only after it has passed the gate on this machine for this bundle:
`check_precision` generates the same clips (same seeds, so the same latents and noise) at f32 and at
the candidate precision on one backend and device, and compares the frames. The result is written to
the user cache (never into the bundle, whose files are checksummed), where `auto_precision` reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cpu import cpu_flags
from .errors import InvalidArgumentError, ParityError
from .fidelity import frame_psnr_db

# Frames at the candidate precision against f32, same latents and noise: the worst frame's PSNR (uint8, peak
# 255) must reach this. 40 dB is an RMS error of 2.5 grey levels. Measured on the default bundle (OpenVINO CPU,
# AVX512_BF16): bf16 worst frame 45.6 dB over 4 clips; the full-size VAE decoder alone gave 46 dB.
BF16_MIN_FRAME_PSNR_DB = 40.0
F16_MIN_FRAME_PSNR_DB = 40.0
MIN_FRAME_PSNR_DB = {"bf16": BF16_MIN_FRAME_PSNR_DB, "f16": F16_MIN_FRAME_PSNR_DB}
GATE_SEEDS = (30000, 30001)  # never used to train or tune the default model
# Fastest first, per device family: CPUs with both run bf16 (wider exponent, no overflow), GPUs f16.
PREFERENCE = {"GPU": ("f16", "bf16"), "NPU": ("f16", "bf16")}
CPU_PREFERENCE = ("bf16", "f16")


def user_cache_dir() -> Path:
    """LCM_EDGE_CACHE_DIR, else $XDG_CACHE_HOME/lcm_edge, else ~/.cache/lcm_edge."""
    if os.environ.get("LCM_EDGE_CACHE_DIR"):
        return Path(os.environ["LCM_EDGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lcm_edge"


def record_path(bundle) -> Path:
    """Where gate results for this bundle live: keyed by its manifest (which holds every file's sha256)."""
    key = hashlib.sha256((bundle.root / "bundle.json").read_bytes()).hexdigest()[:20]
    return user_cache_dir() / "precision" / f"{key}.json"


def device_name(runtime) -> str:
    """The device a gate result holds for: OpenVINO's FULL_DEVICE_NAME, else this machine's processor."""
    if runtime.name == "openvino":
        return str(runtime.core.get_property(runtime.device, "FULL_DEVICE_NAME"))
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class PrecisionCheck:
    backend: str
    device: str
    device_name: str
    precision: str
    threshold_db: float
    min_frame_psnr_db: float
    mean_frame_psnr_db: float
    max_abs_grey_levels: int
    latents_max_abs: float
    f32_s_per_clip: float
    precision_s_per_clip: float
    seeds: tuple[int, ...]
    size: tuple[int, int, int]  # frames, height, width
    passed: bool
    cpu_flags: tuple[str, ...]
    checked_utc: str

    @property
    def key(self) -> str:
        return f"{self.backend}:{self.device}:{self.precision}"

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"{self.precision} vs f32 on {self.backend} {self.device} ({self.device_name}), "
                f"{self.size[0]}x{self.size[1]}x{self.size[2]}, seeds {list(self.seeds)}: worst frame PSNR "
                f"{self.min_frame_psnr_db:.2f} dB (mean {self.mean_frame_psnr_db:.2f}), max abs "
                f"{self.max_abs_grey_levels} grey levels, latents max abs {self.latents_max_abs:.3g}; "
                f"{self.f32_s_per_clip:.3f} s/clip f32, {self.precision_s_per_clip:.3f} s/clip {self.precision}; "
                f"gate {self.threshold_db:.1f} dB: {verdict}")


def read_records(bundle) -> dict:
    path = record_path(bundle)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("checks", {})
    except (OSError, ValueError, AttributeError):
        return {}  # a damaged cache entry means "not checked": auto then stays at f32


def write_record(bundle, check: PrecisionCheck) -> Path:
    path = record_path(bundle)
    path.parent.mkdir(parents=True, exist_ok=True)
    checks = read_records(bundle)
    checks[check.key] = asdict(check)
    payload = json.dumps({"bundle": str(bundle.root), "checks": checks}, indent=1, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(payload)
    os.replace(tmp, path)
    return path


def check_precision(bundle_path, precision: str = "bf16", *, backend: str = "openvino", device: str | None = None,
                    seeds: tuple[int, ...] = GATE_SEEDS, prompt: str | None = None, num_frames: int | None = None,
                    height: int | None = None, width: int | None = None, num_inference_steps: int = 4,
                    record: bool = True, **backend_options) -> PrecisionCheck:
    """The fidelity gate: clips at `precision` against f32 with the same seeds; the worst frame's PSNR must reach
    MIN_FRAME_PSNR_DB[precision]. Records the result (pass or fail) for precision="auto", then raises ParityError
    if it failed. A precision the device lacks is an InvalidArgumentError before anything compiles."""
    from .backends import create_backend
    from .bundle import load_bundle
    from .default import DEFAULT_PROMPT
    from .pipeline import AnimateLCMPipeline

    if precision not in MIN_FRAME_PSNR_DB:
        raise InvalidArgumentError("precision", f"{precision!r} has no gate", f"use one of {list(MIN_FRAME_PSNR_DB)}")
    if not seeds:
        raise InvalidArgumentError("seeds", "is empty", "pass at least one seed, e.g. (30000, 30001)")
    bundle = load_bundle(bundle_path)
    candidate_backend = create_backend(backend, device, precision=precision, **backend_options)  # checks first
    reference = AnimateLCMPipeline(bundle, create_backend(backend, device, precision="f32", **backend_options))
    candidate = AnimateLCMPipeline(bundle, candidate_backend)
    kwargs = dict(num_frames=num_frames, height=height, width=width, num_inference_steps=num_inference_steps)
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    psnrs, max_abs, latents_abs, seconds = [], 0, 0.0, {"f32": 0.0, precision: 0.0}
    for seed in seeds:
        clips = {}
        for name, pipe in (("f32", reference), (precision, candidate)):
            clips[name] = pipe(prompt, seed=seed, **kwargs)
            seconds[name] += clips[name].timings.total_s
        ref, got = clips["f32"], clips[precision]
        psnrs.extend(frame_psnr_db(ref.frames, got.frames).tolist())
        max_abs = max(max_abs, int(np.abs(ref.frames.astype(np.int16) - got.frames.astype(np.int16)).max()))
        latents_abs = max(latents_abs, float(np.abs(ref.latents - got.latents).max()))
    finite = [p for p in psnrs if np.isfinite(p)]
    threshold = MIN_FRAME_PSNR_DB[precision]
    check = PrecisionCheck(
        backend=backend, device=candidate_backend.device if hasattr(candidate_backend, "device") else str(device),
        device_name=device_name(candidate_backend), precision=precision, threshold_db=threshold,
        min_frame_psnr_db=min(psnrs), mean_frame_psnr_db=float(np.mean(finite)) if finite else float("inf"),
        max_abs_grey_levels=max_abs, latents_max_abs=latents_abs, f32_s_per_clip=seconds["f32"] / len(seeds),
        precision_s_per_clip=seconds[precision] / len(seeds), seeds=tuple(seeds),
        size=tuple(int(v) for v in ref.frames.shape[:3]), passed=bool(min(psnrs) >= threshold),
        cpu_flags=tuple(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                               "amx_tile", "avx512_fp16", "amx_fp16"})),
        checked_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if record:
        write_record(bundle, check)
    if not check.passed:
        raise ParityError(f"{precision}-vs-f32 frames", [check.summary()])
    return check


def auto_precision(bundle, runtime) -> tuple[str, str]:
    """(precision, note): the fastest precision `runtime`'s device computes in whose gate passed for this bundle on
    this device, else f32; the note says which and why."""
    supported = runtime.supported_precisions()
    family = getattr(runtime, "device", "CPU").split(".")[0]
    candidates = [p for p in PREFERENCE.get(family, CPU_PREFERENCE) if p in supported]
    if not candidates:
        return "f32", f"auto: f32, the only precision {runtime.name} computes fp32 graphs in here"
    records, name = read_records(bundle), device_name(runtime)
    failed = []
    for precision in candidates:
        found = records.get(f"{runtime.name}:{runtime.device}:{precision}")
        if not found or found.get("device_name") != name:
            continue
        if found.get("passed") and found.get("threshold_db") == MIN_FRAME_PSNR_DB[precision]:
            return precision, (f"auto: {precision}, its gate passed here at {found['min_frame_psnr_db']:.1f} dB "
                               f">= {found['threshold_db']:.1f} dB")
        failed.append(f"{precision} failed its gate here ({found['min_frame_psnr_db']:.1f} dB < "
                      f"{MIN_FRAME_PSNR_DB[precision]:.1f} dB)")
    if failed:
        return "f32", f"auto: f32; {'; '.join(failed)}"
    return "f32", (f"auto: f32; {'/'.join(candidates)} not yet gated for this bundle on this device "
                   "(lcm_edge.precision.check_precision records it)")
