"""Reading a bundle: every kind of damage is a typed error naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from lcm_edge import (AnimateLCMPipeline, BundleFormatError, BundleIntegrityError, BundleNotFoundError,
                      load_bundle)
from lcm_edge.bundle import FORMAT_VERSION, MANIFEST_NAME
from lcm_edge.scheduler import LCMScheduler


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_loads_and_describes_itself(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    assert set(bundle.components) == {"text_encoder", "unet", "vae_decoder"}
    assert bundle.model.max_frames == 32 and bundle.model.size_multiple == 4
    assert bundle.scheduler_config.original_inference_steps == 100
    assert bundle.scheduler_config.beta_schedule == "linear"
    assert bundle.has_openvino()
    unet = bundle.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[0].shape == ("batch", 4, "frames", "height", "width")
    # Every file on disk (but the manifest) is listed with its checksum.
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST_NAME} == set(bundle.files)
    assert bundle.provenance["parity"]["unet/onnxruntime"]["worst_max_abs"] < 1e-4


def test_missing_folder(tmp_path):
    with pytest.raises(BundleNotFoundError) as err:
        load_bundle(tmp_path / "nope")
    assert "nope" in str(err.value) and "Fix:" in str(err.value)


def test_missing_file(bundle_copy):
    (bundle_copy / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(BundleNotFoundError) as err:
        load_bundle(bundle_copy)
    assert err.value.path.endswith("vae_decoder/model.onnx")


def test_truncated_onnx(bundle_copy):
    path = bundle_copy / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleIntegrityError) as err:
        load_bundle(bundle_copy)
    assert err.value.path.endswith("unet/model.onnx") and "truncated" in str(err.value)


def test_altered_file_same_size_fails_checksum(bundle_copy):
    path = bundle_copy / "text_encoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError) as err:
        load_bundle(bundle_copy)
    assert err.value.path.endswith("text_encoder/model.onnx") and "sha256" in str(err.value)


def test_corrupt_onnx_without_checksums_is_still_typed(bundle_copy):
    from lcm_edge.backends.ort_backend import select_onnx_graph

    # The graph onnxruntime's CPU provider opens: model_fused.onnx where the bundle has fused attention.
    relative = select_onnx_graph(load_bundle(bundle_copy).components["vae_decoder"], "CPUExecutionProvider")
    path = bundle_copy / relative
    size = path.stat().st_size
    path.write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    with pytest.raises(BundleIntegrityError) as err:
        AnimateLCMPipeline.from_bundle(bundle_copy, verify_checksums=False)
    assert err.value.path.endswith(relative)


def test_unknown_format_version(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError) as err:
        load_bundle(bundle_copy)
    assert err.value.path.endswith(MANIFEST_NAME) and "format_version" in str(err.value)


def test_scheduler_key_missing_is_not_defaulted(bundle_copy):
    path = bundle_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    del config["original_inference_steps"]
    path.write_text(json.dumps(config))
    # Re-hash so the checksum passes and the schema check is what fails.
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    from lcm_edge.bundle import sha256_file

    manifest["files"]["scheduler/scheduler_config.json"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError) as err:
        load_bundle(bundle_copy)
    assert "original_inference_steps" in str(err.value)


def _with_default_timesteps(bundle_copy, schedules):
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    if schedules is None:
        del manifest["model"]["default_timesteps"]
    else:
        manifest["model"]["default_timesteps"] = schedules
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    return bundle_copy


def test_default_timesteps_are_what_that_step_count_samples_at(bundle_copy):
    """model.default_timesteps (a schedule tuned for a step count) drives a generation of that many steps; other
    step counts keep the LCM spacing, and explicit timesteps still win."""
    pipe = AnimateLCMPipeline.from_bundle(_with_default_timesteps(bundle_copy, {"4": [999, 699, 399, 199]}))
    assert pipe.bundle.model.default_timesteps == {"4": (999, 699, 399, 199)}
    args = {"num_frames": 2, "height": 16, "width": 16, "seed": 5}
    tuned = pipe("a red circle moving right", **args)
    explicit = pipe("a red circle moving right", num_inference_steps=None, timesteps=[999, 699, 399, 199], **args)
    assert tuned.timesteps == explicit.timesteps == (999, 699, 399, 199)
    assert (tuned.frames == explicit.frames).all()
    spaced = tuple(LCMScheduler(pipe.bundle.scheduler_config).set_timesteps(4).tolist())
    assert spaced != tuned.timesteps
    other = pipe("a red circle moving right", num_inference_steps=2, **args)
    assert other.timesteps == tuple(LCMScheduler(pipe.bundle.scheduler_config).set_timesteps(2).tolist())
    custom = pipe("a red circle moving right", num_inference_steps=None, timesteps=list(spaced), **args)
    assert custom.timesteps == spaced and not (custom.frames == tuned.frames).all()


def test_a_bundle_without_default_timesteps_loads(bundle_copy):
    """Bundles written before the key existed: every step count keeps the LCM spacing."""
    assert load_bundle(_with_default_timesteps(bundle_copy, None)).model.default_timesteps == {}


@pytest.mark.parametrize("schedules", [{"4": [999, 699, 399]}, {"4": [199, 399, 699, 999]}, {"0": []},
                                       {"four": [999, 699, 399, 199]}, {"2": [1000, 500]}, [999, 699]])
def test_bad_default_timesteps_are_a_format_error(bundle_copy, schedules):
    with pytest.raises(BundleFormatError) as err:
        load_bundle(_with_default_timesteps(bundle_copy, schedules))
    assert err.value.path.endswith(MANIFEST_NAME) and "default_timesteps" in str(err.value)
