"""torch -> ONNX through the TorchScript exporter at opset 17.

Why TorchScript and not dynamo: the dynamo exporter's UNetMotionModel graph is wrong for
batch > 1 ("invalid expand shape" from a dynamic repeat_interleave) while the TorchScript
graph stays dynamic over batch, frames, height and width (shared/edge-deployment-facts.md).
Why opset 17: plain ops run on every execution provider; opset 18's GroupNormalization
was mis-specified.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .specs import ComponentSpec

OPSET = 17
# Protobuf cannot hold a model over 2 GiB; move weights out well before that.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
EXTERNAL_DATA_NAME = "model.onnx_data"


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, example: dict[str, np.ndarray], out_path: Path,
                *, external_data: bool | None = None) -> Path | None:
    """Write `out_path` (model.onnx) and, for large models, ONE external-data file beside it.

    Returns the external-data path or None. `external_data=None` decides by parameter size.
    """
    if external_data is None:
        external_data = parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter spills one file per tensor for >2 GiB models; trace into a scratch folder
    # and consolidate, so the bundle gets exactly model.onnx (+ model.onnx_data).
    scratch = out_path.parent / "_trace"
    scratch.mkdir()
    try:
        traced = scratch / "model.onnx"
        args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings are about Python-side shape logic; the parity gate at other
            # shapes is what proves the graph, so they are noise here.
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), args, str(traced), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                              opset_version=OPSET, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(traced), load_external_data=True)
        if external_data:
            onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=EXTERNAL_DATA_NAME, size_threshold=1024, convert_attribute=True)
        else:
            onnx.save_model(model, str(out_path))
        del model
    finally:
        shutil.rmtree(scratch)
    # The path form of the checker follows external data and has no 2 GiB limit.
    onnx.checker.check_model(str(out_path))
    return out_path.parent / EXTERNAL_DATA_NAME if external_data else None
