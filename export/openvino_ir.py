"""ONNX -> OpenVINO IR (openvino_model.xml + .bin), the layout optimum-intel uses."""

from __future__ import annotations

from pathlib import Path

from lcm_edge.errors import MissingExtraError


def convert_to_openvino(onnx_path: Path, xml_path: Path, *, compress_to_fp16: bool = False) -> Path:
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingExtraError("OpenVINO IR export", "export", "openvino") from exc
    model = ov.convert_model(str(onnx_path))
    # FP32 IR by default: the parity gate compares against fp32 torch.
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path
