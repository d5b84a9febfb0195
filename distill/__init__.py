"""lcm_edge.distill: decoupled consistency learning (AnimateLCM) on Hugging Face Accelerate.

    from lcm_edge.distill import load_config, train
    result = train(load_config("stage1_image.toml", stage="image"))

Importing this package is cheap (no torch): `lcm_edge.distill.cli.add_distill_parser` is used by the
`lcm-edge` command line. The training names below load on first use.
"""

from __future__ import annotations

_LAZY = {
    "train": ("train", "train"),
    "TrainResult": ("train", "TrainResult"),
    "DistillConfig": ("config", "DistillConfig"),
    "load_config": ("config", "load_config"),
    "config_from_dict": ("config", "config_from_dict"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lcm_edge.distill' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
