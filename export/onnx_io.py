"""torch -> ONNX through the TorchScript exporter at opset 17.

Why TorchScript and not dynamo: the dynamo exporter's UNetMotionModel graph is wrong for
batch > 1 ("invalid expand shape" from a dynamic repeat_interleave) while the TorchScript
graph stays dynamic over batch, frames, height and width (docs/edge-deployment.md).
Why opset 17: plain ops run on every execution provider; opset 18's GroupNormalization
was mis-specified.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from lcm_edge.errors import InvalidArgumentError

from .specs import ComponentSpec

OPSET = 17
# Protobuf cannot hold a model over 2 GiB; move weights out well before that.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
EXTERNAL_DATA_NAME = "model.onnx_data"


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def trace_onnx(module: torch.nn.Module, spec: ComponentSpec, example: dict[str, np.ndarray], scratch: Path,
               *, custom_opsets: dict[str, int] | None = None) -> Path:
    """TorchScript-export `module` into the folder `scratch`; returns the traced model.onnx.

    For a >2 GiB model the exporter spills one file per tensor beside it; consolidate() merges them.
    custom_opsets: versions of non-standard domains the module's symbolics emit (fused attention's com.microsoft).
    """
    scratch.mkdir(parents=True)
    traced = scratch / "model.onnx"
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings are about Python-side shape logic; the parity gate at other
        # shapes is what proves the graph, so they are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(traced), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=OPSET, do_constant_folding=True, dynamo=False,
                          custom_opsets=custom_opsets or {})
    return traced


def _tensors(graph: onnx.GraphProto):
    """Initializers and attribute tensors (Constant nodes), subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _tensors(sub)


def _merge_external_files(traced: Path, out_path: Path) -> None:
    """Stream the exporter's per-tensor files into ONE data file, never holding the weights in memory."""
    model = onnx.load(str(traced), load_external_data=False)
    data_path = out_path.parent / EXTERNAL_DATA_NAME
    with open(data_path, "wb") as out:
        for tensor in _tensors(model.graph):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                with open(traced.parent / info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    payload = src.read(info.length) if info.length else src.read()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                payload = tensor.raw_data  # large inline tensors move out too, as onnx.save would
                tensor.ClearField("raw_data")
            else:
                continue
            # 4 KiB alignment lets runtimes mmap tensors directly.
            out.write(b"\0" * (-out.tell() % 4096))
            offset = out.tell()
            out.write(payload)
            # Written by hand: onnx's set_external_data insists on a raw_data field, which
            # external tensors no longer have.
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(out_path))


def stamp_output_shapes(path: Path, spec: ComponentSpec) -> None:
    """Write the spec's output shapes into the graph: the tracer leaves generated names such as
    'Transposeout_sample_dim_1' even for static axes, which runtimes then report to users."""
    model = onnx.load(str(path), load_external_data=False)
    for output, tensor in zip(model.graph.output, spec.outputs):
        dims = output.type.tensor_type.shape.dim
        if output.name != tensor.name or len(dims) != len(tensor.shape):
            raise InvalidArgumentError("spec", f"graph output {output.name} (rank {len(dims)}) does not match the "
                                       f"spec's {tensor.name} {list(tensor.shape)}", "fix export/specs.py")
        for dim, value in zip(dims, tensor.shape):
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value
    onnx.save_model(model, str(path))


def consolidate(traced: Path, out_path: Path, spec: ComponentSpec, *, external_data: bool) -> Path | None:
    """Write `out_path` (model.onnx) and, if `external_data`, ONE model.onnx_data beside it."""
    spilled = any(p.name != traced.name for p in traced.parent.iterdir())
    if spilled and not external_data:
        raise InvalidArgumentError("external_data", "False for a model over protobuf's 2 GiB limit",
                                   "leave external_data=None (decided by size) or pass True")
    if spilled:
        _merge_external_files(traced, out_path)
    elif external_data:
        model = onnx.load(str(traced))
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024, convert_attribute=True)
        del model
    else:
        os.replace(traced, out_path)
    stamp_output_shapes(out_path, spec)
    # The path form of the checker follows external data and has no 2 GiB limit.
    onnx.checker.check_model(str(out_path))
    return out_path.parent / EXTERNAL_DATA_NAME if external_data else None


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, example: dict[str, np.ndarray], out_path: Path,
                *, external_data: bool | None = None) -> Path | None:
    """Write `out_path` (model.onnx) and, for large models, ONE external-data file beside it.

    Returns the external-data path or None. `external_data=None` decides by parameter size.
    """
    if external_data is None:
        external_data = parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES
    scratch = out_path.parent / "_trace"
    try:
        traced = trace_onnx(module, spec, example, scratch)
        return consolidate(traced, out_path, spec, external_data=external_data)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
