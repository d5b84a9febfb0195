"""The CPU's model and feature flags: what decides bf16, INT8 kernels and the figures' context."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """Feature flags (Linux /proc/cpuinfo: x86 'flags', ARM 'Features'); empty where the file does not exist."""
    flags: set[str] = set()
    for line in _cpuinfo(path).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_model(path: str | os.PathLike = "/proc/cpuinfo") -> str:
    for line in _cpuinfo(path).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()
