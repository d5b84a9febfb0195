"""OpenVINO backend: device CPU, GPU, NPU or AUTO, with a compile cache and a performance hint."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..bundle import ComponentInfo, TensorSpec
from ..errors import BackendError, BundleIntegrityError, MissingExtraError
from .base import Backend, Session

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
INFERENCE_PRECISIONS = ("f32", "f16", "bf16")


def _import_openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingExtraError("the OpenVINO backend", "openvino", "openvino") from exc
    return ov


def _tensor_spec(port, wanted: set[str]) -> TensorSpec:
    # A port can carry several tensor names (an input fused into its first op keeps both);
    # take the one the exporter named, so feeds and results use the bundle's names.
    names = port.get_names()
    chosen = sorted(names & wanted) or sorted(names)
    shape = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
    return TensorSpec(chosen[0], str(np.dtype(port.get_element_type().to_dtype())), shape)


class OpenVinoSession(Session):
    def __init__(self, component: ComponentInfo, path: Path, compiled):
        wanted = {t.name for t in component.inputs + component.outputs}
        super().__init__(component.name, path, tuple(_tensor_spec(p, wanted) for p in compiled.inputs),
                         tuple(_tensor_spec(p, wanted) for p in compiled.outputs))
        self._request = compiled.create_infer_request()

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs=False: OpenVINO otherwise aliases caller arrays, and a later request at
        # another shape was seen overwriting them (the text embeddings are reused every step).
        ordered = [feeds[spec.name] for spec in self.inputs]
        results = self._request.infer(ordered, share_inputs=False, share_outputs=False)
        return {spec.name: np.array(results[i]) for i, spec in enumerate(self.outputs)}


class OpenVinoBackend(Backend):
    """Uses the bundle's OpenVINO IR when it has one, else reads the ONNX graph (`Session.path` says which).

    inference_precision: "f32" (default, matches PyTorch), or "bf16"/"f16" for speed where the
    device has it; check the result against f32 before shipping such a setting.
    """

    name = "openvino"

    def __init__(self, device: str = "CPU", *, cache_dir: str | Path | None = None,
                 performance_hint: str = "LATENCY", inference_precision: str = "f32",
                 config: Mapping[str, str] | None = None):
        ov = _import_openvino()
        self._core = ov.Core()
        device_upper = device.upper()
        family = device_upper.split(".")[0].split(":")[0]
        if family not in DEVICES:
            raise BackendError(f"device: unknown OpenVINO device '{device}'. Fix: use one of {list(DEVICES)}")
        available = self._core.available_devices
        if family != "AUTO" and not any(d.split(".")[0] == family for d in available):
            raise BackendError(f"device: OpenVINO device {device_upper} is not available on this machine; "
                               f"available: {available}. Fix: pick one of those or AUTO")
        if performance_hint.upper() not in PERFORMANCE_HINTS:
            raise BackendError(f"performance_hint: unknown '{performance_hint}'. Fix: use one of "
                               f"{list(PERFORMANCE_HINTS)}")
        if inference_precision not in INFERENCE_PRECISIONS:
            raise BackendError(f"inference_precision: unknown '{inference_precision}'. Fix: use one of "
                               f"{list(INFERENCE_PRECISIONS)}")
        self.device = device_upper
        self.performance_hint = performance_hint.upper()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        # f32 unless asked: OpenVINO's CPU plugin silently picks bf16 where the CPU has it
        # (1e-2 relative error on CLIP here) and GPU plugins pick f16.
        self.inference_precision = inference_precision
        self.config = {"PERFORMANCE_HINT": self.performance_hint, "INFERENCE_PRECISION_HINT": inference_precision,
                       **dict(config or {})}
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.config["CACHE_DIR"] = str(self.cache_dir)
        self._version = ov.__version__.split("-")[0]

    def open(self, bundle_root: Path, component: ComponentInfo) -> Session:
        path = bundle_root / (component.openvino or component.onnx)
        try:
            model = self._core.read_model(str(path))
        except RuntimeError as exc:
            raise BundleIntegrityError(path, f"OpenVINO cannot read the graph ({exc})",
                                       "re-export the bundle") from exc
        compiled = self._core.compile_model(model, self.device, self.config)
        return OpenVinoSession(component, path, compiled)

    def describe(self) -> str:
        return f"openvino {self._version} {self.device} {self.performance_hint} {self.inference_precision}"
