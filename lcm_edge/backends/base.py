"""The backend interface: open a bundle component as a session that runs numpy arrays.

Two implementations: onnxruntime (execution providers) and OpenVINO (devices). A session
checks every call against the graph's own input metadata, so a shape or dtype mistake is
a `GraphInputError` naming the input, not a crash deep inside a runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping

import numpy as np

from ..bundle import ComponentInfo, TensorSpec
from ..errors import BundleFormatError, GraphInputError


class Session(ABC):
    """One compiled graph. `inputs`/`outputs` come from the graph file, not the manifest.

    `run` may be called from several threads at once: an app shares one pipeline between its
    workers, so each implementation keeps per-call state out of the session (or guards it).
    """

    def __init__(self, name: str, path: Path, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
        self.name = name
        self.path = path
        self.inputs = inputs
        self.outputs = outputs

    def input_dtype(self, name: str) -> np.dtype:
        for spec in self.inputs:
            if spec.name == name:
                return np.dtype(spec.dtype)
        raise GraphInputError(f"{self.name}: graph has no input '{name}' (inputs: {[s.name for s in self.inputs]})")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        return self._run(feeds)

    def prepare(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Compile ahead for these input shapes. Only backends that compile per shape (OpenVINO with
        static shapes) have work to do; a runtime with dynamic shapes is ready once opened."""

    def close(self) -> None:
        """Release the runtime's memory for this graph; the session must not be run afterwards."""

    @abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(ABC):
    name: str
    precision: str = "f32"  # the compute precision sessions run at ("f32", "bf16", "f16")
    precision_note: str = ""  # why, when precision="auto" chose it (describe() prints it)
    low_memory: bool = False  # release what can be released between calls (see AnimateLCMPipeline)

    def supported_precisions(self) -> tuple[str, ...]:
        """Compute precisions this backend and device can run fp32 graphs at, fastest last."""
        return ("f32",)

    @abstractmethod
    def open(self, bundle_root: Path, component: ComponentInfo) -> Session: ...

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and benchmark tables, e.g. 'onnxruntime 1.32.0 CPUExecutionProvider'."""


def check_graph_matches_manifest(component: ComponentInfo, session: Session) -> Session:
    """The graph a backend opened takes and gives what bundle.json declares: same names, dtypes and ranks, and
    every axis the manifest leaves free (a name such as "batch") free in the graph too. A hostile or mixed-up
    graph is a BundleFormatError when the pipeline opens it, not an error inside a generation."""
    problems = []
    for kind, declared, actual in (("input", component.inputs, session.inputs),
                                   ("output", component.outputs, session.outputs)):
        graph = {spec.name: spec for spec in actual}
        if sorted(graph) != sorted(spec.name for spec in declared):
            problems.append(f"{kind}s {sorted(graph)}, bundle.json declares {sorted(s.name for s in declared)}")
            continue
        for spec in declared:
            got = graph[spec.name]
            fixed_apart = len(got.shape) != len(spec.shape) or any(
                isinstance(g, int) and g >= 0 and (not isinstance(d, int) or g != d)
                for g, d in zip(got.shape, spec.shape))
            if got.dtype != spec.dtype or fixed_apart:
                problems.append(f"{kind} '{spec.name}' is {got.dtype} {list(got.shape)}, bundle.json declares "
                                f"{spec.dtype} {list(spec.shape)}")
    if problems:
        session.close()
        raise BundleFormatError(session.path, f"graph of {component.name} differs from bundle.json: "
                                + "; ".join(problems), "re-export the bundle; its graphs were replaced")
    return session


def check_feeds(graph: str, specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray]) -> None:
    expected = {s.name for s in specs}
    missing = sorted(expected - feeds.keys())
    unknown = sorted(feeds.keys() - expected)
    if missing or unknown:
        raise GraphInputError(f"{graph}: missing inputs {missing}, unexpected inputs {unknown}; "
                              f"the graph takes {sorted(expected)}")
    for spec in specs:
        array = feeds[spec.name]
        if not isinstance(array, np.ndarray):
            raise GraphInputError(f"{graph}.{spec.name}: expected a numpy array, got {type(array).__name__}")
        if array.dtype != np.dtype(spec.dtype):
            raise GraphInputError(f"{graph}.{spec.name}: dtype {array.dtype}, the graph takes {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise GraphInputError(f"{graph}.{spec.name}: rank {array.ndim} (shape {array.shape}), "
                                  f"the graph takes rank {len(spec.shape)} {list(spec.shape)}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise GraphInputError(f"{graph}.{spec.name}: axis {axis} is {got}, the graph fixes it to {want} "
                                      f"(shape {list(spec.shape)})")
