"""The default model that ships inside the package: a tiny AnimateLCM trained here on synthetic clips.

It knows coloured shapes moving on a dark background ("a red circle moving right"), nothing else:
enough for a fresh, offline install to make a clip that follows its prompt, and to check that a
machine's runtime works before large bundles are exported. How it was made (the one command, its
seeds, code version and timings) is in the bundle's provenance: `lcm-edge info` prints it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BundleNotFoundError

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "default_bundle"
DEFAULT_PROMPT = "a red circle moving right"


def default_bundle_path() -> Path:
    """The shipped bundle's folder; an error naming the fix when the install lacks it."""
    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        raise BundleNotFoundError(
            DEFAULT_BUNDLE, "the default model is missing from this install",
            "reinstall lcm-edge (`pip install --force-reinstall lcm-edge`), or pass a bundle of your own "
            "(--bundle DIR)")
    return DEFAULT_BUNDLE


def load_default(*, backend: str = "onnxruntime", device: str | None = None, **backend_options):
    """AnimateLCMPipeline on the shipped default model (checksums verified)."""
    from .pipeline import AnimateLCMPipeline

    return AnimateLCMPipeline.from_bundle(default_bundle_path(), backend=backend, device=device, **backend_options)
