from __future__ import annotations

import pytest

from clip_vocab import write_sd15_tokenizer
from tiny_models import make_tiny_components


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models do not parallelise; on a shared 2-core machine extra threads only thrash (10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sd15_tokenizer_dir(tmp_path_factory):
    return write_sd15_tokenizer(tmp_path_factory.mktemp("sd15_tokenizer"))


@pytest.fixture(scope="session")
def ours(sd15_tokenizer_dir):
    """lcm_edge's runtime tokenizer on SD1.5's real vocabulary (the tokenizer tests compare it with `reference`)."""
    from lcm_edge.tokenizer import CLIPTokenizer

    return CLIPTokenizer.from_folder(sd15_tokenizer_dir)


@pytest.fixture(scope="session")
def reference(sd15_tokenizer_dir):
    """transformers' CLIPTokenizer on the same files: the tokenizer tests' independent reference."""
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(sd15_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_components(sd15_tokenizer_dir):
    return make_tiny_components(sd15_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_components):
    """One exported tiny bundle (ONNX + OpenVINO IR), shared read-only by the runtime tests."""
    from lcm_edge.export import export_bundle

    c = tiny_components
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    report = export_bundle(out, unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"],
                           tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config),
                           openvino=True, default_frames=8, provenance={"fixture": "tests/tiny_models.py"})
    print(report.summary())
    return out
