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
from .diffusers_folder import DiffusersComponents, load_diffusers_folder
from .parity import ParityReport, check_parity
from .specs import ONNX_FP32_TOLERANCE, Tolerance

__all__ = [
    "DiffusersComponents", "ExportReport", "ONNX_FP32_TOLERANCE", "ParityReport", "Tolerance", "check_parity",
    "export_bundle", "load_diffusers_folder", "write_tokenizer_files",
]
