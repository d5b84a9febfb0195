"""lcm_edge: AnimateLCM text-to-video on ONNX Runtime and OpenVINO, without torch.

    import lcm_edge
    lcm_edge.load_default()("a red circle moving right", seed=0).save("clip.gif")  # the shipped tiny model

    pipe = lcm_edge.AnimateLCMPipeline.from_bundle("bundle/", backend="onnxruntime", device="cpu")
    result = pipe("a red circle moving right", num_frames=16, seed=0)
    result.save("clip.mp4")
"""

__version__ = "0.1.0"

from .backends import BACKENDS, create_backend
from .bundle import Bundle, load_bundle
from .default import default_bundle_path, load_default
from .errors import (BackendError, BundleError, BundleFormatError, BundleIntegrityError, BundleNotFoundError,
                     GenerationCancelled, GraphInputError, InferenceError, InvalidArgumentError, LcmEdgeError,
                     MissingExtraError, OutputWriteError, ParityError)
from .pipeline import AnimateLCMPipeline, GenerationResult, PromptTruncatedWarning, StepInfo, Timings
from .scheduler import LCMScheduler, SchedulerConfig
from .tokenizer import CLIPTokenizer
from .video import save_video

__all__ = [
    "AnimateLCMPipeline", "BACKENDS", "BackendError", "Bundle", "BundleError", "BundleFormatError",
    "BundleIntegrityError", "BundleNotFoundError", "CLIPTokenizer", "GenerationCancelled", "GenerationResult",
    "GraphInputError", "InferenceError", "InvalidArgumentError", "LCMScheduler", "LcmEdgeError", "MissingExtraError",
    "OutputWriteError", "ParityError", "PromptTruncatedWarning", "SchedulerConfig", "StepInfo", "Timings",
    "create_backend", "default_bundle_path", "load_bundle", "load_default", "save_video", "__version__",
]
