"""Backends by name. Each is imported only when asked for, so a missing optional runtime
(openvino) costs nothing until it is requested, and then fails with the install command."""

from __future__ import annotations

from .base import Backend, Session

BACKENDS = ("onnxruntime", "openvino")


def create_backend(name: str = "onnxruntime", device: str | None = None, **options) -> Backend:
    """`create_backend("onnxruntime", "cuda", threads=4)`, `create_backend("openvino", "GPU", cache_dir=...)`."""
    if name == "onnxruntime":
        from .ort_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(device or "cpu", **options)
    if name == "openvino":
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(device or "CPU", **options)
    from ..errors import BackendError

    raise BackendError(f"backend: unknown backend '{name}'. Fix: use one of {list(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "Session", "create_backend"]
