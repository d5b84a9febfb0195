"""fp16 variants of gated fp32 graphs, and the tolerances their gates use.

ONNX fp16: onnxruntime's float16 converter (the one its Stable Diffusion tools use) turns a
gated fp32 graph into fp16 compute with fp32 inputs and outputs (`keep_io_types`): the
runtime feeds float32 as before; onnxruntime's CPU EP inserts casts where it lacks an fp16
kernel, and OpenVINO reads the graph at its own inference precision.
OpenVINO FP16: the fp32 IR with weights compressed to fp16 (`compress_to_fp16`); the plugin
decompresses them, so compute stays at the device's precision.

The VAE decoder stays fp32 in fp16 bundles: fp16 VAE decoders overflow to NaN/black frames on
several execution providers (docs/edge-deployment.md), and random weights
cannot show real ones free of that. It is ~200 MB, 4% of the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from lcm_edge.errors import InvalidArgumentError

from .onnx_io import EXTERNAL_DATA_NAME
from .specs import Tolerance

PRECISIONS = ("fp32", "fp16")
# Which graphs become fp16 is each graph's GraphSpec.fp16 (specs.sd_graphs): the text encoder and the UNet.

# fp16 compute vs fp32 torch: fp16 keeps ~3 significant digits and the UNet chains ~100 layers.
# Measured max abs: tiny graphs 1e-3..3e-3 (outputs up to 2.7); full size (benchmarks/
# full_size_export.py) UNet 6.4e-3 for outputs up to 1.16, CLIP 3.1e-3. A wrong graph is off by O(1).
ONNX_FP16_TOLERANCE = Tolerance("onnx-fp16-vs-torch-fp32", atol=3e-2, rtol=3e-2)
# fp16-rounded weights, fp32 compute. Measured full size: UNet 6.8e-3 (as large as fp16 compute:
# the weight rounding dominates), CLIP 1.6e-4.
OPENVINO_FP16_TOLERANCE = Tolerance("openvino-fp16-weights-vs-torch-fp32", atol=3e-2, rtol=3e-2)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidArgumentError("precision", f"{precision!r} is not one of {PRECISIONS}",
                                   "use fp32 (reference) or fp16 (half the size; UNet and text encoder in fp16)")
    return precision


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Topological node order. The converter appends its input casts at the end of the node
    list; onnxruntime sorts by itself, but the ONNX spec (and onnx.checker) require the order."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        deferred = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                deferred.append(node)
        if len(deferred) == len(pending):
            raise InvalidArgumentError("onnx graph", f"{len(deferred)} node(s) read values no node produces, "
                                       f"e.g. {deferred[0].name}", "re-export the fp32 graph")
        pending = deferred
    del graph.node[:]
    graph.node.extend(ordered)


def convert_onnx_to_fp16(onnx_path: Path, *, external_data: bool) -> Path | None:
    """Replace the fp32 graph at `onnx_path` (and its external data) by its fp16 version.

    Returns the new external-data path or None.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    folder = onnx_path.parent
    # Shape inference through the path API works past protobuf's 2 GiB limit; the converter
    # needs the inferred value types to place its casts.
    inferred = folder / "_inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(onnx_path), str(inferred))
    model = onnx.load(str(inferred), load_external_data=True)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    os.remove(inferred)
    _sort_nodes(model.graph)
    old_data = folder / EXTERNAL_DATA_NAME
    if old_data.exists():
        os.remove(old_data)  # the fp32 weights now live (as fp16) in `model`
    if external_data:
        onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024, convert_attribute=True)
    else:
        onnx.save_model(model, str(onnx_path))
    del model
    onnx.checker.check_model(str(onnx_path))
    return folder / EXTERNAL_DATA_NAME if external_data else None
