"""OpenVINO static shapes and what they release, low_memory on both backends, bf16 checks and precision="auto"
(issue 24 §2-§4), on the shipped default bundle."""

from __future__ import annotations

import dataclasses
import gc
import sys
import weakref

import numpy as np
import pytest

from lcm_edge import AnimateLCMPipeline, InvalidArgumentError, create_backend, load_bundle
from lcm_edge.backends import openvino_backend
from lcm_edge.cli import main
from lcm_edge.default import default_bundle_path
from lcm_edge.pipeline import create_runtime
from lcm_edge.precision import (BF16_MIN_FRAME_PSNR_DB, PrecisionCheck, auto_precision, device_name, frame_psnr_db,
                                read_records, write_record)

PROMPT = "a blue circle moving up"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(default_bundle_path())


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCM_EDGE_CACHE_DIR", str(tmp_path / "user_cache"))


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov_cache")


def has_bf16() -> bool:
    import openvino as ov

    return "BF16" in openvino_backend.device_capabilities(ov.Core(), "CPU")


def test_static_shapes_compile_per_size_keep_an_lru_and_release_evicted(bundle, ov_cache, monkeypatch):
    backend = create_backend("openvino", cache_dir=ov_cache, shape_cache_size=1)
    read = []
    original = backend.read_model

    def recording_read(path):
        model = original(path)
        read.append(weakref.ref(model))
        return model

    monkeypatch.setattr(backend, "read_model", recording_read)
    pipe = AnimateLCMPipeline(bundle, backend)
    assert pipe.unet.compiled_shapes() == []  # nothing compiled before a call says the shape
    entries = []
    for frames in (2, 3):
        pipe(PROMPT, seed=0, num_frames=frames, num_inference_steps=1)
        entries.append(weakref.ref(pipe.components["unet"].session()._compiled[pipe.unet.compiled_shapes()[-1]]))
    shapes = pipe.unet.compiled_shapes()
    assert [s[0][2] for s in shapes] == [3]  # 2 frames evicted for 3
    gc.collect()
    assert entries[0]() is None, "the evicted compiled shape is still referenced"
    assert entries[1]() is not None
    assert read and all(ref() is None for ref in read), "an ov.Model outlived its compile"
    pipe.components["unet"].session().close()
    assert pipe.unet.compiled_shapes() == []


@pytest.mark.slow  # the dynamic UNet compiles for 10-20 s on 2 loaded cores
def test_static_and_dynamic_shapes_give_the_same_frames(bundle, ov_cache):
    static = AnimateLCMPipeline(bundle, create_backend("openvino", cache_dir=ov_cache))
    dynamic = AnimateLCMPipeline(bundle, create_backend("openvino", static_shapes=False))
    assert "static shapes" in static.backend.describe() and "dynamic shapes" in dynamic.backend.describe()
    a = static(PROMPT, seed=1, num_frames=4)
    b = dynamic(PROMPT, seed=1, num_frames=4)
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1
    assert dynamic.unet.compiled_shapes() == [None]


def test_prepare_compiles_ahead_and_refuses_sizes_before_compiling(bundle, ov_cache, monkeypatch):
    pipe = AnimateLCMPipeline(bundle, create_backend("openvino", cache_dir=ov_cache))
    with pytest.raises(InvalidArgumentError) as err:
        pipe.prepare(height=72)  # not a multiple of 16
    assert err.value.argument == "height" and "Fix" in str(err.value)
    # A bundle exported at a fixed size: its graph fixes the latent height.
    unet = pipe.components["unet"].session()
    model = bundle.model
    latent_height = model.default_height // model.vae_scale_factor
    fixed = tuple(dataclasses.replace(s, shape=(s.shape[0], s.shape[1], s.shape[2], latent_height, s.shape[4]))
                  if s.name == "sample" else s for s in unet.inputs)
    monkeypatch.setattr(unet, "inputs", fixed)
    with pytest.raises(InvalidArgumentError) as err:
        pipe.prepare(height=model.default_height + model.size_multiple)
    assert err.value.argument == "height" and "exported for" in str(err.value)
    assert all(pipe.components[n].session().compiled_shapes() == [] for n in pipe.components)
    pipe.prepare(num_frames=4)
    assert len(unet.compiled_shapes()) == 1
    pipe(PROMPT, seed=0, num_frames=4)
    assert len(unet.compiled_shapes()) == 1  # the call used what prepare compiled


def test_npu_refuses_dynamic_shapes_before_anything():
    with pytest.raises(InvalidArgumentError) as err:
        create_backend("openvino", "NPU", static_shapes=False)
    assert err.value.argument == "static_shapes"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_low_memory_frees_each_graph_before_the_next_and_matches(bundle, backend, ov_cache):
    options = {"cache_dir": ov_cache} if backend == "openvino" else {}
    normal = AnimateLCMPipeline(bundle, create_backend(backend, **options))
    low = AnimateLCMPipeline(bundle, create_runtime(bundle, backend, low_memory=True, **options), low_memory=True)
    assert "low-memory" in low.backend.describe()
    if backend == "onnxruntime":
        assert low.backend.memory_arena is False and normal.backend.memory_arena is True
    else:
        assert low.backend.shape_cache_size == 1
    assert not any(c.is_open for c in low.components.values())
    seen = []

    def step(info):
        seen.append({name: low.components[name].is_open for name in ("text_encoder", "unet", "vae_decoder")})

    result = low(PROMPT, seed=2, num_frames=4, callback=step)
    # While the UNet runs, the text encoder is already closed and the decoder not yet open.
    assert seen and all(s == {"text_encoder": False, "unet": True, "vae_decoder": False} for s in seen)
    assert not any(c.is_open for c in low.components.values())
    np.testing.assert_array_equal(result.frames, normal(PROMPT, seed=2, num_frames=4).frames)


def test_low_memory_decodes_one_frame_at_a_time(bundle):
    low = AnimateLCMPipeline(bundle, create_backend("onnxruntime", low_memory=True), low_memory=True)
    calls = []
    original = low.components["vae_decoder"]._open

    def counting_open():
        session = original()
        run = session._run
        session._run = lambda feeds: calls.append(feeds["latent_sample"].shape[0]) or run(feeds)
        return session

    low.components["vae_decoder"]._open = counting_open
    low(PROMPT, seed=0, num_frames=3, num_inference_steps=1)
    assert calls == [1, 1, 1]


def test_bf16_on_a_cpu_without_it_is_refused_before_compiling(monkeypatch):
    monkeypatch.setattr(openvino_backend, "device_capabilities", lambda core, device: frozenset({"FP32", "INT8"}))
    compiled = []
    monkeypatch.setattr(openvino_backend.OpenVinoSession, "_compile", lambda *a: compiled.append(a))
    with pytest.raises(InvalidArgumentError) as err:
        AnimateLCMPipeline.from_bundle(default_bundle_path(), backend="openvino", precision="bf16")
    assert err.value.argument == "inference_precision"
    assert "AVX512_BF16" in str(err.value) and "Fix: use 'f32'" in str(err.value)
    assert compiled == []
    with pytest.raises(InvalidArgumentError, match="inference_precision"):
        create_backend("openvino", "AUTO", inference_precision="bf16")
    with pytest.raises(InvalidArgumentError) as err:
        create_backend("onnxruntime", precision="bf16")
    assert err.value.argument == "precision" and "openvino" in str(err.value)
    assert main(["generate", PROMPT, "--backend", "openvino", "--precision", "bf16", "-o", "x.gif"]) == 2


def test_frame_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 1  # mse 1 -> 10 log10(255^2) = 48.13 dB
    psnr = frame_psnr_db(a, b)
    assert np.isinf(psnr[0]) and psnr[1] == pytest.approx(48.1308, abs=1e-3)


def _record(bundle, runtime, passed: bool, psnr: float) -> None:
    write_record(bundle, PrecisionCheck(
        backend="openvino", device=runtime.device, device_name=device_name(runtime), precision="bf16",
        threshold_db=BF16_MIN_FRAME_PSNR_DB, min_frame_psnr_db=psnr, mean_frame_psnr_db=psnr, max_abs_grey_levels=3,
        latents_max_abs=0.01, f32_s_per_clip=1.0, precision_s_per_clip=0.5, seeds=(30000,), size=(4, 64, 64),
        passed=passed, cpu_flags=(), checked_utc="2026-12-06T00:00:00Z"))


def test_auto_picks_bf16_only_where_the_device_has_it_and_its_gate_passed(bundle, monkeypatch):
    runtime = create_backend("openvino")
    monkeypatch.setattr(openvino_backend, "device_capabilities", lambda core, device: frozenset({"FP32", "BF16"}))
    assert auto_precision(bundle, runtime)[0] == "f32"  # not gated yet
    _record(bundle, runtime, passed=False, psnr=30.0)
    choice, note = auto_precision(bundle, runtime)
    assert choice == "f32" and "failed its gate" in note
    _record(bundle, runtime, passed=True, psnr=45.0)
    assert auto_precision(bundle, runtime)[0] == "bf16"
    chosen = create_runtime(bundle, "openvino", precision="auto")
    assert chosen.precision == "bf16" and "auto: bf16" in chosen.describe()
    # The same record on a CPU without bf16: f32, whatever was recorded.
    monkeypatch.setattr(openvino_backend, "device_capabilities", lambda core, device: frozenset({"FP32"}))
    assert auto_precision(bundle, runtime)[0] == "f32"
    assert create_runtime(bundle, "onnxruntime", precision="auto").precision == "f32"
    assert load_bundle(default_bundle_path(), verify_checksums=True)  # the bundle's files are untouched


@pytest.mark.skipif(not has_bf16(), reason="this CPU does not compute in bf16 (no AVX512_BF16 / AMX)")
def test_precision_gate_runs_records_and_fails_loudly(bundle, monkeypatch, capsys):
    from lcm_edge import precision

    monkeypatch.setitem(precision.MIN_FRAME_PSNR_DB, "bf16", 200.0)  # a gate no reduced precision passes
    assert main(["check-precision", "--precision", "bf16", "--seeds", "30000", "--frames", "2"]) == 2
    err = capsys.readouterr().err
    assert "bf16-vs-f32" in err and "worst frame PSNR" in err and "FAILED" in err
    record = read_records(bundle)["openvino:CPU:bf16"]
    assert record["passed"] is False and record["threshold_db"] == 200.0 and record["size"][0] == 2
    assert create_runtime(bundle, "openvino", precision="auto").precision == "f32"


def _mapping_rss_kib(path) -> int:
    """Resident kB of this process's mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise over /proc/self/maps is Linux only")
def test_release_mapped_weights_drops_read_only_file_pages_and_keeps_the_data(tmp_path):
    from lcm_edge.backends.openvino_backend import release_mapped_weights

    weights = tmp_path / "unet" / "openvino_model.bin"
    weights.parent.mkdir()
    data = np.arange(8 << 20, dtype=np.float32)  # 32 MiB
    data.tofile(weights)
    scratch = tmp_path / "unet" / "scratch.bin"
    data.tofile(scratch)
    elsewhere = tmp_path / "other.bin"
    data.tofile(elsewhere)
    read_only = np.memmap(weights, dtype=np.float32, mode="r")
    writable = np.memmap(scratch, dtype=np.float32, mode="c")  # private copy-on-write: its writes live only here
    outside = np.memmap(elsewhere, dtype=np.float32, mode="r")
    expected = float(data.sum(dtype=np.float64))
    assert float(read_only.sum(dtype=np.float64)) == expected and float(outside.sum(dtype=np.float64)) == expected
    writable[:] = 7.0
    assert _mapping_rss_kib(weights) > 30 << 10 and _mapping_rss_kib(elsewhere) > 30 << 10

    released = release_mapped_weights(tmp_path / "unet")

    assert released >= 32 << 20
    assert _mapping_rss_kib(weights) < 1 << 10  # dropped
    assert _mapping_rss_kib(elsewhere) > 30 << 10  # another folder: untouched
    assert np.all(writable == 7.0)  # a writable mapping is never released (its written pages would be lost)
    assert float(read_only.sum(dtype=np.float64)) == expected  # the pages fault back in from the file
