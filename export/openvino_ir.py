"""ONNX -> OpenVINO IR (openvino_model.xml + .bin), the layout optimum-intel uses."""

from __future__ import annotations

from pathlib import Path

from lcm_edge.errors import MissingExtraError

# The export gates each graph at several input shapes in turn; with the runtime's static shapes each one is compiled
# on its own, and a compiled graph holds about twice the IR's weights (its own copy beside the mapped .bin). The
# runtime keeps 2 compiled shapes per graph; with 2 gate shapes, 2 compiled full-size UNets took the fp32 export's
# peak RSS from 12 to 20 GiB. The gate keeps one at a time.
GATE_SHAPE_CACHE_SIZE = 1


def openvino_gate_backend(device: str = "CPU"):
    """The OpenVINO backend the export's parity gates run: the runtime's defaults (static shapes, f32), one compiled
    shape per graph at a time."""
    from lcm_edge.backends import create_backend

    return create_backend("openvino", device, shape_cache_size=GATE_SHAPE_CACHE_SIZE)


def convert_to_openvino(onnx_path: Path, xml_path: Path, *, compress_to_fp16: bool = False) -> Path:
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingExtraError("OpenVINO IR export", "export", "openvino") from exc
    model = ov.convert_model(str(onnx_path))
    # FP32 IR by default: the parity gate compares against fp32 torch.
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path
