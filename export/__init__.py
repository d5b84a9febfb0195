"""lcm_edge.export: PyTorch (diffusers/transformers) components -> a verified bundle.

Needs the `[export]` extra (torch, diffusers, transformers, onnx, openvino).
"""

from lcm_edge.errors import MissingExtraError

try:
    import diffusers  # noqa: F401
    import onnx  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:  # re-raised as the install command the user needs
    raise MissingExtraError("lcm_edge.export", "export", exc.name or "torch") from exc

from .bundle_writer import ExportReport, export_bundle, write_tokenizer_files
from .checkpoints import load_ldm_checkpoint
from .diffusers_folder import DiffusersComponents, load_diffusers_folder
from .lora import LORA_FUSION_TOLERANCE, FusionReport, LoraFile, LoraRequest, fuse_loras, load_lora
from .motion_module import load_motion_module
from .parity import ParityReport, check_parity
from .precision import ONNX_FP16_TOLERANCE, OPENVINO_FP16_TOLERANCE
from .quantize import (InsufficientMemoryError, QuantizationGateError, QuantizeReport, int8_traits,
                       quantize_bundle)
from .sources import load_components
from .specs import ONNX_FP32_TOLERANCE, Tolerance
from .weights import WeightsMismatchError

__all__ = [
    "DiffusersComponents", "ExportReport", "FusionReport", "LORA_FUSION_TOLERANCE", "LoraFile", "LoraRequest",
    "ONNX_FP16_TOLERANCE", "ONNX_FP32_TOLERANCE", "OPENVINO_FP16_TOLERANCE", "ParityReport", "Tolerance",
    "WeightsMismatchError", "check_parity", "export_bundle", "fuse_loras", "load_components", "load_diffusers_folder",
    "load_ldm_checkpoint", "load_lora", "load_motion_module", "write_tokenizer_files",
    "InsufficientMemoryError", "QuantizationGateError", "QuantizeReport", "int8_traits", "quantize_bundle",
]
