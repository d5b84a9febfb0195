"""INT8 bundles (lcm_edge.export.quantize): the whole path on the tiny model, its gates, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nncf")
pytest.importorskip("onnx_ir")

import lcm_edge  # noqa: E402
from lcm_edge.bundle import load_bundle  # noqa: E402
from lcm_edge.default import default_bundle_path  # noqa: E402
from lcm_edge.errors import InvalidArgumentError  # noqa: E402
from lcm_edge.export import quantize as Q  # noqa: E402
from lcm_edge.export.calibration import (CALIBRATION_SEED_BASE, HELD_OUT_SEED_BASE, plan_calibration,  # noqa: E402
                                         read_prompts)

# Small calibration: 2 frames at 32x32 (the tiny model's default size), 4 UNet inputs = one 4-step clip.
SMALL = dict(samples=4, frames=2, height=32, width=32, gate_clips=1)


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if name in p.name)


@pytest.fixture(scope="module")
def ort_hybrid(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "ort_hybrid"
    report = Q.quantize_bundle(tiny_bundle, out, backend="onnxruntime", recipe="hybrid", **SMALL)
    return out, report


def test_cpu_traits_from_flags():
    """reduce_range / overflow fix come from the flags: AVX2-only and AVX-512F without VNNI saturate, VNNI does not."""
    avx2 = Q.int8_traits({"fma", "avx2"})
    assert (avx2.vnni, avx2.reduce_range, avx2.overflow_fix) == (False, True, "enable")
    avx512 = Q.int8_traits({"avx2", "avx512f", "avx512bw"})
    assert (avx512.vnni, avx512.reduce_range) == (False, True)
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        vnni = Q.int8_traits({"avx2", flag})
        assert (vnni.vnni, vnni.reduce_range, vnni.overflow_fix) == (True, False, "disable")
    assert Q.int8_traits(set()).reduce_range  # unknown CPU: the safe choice


def test_read_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n\nprocessor\t: 1\nflags\t: avx2\n")
    assert Q.read_cpu_flags(info) >= {"avx2", "avx512f", "avx512_vnni"}
    assert Q.read_cpu_flags(tmp_path / "missing") == frozenset()


def test_onnxruntime_hybrid_bundle(ort_hybrid, tiny_bundle):
    """The INT8 bundle loads, records per-graph precision and the calibration, and the runtime picks its graphs."""
    out, report = ort_hybrid
    bundle = load_bundle(out)
    unet = bundle.components["unet"]
    assert unet.graph_precision("onnx") == "int8 hybrid"
    assert unet.graph_precision("openvino") == "fp32"  # the OpenVINO IR was not quantized
    assert bundle.components["text_encoder"].graph_precision("onnx") == "int8 weight-only"
    assert bundle.components["vae_decoder"].graph_precision("onnx") == "fp32"
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / unet.onnx)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMulNBits"} <= ops
    int8 = bundle.provenance["int8"]
    calibration = int8["calibration"]
    from lcm_edge.scheduler import LCMScheduler

    lcm_spacing = [int(t) for t in LCMScheduler(bundle.scheduler_config).set_timesteps(4)]
    assert calibration["samples"] == 4 and calibration["timesteps"] == lcm_spacing  # no tuned schedule: LCM's
    assert calibration["seed_base"] == CALIBRATION_SEED_BASE and calibration["held_out_seed_base"] == HELD_OUT_SEED_BASE
    assert calibration["prompts_sha256"] == read_prompts(Q.DEFAULT_PROMPTS_FILE).sha256
    figures = int8["figures"]["backends"]["onnxruntime"]
    assert set(figures["unet"]["per_step"]) == {str(t) for t in lcm_spacing}
    for step in figures["unet"]["per_step"].values():
        assert step["min_cosine"] >= Q.UNET_INT8_GATE.min_cosine
    assert figures["end_to_end"]["mean_psnr_db"] >= Q.FRAMES_INT8_MIN_PSNR_DB
    assert "reduce_range" in figures["unet"] and "vnni" in int8["cpu"]
    # Runs: the INT8 graph on onnxruntime, close to the fp32 bundle's frames at the same seed.
    fp32 = lcm_edge.AnimateLCMPipeline.from_bundle(tiny_bundle)("a red circle", num_frames=2, seed=3)
    q = lcm_edge.AnimateLCMPipeline.from_bundle(out)("a red circle", num_frames=2, seed=3)
    assert Q.frames_psnr(fp32.frames, q.frames) >= Q.FRAMES_INT8_MIN_PSNR_DB
    assert out.stat().st_size and not _leftovers(out.parent, ".ort_hybrid.")
    assert "onnxruntime hybrid" in report.summary()


def test_info_shows_precision_and_recipe(ort_hybrid, capsys):
    from lcm_edge.cli import main

    assert main(["info", str(ort_hybrid[0])]) == 0
    text = capsys.readouterr().out
    assert "unet: unet/model.onnx (int8 hybrid)" in text and "(fp32)" in text
    assert "int8: recipe hybrid for onnxruntime" in text


def test_already_quantized_bundle_is_refused(ort_hybrid, tmp_path):
    with pytest.raises(InvalidArgumentError, match="already quantized") as err:
        Q.quantize_bundle(ort_hybrid[0], tmp_path / "again", backend="onnxruntime", **SMALL)
    assert err.value.argument == "bundle"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, argument", [
    (dict(backend="tensorrt"), "backend"),
    (dict(backend="openvino", recipe="int4"), "recipe"),
    (dict(frames=999), "num_frames"),
    (dict(height=30), "height"),
    (dict(samples=0), "samples"),
    (dict(gate_clips=0), "gate_clips"),
    (dict(adherence_prompts=5), "adherence_prompts"),  # the tiny model is not the default model
])
def test_bad_arguments(tiny_bundle, tmp_path, kwargs, argument):
    args = {**SMALL, "backend": "onnxruntime", "recipe": "hybrid", **kwargs}
    with pytest.raises(InvalidArgumentError) as err:
        Q.quantize_bundle(tiny_bundle, tmp_path / "out", **args)
    assert err.value.argument == argument and "Fix:" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_prompt_files(tiny_bundle, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    for path, problem in ((empty, "holds no prompts"), (tmp_path / "missing.txt", "cannot read"),
                          (binary, "cannot read")):
        with pytest.raises(InvalidArgumentError, match=problem) as err:
            Q.quantize_bundle(tiny_bundle, tmp_path / "out", backend="onnxruntime", calibration_prompts=path, **SMALL)
        assert err.value.argument == "calibration_prompts"
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_bundle, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidArgumentError, match="already exists") as err:
        Q.quantize_bundle(tiny_bundle, tmp_path / "out", backend="onnxruntime", **SMALL)
    assert err.value.argument == "out"


def test_too_little_memory_is_refused_before_work(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    plan = plan_calibration(bundle, samples=4, frames=2, height=32, width=32)
    need = Q.estimate_peak_bytes(bundle, plan, "onnxruntime")
    assert need > 3 * Q._component_bytes(bundle, "unet")
    # More frames and pixels need more: the estimate grows with the shapes.
    assert Q.estimate_peak_bytes(bundle, plan_calibration(bundle, samples=4, frames=8, height=64, width=64),
                                 "onnxruntime") > need
    with pytest.raises(Q.InsufficientMemoryError, match="GiB") as err:
        Q.quantize_bundle(tiny_bundle, tmp_path / "out", backend="both", memory_limit_bytes=need - 1, **SMALL)
    assert err.value.argument == "frames"
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_whose_weight_copies_do_not_fit_is_refused_naming_the_recipe(tiny_bundle, tmp_path):
    """The full recipe holds more copies of the UNet's weights than hybrid: with room for hybrid's only, full is
    refused up front, naming `recipe` and the recipe that fits (no calibration shape would help)."""
    bundle = load_bundle(tiny_bundle)
    weights = Q._component_bytes(bundle, "unet")
    copies = Q.WEIGHT_COPIES["onnxruntime"]
    assert copies["full"] > copies["hybrid"]
    limit = Q.BASELINE_BYTES + int((copies["hybrid"] + copies["full"]) / 2 * weights)
    with pytest.raises(Q.InsufficientMemoryError, match="full recipe") as err:
        Q.quantize_bundle(tiny_bundle, tmp_path / "out", backend="onnxruntime", recipe="full",
                          memory_limit_bytes=limit, **SMALL)
    assert err.value.argument == "recipe" and "recipe='hybrid'" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    # Hybrid is judged on its whole estimate (weights and shapes): exactly that much memory is enough for it.
    plan = plan_calibration(bundle, samples=4, frames=2, height=32, width=32)
    hybrid_need = Q.estimate_peak_bytes(bundle, plan, "onnxruntime", "hybrid")
    assert Q.estimate_peak_bytes(bundle, plan, "onnxruntime", "full") > hybrid_need
    fits = Q.check_resources(bundle, plan, ["onnxruntime"], tmp_path, hybrid_need, "hybrid")
    assert fits["estimated_peak_bytes"] == hybrid_need


def test_broken_quantization_fails_the_gate_and_writes_nothing(tiny_bundle, tmp_path, monkeypatch):
    """A quantizer whose scales are corrupted (x4 on every DequantizeLinear scale) is caught by the per-step gate."""
    import onnx
    from onnx import numpy_helper

    real = Q.ort_quantize_unet

    def corrupted(src, dst, *args, **kwargs):
        result = real(src, dst, *args, **kwargs)
        model = onnx.load(str(dst))
        inits = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[1] in inits:
                scale = inits[node.input[1]]
                scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(4), scale.name))
        onnx.save_model(model, str(dst))
        return result

    monkeypatch.setattr(Q, "ort_quantize_unet", corrupted)
    with pytest.raises(Q.QuantizationGateError, match="unet-int8-vs-fp32-per-step") as err:
        Q.quantize_bundle(tiny_bundle, tmp_path / "out", backend="onnxruntime", recipe="hybrid", **SMALL)
    assert any("t=999" in f for f in err.value.failures)
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary folder, no calibration samples


def test_cli_quantize_names_the_flag(tiny_bundle, tmp_path, capsys):
    from lcm_edge.cli import main

    assert main(["quantize", str(tiny_bundle), "--out", str(tmp_path / "q"), "--backend", "openvino",
                 "--recipe", "w4"]) == 2
    assert "--recipe: openvino has no recipe 'w4'" in capsys.readouterr().err
    assert main(["quantize", str(tiny_bundle), "--out", str(tmp_path / "q"), "--frames", "2", "--height", "32",
                 "--width", "30"]) == 2
    assert "--width:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# OpenVINO full W8A8 on the tiny model: OpenVINO 2026.4's CPU plugin fails to compile it (its low-precision
# ReshapeTransformation on the tiny UNet's 8 heads of width 1); the default model (real head widths) compiles.
@pytest.mark.slow
@pytest.mark.parametrize("model, backend, recipe", [("tiny", "openvino", "hybrid"), ("default", "openvino", "full"),
                                                    ("tiny", "onnxruntime", "full")])
def test_other_recipes(tiny_bundle, tmp_path, model, backend, recipe):
    out = tmp_path / "q"
    source = tiny_bundle if model == "tiny" else default_bundle_path()
    Q.quantize_bundle(source, out, backend=backend, recipe=recipe, adherence_prompts=0, **SMALL)
    bundle = load_bundle(out)
    graph = "onnx" if backend == "onnxruntime" else "openvino"
    assert bundle.components["unet"].graph_precision(graph) == f"int8 {recipe}"
    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(out, backend=backend)
    assert pipe.unet.path.name == ("model.onnx" if backend == "onnxruntime" else "openvino_model.xml")
    assert pipe("a red circle", num_frames=2, height=32, width=32, seed=0).frames.shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_default_bundle_both_backends_with_adherence(tmp_path):
    """The shipped model, both runtimes, the behavioural gate on a few prompts (the CLI's default is 60)."""
    out = tmp_path / "default_int8"
    report = Q.quantize_bundle(default_bundle_path(), out, backend="both", recipe="hybrid", samples=8, frames=16,
                               height=64, width=64, gate_clips=1, adherence_prompts=6)
    figures = json.loads((out / "bundle.json").read_text())["provenance"]["int8"]["figures"]["backends"]
    for backend in ("onnxruntime", "openvino"):
        adherence = figures[backend]["adherence"]
        assert adherence["clips"] == 6 and adherence["int8"] >= adherence["fp32"] - Q.ADHERENCE_INT8_MARGIN
    assert "adherence int8" in report.summary()
    shutil.rmtree(out)


def test_malformed_quantization_record_is_a_format_error(ort_hybrid, tmp_path):
    from lcm_edge.errors import BundleFormatError

    copy = tmp_path / "copy"
    shutil.copytree(ort_hybrid[0], copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["components"]["unet"]["quantization"] = {"onnx": "int8"}
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match="quantization"):
        load_bundle(copy)


def test_export_int8_checks_its_arguments_before_exporting(tmp_path, capsys):
    """`export --int8` reads the prompts file and the output folder before minutes of export (the base does not
    even exist here: the INT8 arguments are refused first)."""
    from lcm_edge.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    base = ["export", "--base", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "b"), "--int8"]
    assert main(base + ["--calibration-prompts", str(empty)]) == 2
    assert "--calibration-prompts:" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    assert main(base + ["full"]) == 2
    assert "--out:" in capsys.readouterr().err
