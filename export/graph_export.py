"""One graph through the exporter's gates: trace -> gate -> OpenVINO gate -> fp16 gate -> write.

Every graph of a bundle, and the optional tiny decoder added to one, takes this path. What differs
between graphs (wrapper, shapes, fp16 policy, fused attention) is data on its GraphSpec (specs.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch

from lcm_edge.backends import Backend
from lcm_edge.bundle import ComponentInfo

from .attention import FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OPSET, FUSED_OP_KEY, count_ops, fused_attention, \
    write_unfused
from .onnx_io import EXTERNAL_DATA_THRESHOLD_BYTES, consolidate, parameter_bytes, trace_onnx
from .openvino_ir import convert_to_openvino
from .parity import ParityReport, check_parity, reference_outputs
from .precision import ONNX_FP16_TOLERANCE, OPENVINO_FP16_TOLERANCE, convert_onnx_to_fp16
from .specs import GraphSpec, Tolerance, sample_inputs


@dataclass
class ExportedGraph:
    info: ComponentInfo
    parity: dict[str, ParityReport]  # keyed "NAME/runtime"
    precision: dict[str, str | None]  # what the onnx and OpenVINO files hold (bundle.json provenance)
    attention: dict[str, int] | None  # fused_nodes and softmax_left of a fused graph; None for a plain one


def _json_default(value: Any):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(data), indent=2, sort_keys=True, default=_json_default) + "\n",
                    encoding="utf-8")


def _trace(graph: GraphSpec, example: dict[str, np.ndarray], scratch: Path, fused: bool) -> tuple[Path, int]:
    """The traced graph, and how many fused attention nodes it has (0 when traced plain)."""
    if not fused:
        return trace_onnx(graph.module, graph.spec, example, scratch), 0
    with fused_attention(*graph.attention_models):
        traced = trace_onnx(graph.module, graph.spec, example, scratch,
                            custom_opsets={FUSED_ATTENTION_DOMAIN: FUSED_ATTENTION_OPSET})
    return traced, count_ops(onnx.load(str(traced), load_external_data=False)).get(FUSED_OP_KEY, 0)


def export_graph(graph: GraphSpec, root: Path, *, rng: np.random.Generator, ort_backend: Backend,
                 ov_backend: Backend | None = None, precision: str = "fp32", attention: str = "plain",
                 external_data: bool | None = None, release_torch: bool = False) -> ExportedGraph:
    """Write root/NAME/ (model.onnx [, model_fused.onnx, model.onnx_data, OpenVINO IR], config.json), every file
    gated against torch at the graph's parity shapes; raises ParityError. Arguments as in export_bundle."""
    spec, module, name = graph.spec, graph.module, graph.spec.name
    folder = root / name
    onnx_path, fused_path = folder / "model.onnx", folder / "model_fused.onnx"
    # Trace to ONNX (fp32), and compute torch's outputs once for every gate below; only then merge the traced
    # weights, so torch's copy can be released first.
    example = sample_inputs(spec, graph.trace_case, vocab_size=graph.vocab_size, rng=rng)
    fuse = attention == "fused" and bool(graph.attention_models)
    traced, fused_nodes = _trace(graph, example, folder / "_trace", fuse)
    fused = fused_nodes > 0  # a graph without attention (e.g. a VAE without mid-block attention) stays plain
    # Torch's outputs come from the models' own attention processors (restored after the trace): an independent
    # reference for the fused graph.
    feeds = {key: sample_inputs(spec, case, vocab_size=graph.vocab_size, rng=rng) for key, case in graph.cases.items()}
    expected = reference_outputs(module, spec, feeds)
    weight_bytes = parameter_bytes(module)
    if release_torch:
        module.to("meta")
    # Fused and plain graphs share one external-data file, so a fused component always has one.
    data_path = consolidate(traced, fused_path if fused else onnx_path, spec,
                            external_data=True if fused else external_data if external_data is not None
                            else weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES)
    shutil.rmtree(traced.parent)
    if fused:
        write_unfused(fused_path, onnx_path)
    half = precision == "fp16" and graph.fp16
    info = ComponentInfo(
        name=name, onnx=f"{name}/model.onnx", onnx_data=f"{name}/{data_path.name}" if data_path else None,
        openvino=None, config=f"{name}/config.json", inputs=spec.inputs, outputs=spec.outputs,
        precision="fp16" if half else "fp32", onnx_fused=f"{name}/{fused_path.name}" if fused else None)
    parity: dict[str, ParityReport] = {}

    def gate(key: str, backend: Backend, gated: ComponentInfo, runtime: str, tolerance: Tolerance | None = None):
        parity[f"{name}/{key}"] = check_parity(module, spec, backend.open(root, gated), runtime, feeds, tolerance,
                                               expected=expected)

    # Gate the fp32 graph on onnxruntime (the fused one, which its CPU provider picks), and the plain graph beside
    # it, which TensorRT and onnxruntime's OpenVINO EP run.
    gate("onnxruntime", ort_backend, info, "onnxruntime-fused" if fused else "onnxruntime")
    record = None
    if fused:
        gate("onnxruntime-plain", ort_backend, dataclasses.replace(info, onnx_fused=None), "onnxruntime-plain")
        record = {"fused_nodes": fused_nodes, "softmax_left": count_ops(
            onnx.load(str(fused_path), load_external_data=False)).get("Softmax", 0)}
    # OpenVINO IR from the fp32 graph (fp16-compressed weights in fp16 bundles), gated the same way.
    if ov_backend is not None:
        convert_to_openvino(onnx_path, folder / "openvino_model.xml", compress_to_fp16=half)
        info = dataclasses.replace(info, openvino=f"{name}/openvino_model.xml")
        gate("openvino", ov_backend, info, "openvino-ir-fp16" if half else "openvino-ir",
             OPENVINO_FP16_TOLERANCE if half else None)
    # The fp16 graph replaces the gated fp32 one, gated against fp32 torch.
    if half:
        keep_external = data_path is not None and (fused or external_data or
                                                   weight_bytes // 2 > EXTERNAL_DATA_THRESHOLD_BYTES)
        # A fused component converts its fused graph and derives the plain one from it again, so both keep sharing
        # the (now fp16) weights file.
        data_path = convert_onnx_to_fp16(fused_path if fused else onnx_path, external_data=keep_external)
        if fused:
            write_unfused(fused_path, onnx_path)
        info = dataclasses.replace(info, onnx_data=f"{name}/{data_path.name}" if data_path else None)
        gate("onnxruntime-fp16", ort_backend, info, "onnxruntime-fp16-fused" if fused else "onnxruntime-fp16",
             ONNX_FP16_TOLERANCE)
        if fused:
            gate("onnxruntime-fp16-plain", ort_backend, dataclasses.replace(info, onnx_fused=None),
                 "onnxruntime-fp16-plain", ONNX_FP16_TOLERANCE)
    write_json(root / info.config, graph.config)
    return ExportedGraph(info, parity, {
        "onnx": "fp16 compute, fp32 inputs/outputs" if half else "fp32",
        "openvino": None if ov_backend is None else ("FP16-compressed weights" if half else "FP32"),
    }, record)
