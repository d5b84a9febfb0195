"""The numerical gate after every conversion: runtime output vs torch, named tolerance, loud failure."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from lcm_edge.backends import Session
from lcm_edge.errors import InvalidArgumentError, ParityError

from .specs import ComponentSpec, Tolerance


@dataclass(frozen=True)
class OutputCheck:
    component: str
    runtime: str  # e.g. "onnxruntime", "openvino-ir"
    case: str
    output: str
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    passed: bool


@dataclass
class ParityReport:
    tolerance: Tolerance
    checks: list[OutputCheck]

    def worst_abs(self) -> float:
        return max(c.max_abs for c in self.checks)

    def to_dict(self) -> dict:
        return {"tolerance": asdict(self.tolerance), "worst_max_abs": self.worst_abs(),
                "checks": [asdict(c) for c in self.checks]}


def compare(expected: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> tuple[float, float, bool]:
    if expected.shape != actual.shape:
        return float("inf"), float("inf"), False
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    finite = bool(np.isfinite(actual).all())
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    within = finite and bool(np.all(diff <= tolerance.atol + tolerance.rtol * np.abs(expected)))
    return max_abs, max_rel, within


def run_torch(module: torch.nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(feeds[name]) for name in spec.input_names])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {name: o.float().numpy() for name, o in zip(spec.output_names, outs)}


def reference_outputs(module: torch.nn.Module, spec: ComponentSpec,
                      cases: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Torch outputs for every case, computed once and reused by every gate of a component."""
    return {case_name: run_torch(module, spec, feeds) for case_name, feeds in cases.items()}


def check_parity(module: torch.nn.Module | None, spec: ComponentSpec, session: Session, runtime: str,
                 cases: dict[str, dict[str, np.ndarray]], tolerance: Tolerance | None = None, *,
                 expected: dict[str, dict[str, np.ndarray]] | None = None) -> ParityReport:
    """Run every case through torch (or take `expected`, from reference_outputs) and the session;
    raise ParityError listing every failing output."""
    tolerance = tolerance or spec.tolerance
    if expected is None:
        if module is None:
            raise InvalidArgumentError("module", "None while no expected outputs are given",
                                       "pass the torch module, or expected=reference_outputs(...)")
        expected = reference_outputs(module, spec, cases)
    checks = []
    for case_name, feeds in cases.items():
        actual = session.run(feeds)
        for name in spec.output_names:
            got = actual[name].astype(np.float32)
            max_abs, max_rel, ok = compare(expected[case_name][name], got, tolerance)
            checks.append(OutputCheck(spec.name, runtime, case_name, name, max_abs, max_rel, ok))
    failures = [f"{c.component}[{c.runtime}, {c.case}].{c.output}: max abs {c.max_abs:.3g}, max rel "
                f"{c.max_rel:.3g} > tolerance {tolerance.name} (atol {tolerance.atol}, rtol {tolerance.rtol})"
                for c in checks if not c.passed]
    if failures:
        raise ParityError(f"{spec.name} {runtime} vs torch", failures)
    return ParityReport(tolerance, checks)
