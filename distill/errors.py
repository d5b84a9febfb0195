"""Typed errors of lcm_edge.distill. Each names what was wrong and how to fix it.

They subclass the runtime's `LcmEdgeError` family so a caller catching `LcmEdgeError` (the CLI does)
sees training failures the same way as runtime ones.
"""

from __future__ import annotations

from lcm_edge.errors import InvalidArgumentError, LcmEdgeError, PathError


class ConfigError(InvalidArgumentError):
    """A training config value is missing, unknown, of the wrong type or out of range.

    `argument` is the dotted key in the config file, e.g. ``train.batch_size``.
    """


class DatasetError(PathError):
    """A dataset folder, captions file or media file cannot be used. `path` names it."""


class CheckpointError(PathError):
    """A checkpoint or saved weight file cannot be resumed from or loaded. `path` names it."""


class TrainingDivergedError(LcmEdgeError):
    """The loss became NaN or infinite; training stops instead of writing a broken checkpoint."""

    def __init__(self, step: int, loss: float, fix: str):
        self.step = step
        self.loss = loss
        super().__init__(f"loss is {loss} at step {step}. Fix: {fix}")
