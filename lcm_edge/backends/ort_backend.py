"""onnxruntime backend: one execution provider chosen by name, never a silent CPU fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile, RuntimeException

from ..bundle import ComponentInfo, TensorSpec
from ..errors import BackendError, BundleIntegrityError, InferenceError
from .base import Backend, Session, check_graph_matches_manifest

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}

# Providers that get a component's plain graph even where the bundle has a fused one: TensorRT does not take
# com.microsoft ops, and OpenVINO fuses the plain MatMul-Softmax-MatMul into its own ScaledDotProductAttention.
# CPU, CUDA and DirectML run the fused MultiHeadAttention, which never holds the full attention score tensor
# (at 512x512x16 the plain UNet graph's largest is 8 GiB, twice, and onnxruntime ran out of 24 GiB).
PLAIN_GRAPH_PROVIDERS = ("TensorrtExecutionProvider", "OpenVINOExecutionProvider")


def select_onnx_graph(component: ComponentInfo, provider: str) -> str:
    """The bundle-relative graph `provider` (a full provider name) runs for `component`."""
    if component.onnx_fused is not None and provider not in PLAIN_GRAPH_PROVIDERS:
        return component.onnx_fused
    return component.onnx


def _tensor_spec(arg) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise BackendError(f"graph tensor '{arg.name}' has type {arg.type}, which lcm_edge does not handle")
    shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
    return TensorSpec(arg.name, dtype, shape)


class OrtSession(Session):
    def __init__(self, name: str, path: Path, session: ort.InferenceSession):
        self._session = session
        super().__init__(name, path, tuple(_tensor_spec(a) for a in session.get_inputs()),
                         tuple(_tensor_spec(a) for a in session.get_outputs()))
        self._output_names = [o.name for o in self.outputs]

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # InferenceSession.run is thread-safe: threads sharing a pipeline need no lock here.
        try:
            results = self._session.run(self._output_names, dict(feeds))
        except (Fail, RuntimeException) as exc:
            raise InferenceError(self.name, f"onnxruntime failed running the graph ({exc})",
                                 "check free memory; low_memory=True or a smaller size needs less") from exc
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        self._session = None  # onnxruntime frees the session's weights and arena with the last reference


class OnnxRuntimeBackend(Backend):
    """`device` is a provider short name (cpu, cuda, tensorrt, directml, openvino) or its full name."""

    name = "onnxruntime"

    def __init__(self, device: str = "cpu", *, threads: int | None = None, optimization: str = "all",
                 memory_arena: bool | None = None, provider_options: Mapping[str, str] | None = None,
                 low_memory: bool = False):
        provider = PROVIDERS.get(device.lower(), device)
        available = ort.get_available_providers()
        if provider not in PROVIDERS.values():
            raise BackendError(f"device: unknown onnxruntime provider '{device}'. Fix: use one of "
                               f"{sorted(PROVIDERS)} (installed here: {available})")
        if provider not in available:
            hint = {"CUDAExecutionProvider": "pip install 'lcm-edge[gpu]'",
                    "TensorrtExecutionProvider": "pip install 'lcm-edge[gpu]' and TensorRT",
                    "DmlExecutionProvider": "pip install onnxruntime-directml (Windows)",
                    "OpenVINOExecutionProvider": "pip install onnxruntime-openvino"}.get(provider, "")
            raise BackendError(f"device: provider {provider} is not installed; available providers are "
                               f"{available}. Fix: pick one of those, or {hint}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise BackendError(f"optimization: unknown level '{optimization}'. Fix: use one of "
                               f"{list(OPTIMIZATION_LEVELS)}")
        if threads is not None and (not isinstance(threads, int) or threads < 0):
            raise BackendError(f"threads: {threads!r} is not a non-negative int. Fix: pass e.g. 4, or 0 for "
                               "onnxruntime's default")
        self.provider = provider
        self.threads = threads
        self.optimization = optimization
        self.provider_options = dict(provider_options or {})
        # The CPU arena keeps peak activations reserved: measured on the tiny UNet at 16 frames,
        # 2.2 GB peak RSS with it, 1.2 GB without, at 1.45x the step time. Off for low-RAM devices.
        self.low_memory = low_memory
        self.memory_arena = (not low_memory) if memory_arena is None else memory_arena

    def open(self, bundle_root: Path, component: ComponentInfo) -> Session:
        path = bundle_root / select_onnx_graph(component, self.provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.enable_cpu_mem_arena = self.memory_arena
        providers = [(self.provider, self.provider_options)]
        if self.provider != "CPUExecutionProvider":
            # Nodes an accelerator EP does not take run on CPU; that is onnxruntime's partitioning,
            # not a fallback of the whole session, which is checked below.
            providers.append(("CPUExecutionProvider", {}))
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except (InvalidProtobuf, InvalidGraph, NoSuchFile, Fail) as exc:
            # Fail: a graph onnxruntime refuses to load, e.g. external data that leads out of the bundle folder.
            raise BundleIntegrityError(path, f"onnxruntime cannot read the graph ({exc})",
                                       "re-export the bundle") from exc
        active = session.get_providers()
        if self.provider not in active:
            raise BackendError(f"device: {self.provider} failed to initialise for {component.name} (active: "
                               f"{active}). Fix: check the GPU driver/CUDA/TensorRT install, or use device='cpu'")
        return check_graph_matches_manifest(component, OrtSession(component.name, path, session))

    def describe(self) -> str:
        arena = "" if self.memory_arena else " arena off"
        return f"onnxruntime {ort.__version__} {self.provider}{arena}{' low-memory' if self.low_memory else ''}"
