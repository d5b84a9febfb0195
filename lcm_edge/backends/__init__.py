"""Backends by name. Each is imported only when asked for, so a missing optional runtime
(openvino) costs nothing until it is requested, and then fails with the install command."""

from __future__ import annotations

from .base import Backend, Session

BACKENDS = ("onnxruntime", "openvino")


PRECISIONS = ("f32", "bf16", "f16")


def create_backend(name: str = "onnxruntime", device: str | None = None, *, precision: str | None = None,
                   **options) -> Backend:
    """`create_backend("onnxruntime", "cuda", threads=4)`, `create_backend("openvino", "GPU", cache_dir=...)`.

    precision: the compute precision for fp32 graphs, "f32" (default), "bf16" or "f16"; only OpenVINO
    computes fp32 graphs at lower precision (its inference_precision). onnxruntime runs a graph at the
    precision it was exported in (an fp16 bundle computes in fp16)."""
    if precision is not None and precision not in PRECISIONS:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError("precision", f"unknown '{precision}'", f"use one of {list(PRECISIONS)}, or "
                                   "'auto' with AnimateLCMPipeline.from_bundle")
    if name == "onnxruntime":
        from .ort_backend import OnnxRuntimeBackend

        if precision not in (None, "f32"):
            from ..errors import InvalidArgumentError

            # onnxruntime's CPU provider has no reduced-precision mode for fp32 graphs on x86; its only bf16
            # switch (session config mlas.enable_gemm_fastmath_arm64_bfloat16) is for ARM64 CPUs.
            raise InvalidArgumentError("precision", f"{precision} with onnxruntime, which computes an fp32 "
                                       "graph in fp32", "use backend='openvino' for bf16/f16 compute, export an "
                                       "fp16 bundle for onnxruntime's GPU providers, or use precision='f32'")
        return OnnxRuntimeBackend(device or "cpu", **options)
    if name == "openvino":
        from .openvino_backend import OpenVinoBackend

        if precision is not None:
            if "inference_precision" in options:
                from ..errors import InvalidArgumentError

                raise InvalidArgumentError("precision", "given together with inference_precision, its OpenVINO name",
                                           "pass one of them")
            options["inference_precision"] = precision
        return OpenVinoBackend(device or "CPU", **options)
    from ..errors import BackendError

    raise BackendError(f"backend: unknown backend '{name}'. Fix: use one of {list(BACKENDS)}")


__all__ = ["BACKENDS", "PRECISIONS", "Backend", "Session", "create_backend"]
