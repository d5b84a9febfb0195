"""What a benchmark ran on: CPU model and flags, cores, RAM, library versions, and a measured fp32 peak.

Machines differ from day to day (one has AVX2 only, another AVX-512 with VNNI and BF16), so every
figure is stored with this description and compared only within one run.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..cpu import cpu_flags, cpu_model

# The flags that decide which kernels a runtime can use (fp32 FMA width, int8 dot products, bf16).
INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")
LIBRARIES = ("lcm-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "diffusers",
             "transformers", "onnx", "nncf", "opencv-python-headless")
PEAK_MATMUL_N = 4096


def cpu_info() -> dict:
    """CPU model and the INTERESTING_FLAGS it has."""
    return {"model": cpu_model(), "flags": sorted(f for f in INTERESTING_FLAGS if f in cpu_flags())}


def total_ram_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return None


def library_versions() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """The lcm_edge checkout's commit (with '+dirty' for uncommitted changes), when run from one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def measure_fp32_peak(n: int = PEAK_MATMUL_N, repeats: int = 3) -> dict:
    """Best-of-`repeats` GFLOP/s of an n x n fp32 matmul (numpy's BLAS, all cores): the ceiling that
    the achieved GFLOP/s of the UNet and VAE decoder are read against."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {"gflops": round(2 * n**3 / best / 1e9, 1), "method": f"numpy fp32 matmul {n}x{n}, best of {repeats}",
            "threads": os.cpu_count()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_machine(*, peak: bool = True) -> dict:
    return {
        "cpu": cpu_info(), "cores": os.cpu_count(), "ram_gib": total_ram_gib(),
        "os": f"{platform.system()} {platform.release()}", "python": sys.version.split()[0],
        "libraries": library_versions(), "commit": git_commit(), "load_average_at_start": load_average(),
        "fp32_peak": measure_fp32_peak() if peak else None,
    }
