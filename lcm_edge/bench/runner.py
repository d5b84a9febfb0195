"""`lcm-edge bench`: run a scenario matrix, each scenario in its own process, and report it.

Recipe: 1. check every scenario, the output folder and the extras before any model loads; 2. describe
the machine and measure its fp32 peak; 3. derive each bundle's FLOP formulas (flops.py); 4. add a
fidelity reference row (fp32 onnxruntime, same latents and noise) to every group that lacks one;
5. run each scenario in a child process under a memory and time guard (a crash, an out-of-memory
kill or a timeout is recorded and the matrix goes on); 6. derive medians, p90s, GFLOP/s, fidelity
and speed-ups; 7. write results.json, results.csv, results.md and plots.
"""

from __future__ import annotations

import collections
import datetime as dt
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InvalidArgumentError, MissingExtraError
from ..fidelity import psnr_db
from .machine import describe_machine, load_average, total_ram_gib
from .scenarios import LCM_EDGE_BACKENDS, Runtime, Scenario, resolve_against_bundles

# A child above this share of the machine's RAM is killed before the machine starts to swap.
DEFAULT_MEMORY_FRACTION = 0.9
MEMORY_POLL_S = 0.25
REFERENCE_RUNTIME = Runtime("onnxruntime", "cpu")


@dataclass
class BenchOptions:
    out: Path
    reference: str = "auto"  # "auto": add an fp32 onnxruntime:cpu row per group; "none"
    reference_bundle: str | None = None  # the fp32 bundle an int8/fp16 bundle's rows are compared with
    memory_limit_gib: float | None = None
    plots: bool = True
    peak_probe: bool = True
    flops: bool = True
    progress: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InvalidArgumentError("out", f"cannot write to '{out}' ({exc.strerror})",
                                   "pass a folder you can write to") from exc


def unavailable_reason(runtime: Runtime) -> str | None:
    """Why this machine cannot run `runtime` (the row is then listed as skipped), or None."""
    if runtime.backend == "onnxruntime":
        import onnxruntime as ort

        from ..backends.ort_backend import PROVIDERS

        provider = PROVIDERS[runtime.device]
        if provider not in ort.get_available_providers():
            return f"{provider} is not in this onnxruntime build ({ort.get_available_providers()})"
        if runtime.device in ("cuda", "tensorrt") and not _has_nvidia_gpu():
            return "no NVIDIA GPU on this machine"
        return None
    if runtime.backend == "openvino":
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed (pip install 'lcm-edge[openvino]')"
        import openvino as ov

        devices = ov.Core().available_devices
        if runtime.device != "AUTO" and not any(d.split(".")[0] == runtime.device for d in devices):
            return f"OpenVINO device {runtime.device} is not on this machine (available: {devices})"
        return None
    if runtime.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
    return None


def _has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def _check_backend_options(runtime: Runtime) -> None:
    """Options a backend does not take are errors now, not in a child after minutes of loading."""
    if runtime.is_torch:
        unknown = sorted(set(dict(runtime.options)) - {"threads"})
        if unknown:
            raise InvalidArgumentError("runtime", f"{runtime.label}: options {unknown} are not known to PyTorch rows",
                                       "use threads=N only")
        return
    import inspect

    from ..backends import create_backend
    from ..pipeline import AnimateLCMPipeline
    from .child import split_options

    load_options, _ = split_options(dict(runtime.options))
    pipeline_options = set(inspect.signature(AnimateLCMPipeline.from_bundle).parameters)
    backend_options = {k: v for k, v in load_options.items() if k not in pipeline_options}
    try:
        create_backend(runtime.backend, runtime.device, **backend_options)
    except TypeError as exc:
        raise InvalidArgumentError("runtime", f"{runtime.label}: {exc}",
                                   "see the backend's options in the README (e.g. threads, memory_arena, "
                                   "inference_precision)") from exc


def prepare_scenarios(scenarios: Sequence[Scenario], options: BenchOptions) -> list[tuple[Scenario, str | None]]:
    """Steps 1 and 4: every scenario checked, with the reason it is skipped (None: it runs)."""
    if options.reference not in ("auto", "none"):
        raise InvalidArgumentError("reference", f"unknown {options.reference!r}", "use auto or none")
    _check_out(options.out)
    scenarios = resolve_against_bundles(scenarios)
    if options.reference == "auto":
        have = {(_reference_bundle(s, options), s.group) for s in scenarios
                if s.runtime == REFERENCE_RUNTIME and s.bundle == _reference_bundle(s, options)}
        added = []
        for s in scenarios:
            key = (_reference_bundle(s, options), s.group)
            if key not in have:
                have.add(key)
                added.append(replace(s, bundle=key[0], runtime=REFERENCE_RUNTIME))
        scenarios = resolve_against_bundles(added) + list(scenarios)
    if any(s.runtime.is_torch for s in scenarios):
        for module in ("torch", "diffusers", "transformers"):
            if importlib.util.find_spec(module) is None:
                raise MissingExtraError("the PyTorch reference rows of lcm-edge bench", "export", module)
        for s in scenarios:
            if s.runtime.is_torch and s.torch_source is None:
                raise InvalidArgumentError("torch_source", f"scenario '{s.id}' is a PyTorch row without source weights",
                                           "pass the files the bundle was exported from: --torch-source base=PATH "
                                           "[base_folder=PATH motion_module=PATH lora=FILE:WEIGHT]")
    if options.plots and importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError("the benchmark plots", "bench", "matplotlib")
    checked, result = set(), []
    for s in scenarios:
        reason = unavailable_reason(s.runtime)
        if reason is None and s.runtime not in checked:
            _check_backend_options(s.runtime)
            checked.add(s.runtime)
        result.append((s, reason))
    return result


def _reference_bundle(s: Scenario, options: BenchOptions) -> str:
    return str(Path(options.reference_bundle).resolve()) if options.reference_bundle else s.bundle


def _tree_rss_gib(pid: int) -> float:
    """RSS of a process and its descendants (torch.compile starts compile workers)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 2**20


def run_child(s: Scenario, index: int, out: Path, limit_gib: float | None, progress: Callable[[str], None]) -> dict:
    """Step 5 for one scenario: its figures, or how it ended."""
    spec = out / "runs" / f"{index:03d}.spec.json"
    result = out / "runs" / f"{index:03d}.json"
    frames = out / "frames" / f"{index:03d}.npy"
    spec.parent.mkdir(exist_ok=True)
    frames.parent.mkdir(exist_ok=True)
    spec.write_text(json.dumps({"scenario": s.to_dict(), "frames_path": str(frames)}, indent=1))
    tail: collections.deque[str] = collections.deque(maxlen=30)
    proc = subprocess.Popen([sys.executable, "-m", "lcm_edge.bench.child", str(spec), str(result)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")

    def pump() -> None:
        for line in proc.stderr:
            tail.append(line.rstrip())
            progress(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    start, peak, ended = time.perf_counter(), 0.0, None
    while proc.poll() is None:
        rss = _tree_rss_gib(proc.pid) if Path("/proc").is_dir() else 0.0
        peak = max(peak, rss)
        if limit_gib is not None and rss > limit_gib:
            ended = {"status": "killed-memory", "reason": f"RSS {rss:.1f} GiB above the limit {limit_gib:.1f} GiB"}
        elif s.timeout_s is not None and time.perf_counter() - start > s.timeout_s:
            ended = {"status": "timeout", "reason": f"still running after {s.timeout_s:.0f} s"}
        if ended:
            proc.kill()
            proc.wait()
            break
        time.sleep(MEMORY_POLL_S)
    reader.join(timeout=5)
    wall = time.perf_counter() - start
    if ended is None and proc.returncode == 0 and result.is_file():
        return {"status": "ok", "wall_s": wall, "polled_peak_rss_gib": peak, **json.loads(result.read_text())}
    if ended is None:
        ended = {"status": "failed", "reason": f"exit code {proc.returncode}: " + " | ".join(list(tail)[-6:])}
    return {**ended, "wall_s": wall, "polled_peak_rss_gib": peak}


def _flops_for(bundle: str, out: Path, cache: dict, progress) -> dict | None:
    """Step 3, in a child process (a full-size UNet is GBs): the bundle's FLOP formulas, cached in out/."""
    if bundle in cache:
        return cache[bundle]
    target = out / "flops" / f"{len(cache):02d}-{Path(bundle).name}.json"
    target.parent.mkdir(exist_ok=True)
    code = ("import json, sys; from lcm_edge.bench.flops import bundle_flops; "
            "f = bundle_flops(sys.argv[1], lambda m: print('    ' + m, file=sys.stderr, flush=True)); "
            "open(sys.argv[2], 'w').write(json.dumps({k: v.to_dict() for k, v in f.items()}))")
    done = subprocess.run([sys.executable, "-c", code, bundle, str(target)], stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        progress(f"  FLOP formulas of {bundle} failed: {done.stderr.strip().splitlines()[-1:]}")
        cache[bundle] = {"error": done.stderr.strip().splitlines()[-1:] or ["unknown"]}
    else:
        cache[bundle] = json.loads(target.read_text())
    return cache[bundle]


def _stats(values: Sequence[float]) -> dict:
    if not values:
        return {"median": None, "p90": None}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered), "p90": p90}


def frame_fidelity(frames: np.ndarray, reference: np.ndarray) -> dict:
    """PSNR (dB, over uint8 frames) and max abs level difference; PSNR None when identical."""
    if frames.shape != reference.shape:
        return {"psnr_db": None, "max_abs": None, "note": f"shape {frames.shape} vs {reference.shape}"}
    psnr = psnr_db(reference, frames)
    return {"psnr_db": None if math.isinf(psnr) else psnr,
            "max_abs": int(np.abs(frames.astype(np.int16) - reference.astype(np.int16)).max()),
            "identical": math.isinf(psnr)}


def _summarize(s: Scenario, raw: dict, formulas: dict | None, peak_gflops: float | None) -> dict:
    row = {"id": s.id, "scenario": s.to_dict(), **{k: v for k, v in raw.items() if k not in ("runs",)}}
    if raw.get("status") != "ok":
        return row
    runs = raw["runs"]
    row["first_run_s"] = raw["first_run"]["total_s"]
    row["text_encoder_s"] = _stats([r["text_encoder_s"] for r in runs])
    row["unet_step_s"] = _stats([t for r in runs for t in r["unet_steps_s"]])
    row["unet_total_s"] = _stats([sum(r["unet_steps_s"]) for r in runs])
    row["vae_decode_s"] = _stats([r["vae_decode_s"] for r in runs])
    row["vae_decode_s_per_frame"] = _stats([r["vae_decode_s"] / s.decoded_frames for r in runs])
    row["total_s"] = _stats([r["total_s"] for r in runs])
    row["runs"] = runs
    if s.decoded_frames < s.frames:
        # Only some frames were decoded: the whole clip's time, with every frame decoded, is estimated.
        row["total_s_all_frames_estimated"] = (row["text_encoder_s"]["median"] + row["unet_total_s"]["median"]
                                              + row["vae_decode_s_per_frame"]["median"] * s.frames)
    if formulas and "error" not in formulas:
        from ..bundle import load_bundle
        from .flops import FlopFormula, clip_flops

        parsed = {k: FlopFormula.from_dict(v) for k, v in formulas.items()}
        m = load_bundle(s.bundle, verify_checksums=False).model
        flops = clip_flops(parsed, frames=s.frames, height=s.height, width=s.width, vae_scale_factor=m.vae_scale_factor,
                           steps=s.steps, guidance=s.guidance, decoded_frames=s.decoded_frames,
                           decoder=dict(s.runtime.options).get("decoder", "full"))
        row["flops"] = flops
        row["unet_gflops"] = flops["unet_step"] / row["unet_step_s"]["median"] / 1e9
        row["vae_gflops"] = flops["vae_decode"] / row["vae_decode_s"]["median"] / 1e9 if flops["vae_decode"] else None
        if peak_gflops:
            row["unet_fraction_of_peak"] = row["unet_gflops"] / peak_gflops
            row["vae_fraction_of_peak"] = row["vae_gflops"] / peak_gflops if row["vae_gflops"] else None
    return row


def _bundle_facts(bundle: str) -> dict:
    from ..bundle import load_bundle

    b = load_bundle(bundle, verify_checksums=False)
    unet_file = b.components["unet"].onnx
    return {"path": bundle, "precision": {name: c.precision for name, c in b.components.items()},
            "unet_sha256": b.files[unet_file].sha256 if unet_file in b.files else None,
            "manifest_sha256": _sha256(Path(bundle) / "bundle.json"),
            "size_bytes": sum(f.size for f in b.files.values())}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_bench(scenarios: Sequence[Scenario], options: BenchOptions) -> dict:
    """Run the matrix; returns the results document (also written to options.out)."""
    progress = options.progress
    planned = prepare_scenarios(scenarios, options)
    out = options.out
    ram = total_ram_gib()
    limit = options.memory_limit_gib if options.memory_limit_gib is not None else (
        DEFAULT_MEMORY_FRACTION * ram if ram else None)
    progress(f"lcm-edge bench: {len(planned)} scenarios "
             f"({sum(r is not None for _, r in planned)} skipped here), results in {out}")
    machine = describe_machine(peak=options.peak_probe)
    peak = (machine.get("fp32_peak") or {}).get("gflops")
    progress(f"machine: {machine['cpu']['model']}, {machine['cores']} cores, flags {' '.join(machine['cpu']['flags'])}"
             + (f", fp32 peak {peak} GFLOP/s" if peak else ""))
    doc = {"format": "lcm-edge-bench", "format_version": 1, "created_utc": dt.datetime.now(dt.timezone.utc)
           .isoformat(timespec="seconds"), "command": " ".join(sys.argv), "machine": machine,
           "memory_limit_gib": limit, "bundles": {}, "flops_method": (
               "derived from the graphs: onnxruntime node profile of Conv/MatMul/Gemm/attention nodes (2 FLOPs per "
               "multiply-accumulate; elementwise, norm and softmax ops not counted), fitted exactly at small shapes "
               "and checked at another (lcm_edge.bench.flops)"), "rows": []}
    flop_cache: dict = {}
    for i, (s, reason) in enumerate(planned):
        if s.bundle not in doc["bundles"]:
            doc["bundles"][s.bundle] = _bundle_facts(s.bundle)
        progress(f"[{i + 1}/{len(planned)}] {s.id}")
        if reason is not None:
            progress(f"    skipped: {reason}")
            doc["rows"].append({"id": s.id, "scenario": s.to_dict(), "status": "skipped", "reason": reason})
            continue
        formulas = _flops_for(s.bundle, out, flop_cache, progress) if options.flops else None
        raw = run_child(s, i, out, limit, progress)
        raw["load_average_after"] = load_average()
        if raw["status"] != "ok":
            progress(f"    {raw['status']}: {raw.get('reason')}")
        doc["rows"].append(_summarize(s, raw, formulas, peak))
        _write_json(out / "results.json", doc)  # a stopped matrix keeps what it measured
    _add_comparisons(doc, planned, options)
    from .report import write_reports

    write_reports(doc, out, plots=options.plots)
    return doc


def _add_comparisons(doc: dict, planned, options: BenchOptions) -> None:
    """Step 6: fidelity against each group's reference row and speed-up against its PyTorch eager row."""
    rows = doc["rows"]
    scenarios = [s for s, _ in planned]
    for row, s in zip(rows, scenarios):
        if row.get("status") != "ok":
            continue
        ref_bundle = _reference_bundle(s, options)
        ref = next((r for r, t in zip(rows, scenarios) if t.group == s.group and t.bundle == ref_bundle
                    and t.runtime == REFERENCE_RUNTIME and r.get("status") == "ok"), None)
        if ref is not None and ref is not row:
            mine = np.load(options.out / "frames" / row["frames_file"])
            theirs = np.load(options.out / "frames" / ref["frames_file"])
            row["fidelity"] = {"reference": ref["id"], **frame_fidelity(mine, theirs)}
        elif ref is row:
            row["fidelity"] = {"reference": "this row", "psnr_db": None, "max_abs": 0, "identical": True}
        eager = next((r for r, t in zip(rows, scenarios) if t.group == s.group and t.runtime.backend == "pytorch"
                      and r.get("status") == "ok"), None)
        if eager is not None:
            row["speedup_vs_pytorch_eager"] = eager["total_s"]["median"] / row["total_s"]["median"]
    _write_json(options.out / "results.json", doc)


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


__all__ = ["BenchOptions", "LCM_EDGE_BACKENDS", "frame_fidelity", "prepare_scenarios", "run_bench"]
