"""Declarative specs of the exported graphs: names, dtypes, symbolic axes, parity tolerance.

A symbolic dimension (a string) becomes a dynamic axis in ONNX; the runtime reads the same
names back from the manifest and from the graph itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcm_edge.bundle import TensorSpec


@dataclass(frozen=True)
class Tolerance:
    """Elementwise |actual - expected| <= atol + rtol * |expected| (numpy.allclose semantics)."""

    name: str
    atol: float
    rtol: float


# fp32 ONNX vs torch: measured ~1e-6 on tiny and full-size graphs; this leaves headroom for
# different kernels (onnxruntime/OpenVINO) without hiding a wrong graph (errors are O(1) then).
ONNX_FP32_TOLERANCE = Tolerance("onnx-fp32-vs-torch", atol=1e-4, rtol=1e-3)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for tensor in self.inputs + self.outputs:
            dynamic = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
            if dynamic:
                axes[tensor.name] = dynamic
        return axes

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def text_encoder_spec(max_length: int, hidden_size: int) -> ComponentSpec:
    return ComponentSpec(
        "text_encoder",
        inputs=(TensorSpec("input_ids", "int64", ("batch", max_length)),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", max_length, hidden_size)),),
        tolerance=ONNX_FP32_TOLERANCE,
    )


def unet_spec(latent_channels: int, max_length: int, hidden_size: int) -> ComponentSpec:
    video = ("batch", latent_channels, "frames", "height", "width")
    return ComponentSpec(
        "unet",
        inputs=(TensorSpec("sample", "float32", video),
                TensorSpec("timestep", "float32", (1,)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", max_length, hidden_size))),
        outputs=(TensorSpec("out_sample", "float32", video),),
        tolerance=ONNX_FP32_TOLERANCE,
    )


def vae_decoder_spec(latent_channels: int) -> ComponentSpec:
    return ComponentSpec(
        "vae_decoder",
        inputs=(TensorSpec("latent_sample", "float32", ("batch", latent_channels, "height", "width")),),
        outputs=(TensorSpec("sample", "float32", ("batch", 3, "out_height", "out_width")),),
        tolerance=ONNX_FP32_TOLERANCE,
    )


@dataclass(frozen=True)
class ShapeCase:
    """One shape the parity gate runs: frames fold into the VAE's batch, so it has no frame axis."""

    batch: int
    frames: int
    height: int  # latent height
    width: int  # latent width


def sample_inputs(spec: ComponentSpec, case: ShapeCase, *, vocab_size: int, rng: np.random.Generator,
                  timestep: float = 999.0) -> dict[str, np.ndarray]:
    """Random inputs of the spec's dtypes at one shape case (the same arrays feed torch and the runtime)."""
    sizes = {"batch": case.batch, "frames": case.frames, "height": case.height, "width": case.width}
    feeds = {}
    for tensor in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in tensor.shape)
        if tensor.name == "input_ids":
            feeds[tensor.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif tensor.name == "timestep":
            feeds[tensor.name] = np.full(shape, timestep, dtype=np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds
