"""Declarative specs of the exported graphs: names, dtypes, symbolic axes, parity tolerance, and (GraphSpec)
everything else that differs between graphs, so that export/graph_export.py runs one path for all of them.

A symbolic dimension (a string) becomes a dynamic axis in ONNX; the runtime reads the same
names back from the manifest and from the graph itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from lcm_edge.bundle import ModelInfo, TensorSpec

from .wrappers import TextEncoderWrapper, UNetWrapper, VaeDecoderWrapper


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


def model_shape_cases(model: ModelInfo) -> tuple[ShapeCase, dict[str, ShapeCase]]:
    """A trace shape and two parity shapes (latent sizes in multiples of what the UNet's downsamplers need) that
    differ from it and each other in every axis."""
    m = model.size_multiple // model.vae_scale_factor
    max_frames = model.max_frames
    trace = ShapeCase(batch=2, frames=min(3, max_frames), height=2 * m, width=3 * m)
    cases = {
        "b1-f2-3x2": ShapeCase(batch=1, frames=min(2, max_frames), height=3 * m, width=2 * m),
        "b2-f4-2x2": ShapeCase(batch=2, frames=min(4, max_frames), height=2 * m, width=2 * m),
    }
    return trace, cases


@dataclass(frozen=True, eq=False)  # identity: it holds torch modules
class GraphSpec:
    """One graph to export: its interface and everything that varies between graphs.

    A new graph (another decoder, an adapter) is a new GraphSpec; export_graph has no per-graph branch.
    """

    spec: ComponentSpec
    module: torch.nn.Module  # the export wrapper: the spec's inputs positionally, plain tensors out
    config: Mapping[str, Any]  # the source model's config, written as NAME/config.json
    trace_case: ShapeCase
    cases: Mapping[str, ShapeCase]  # the parity gate's shapes, each unlike the trace shape in every axis
    vocab_size: int = 1  # range of random input_ids (graphs without input_ids ignore it)
    # Converted to fp16 in fp16 bundles; the VAE decoder is not (export/precision.py says why).
    fp16: bool = False
    # The diffusers models whose attention processors the fused trace swaps; () = no fused graph.
    attention_models: tuple[torch.nn.Module, ...] = field(default=())


def source_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The source model's config, minus where it was loaded from (that is in the provenance)."""
    config = dict(config)
    config.pop("_name_or_path", None)
    return config


def sd_graphs(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
              model: ModelInfo) -> tuple[GraphSpec, ...]:
    """The bundle's three graphs from a UNetMotionModel, its VAE and CLIP text encoder, in export order."""
    trace_case, cases = model_shape_cases(model)
    common = {"trace_case": trace_case, "cases": cases}
    return (
        GraphSpec(text_encoder_spec(model.text_max_length, model.text_hidden_size), TextEncoderWrapper(text_encoder),
                  source_config(text_encoder.config.to_dict()), vocab_size=int(text_encoder.config.vocab_size),
                  fp16=True, **common),
        GraphSpec(unet_spec(model.latent_channels, model.text_max_length, model.text_hidden_size), UNetWrapper(unet),
                  source_config(unet.config), fp16=True, attention_models=(unet,), **common),
        GraphSpec(vae_decoder_spec(model.latent_channels), VaeDecoderWrapper(vae), source_config(vae.config),
                  attention_models=(vae,), **common),
    )
