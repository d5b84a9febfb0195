"""The tiny decoder's INT8 graphs (onnxruntime; OpenVINO where it has an IR): the shipped decoder passes both gates
in INT8 on each runtime and decodes like the fp32 graph, a failed gate changes nothing, and bad input is refused before
any work."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

import lcm_edge
from lcm_edge.bundle import MANIFEST_NAME, load_bundle
from lcm_edge.cli import main as cli_main
from lcm_edge.default import default_bundle_path
from lcm_edge.errors import InvalidArgumentError, MissingExtraError
from lcm_edge.export import tiny_decoder_int8
from lcm_edge.export.tiny_decoder import (TINY_DECODER, TINY_DECODER_MIN_PSNR_DB, TinyDecoderFidelityError,
                                          _write_manifest_atomically)
from lcm_edge.export.tiny_decoder_int8 import (INT8_GRAPH, INT8_IR, TINY_DECODER_INT8_MIN_PSNR_DB,
                                               quantize_tiny_decoder)
from lcm_edge.fidelity import psnr_db

UNSEEN_SEED = 40_123  # neither the gate's (20_000..), the calibration's (21_000..) nor distillation's seeds


@pytest.fixture()
def shipped_copy(tmp_path):
    out = tmp_path / "shipped"
    shutil.copytree(default_bundle_path(), out)
    return out


@pytest.fixture()
def shipped_with_ir(shipped_copy):
    """The shipped bundle with an fp32 OpenVINO IR of its tiny decoder (converted as the exporter does)."""
    from lcm_edge.export.openvino_ir import convert_to_openvino

    bundle = load_bundle(shipped_copy)
    tiny = bundle.components[TINY_DECODER]
    convert_to_openvino(shipped_copy / tiny.onnx, shipped_copy / TINY_DECODER / "openvino_model.xml")
    _write_manifest_atomically(shipped_copy, bundle, {**bundle.components, TINY_DECODER: dataclasses.replace(
        tiny, openvino=f"{TINY_DECODER}/openvino_model.xml")}, bundle.provenance)
    return shipped_copy


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_shipped_tiny_decoder_in_int8_passes_both_gates_and_decodes_like_fp32(tmp_path, capsys):
    out = tmp_path / "int8"
    assert cli_main(["quantize-tiny-decoder", str(default_bundle_path()), "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "now INT8" in printed and "against the full decoder" in printed, printed
    assert "no OpenVINO IR: only its onnx graph is INT8" in printed, printed
    bundle = load_bundle(out)
    tiny = bundle.components[TINY_DECODER]
    assert tiny.onnx == INT8_GRAPH and tiny.graph_precision("onnx") == "int8 qdq-static"
    assert tiny.openvino is None and tiny.graph_precision("openvino") == "fp32"
    assert f"{TINY_DECODER}/model.onnx" not in bundle.files  # the fp32 graph went once the manifest moved on
    figures = bundle.provenance["tiny_decoder"]["int8"]
    print(f"\n[tiny int8] vs fp32 {figures['psnr_vs_fp32_db']:.1f} dB, vs full {figures['fidelity']['psnr_db']:.2f} dB")
    assert figures["psnr_vs_fp32_db"] >= TINY_DECODER_INT8_MIN_PSNR_DB
    assert figures["fidelity"]["psnr_db"] >= TINY_DECODER_MIN_PSNR_DB
    # The graph really computes its convolutions on int8 weights.
    graph = onnx.load(str(out / INT8_GRAPH))
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert convs and len(int8_weights) == len(convs)
    # On latents no gate saw, the INT8 pipeline decodes what the fp32 tiny decoder does.
    fp32 = lcm_edge.AnimateLCMPipeline.from_bundle(default_bundle_path(), threads=1)
    int8 = lcm_edge.AnimateLCMPipeline.from_bundle(out, threads=1)
    # White and green clips read 25 dB when calibration saw only the add gate's red circle and cat.
    for i, prompt in enumerate(("a white square moving right", "a green circle moving up")):
        latents = fp32(prompt, seed=UNSEEN_SEED + i, output_type="latents").latents
        a, b = fp32.decode(latents, decoder="tiny"), int8.decode(latents, decoder="tiny")
        assert a.shape == b.shape
        psnr = psnr_db(a.astype(np.float32) / 255, b.astype(np.float32) / 255, peak=1.0)
        print(f"[tiny int8] {prompt}: {psnr:.1f} dB against fp32 (uint8 frames)")
        assert psnr >= TINY_DECODER_INT8_MIN_PSNR_DB
    # A second quantization is refused: the graph is INT8 already.
    with pytest.raises(InvalidArgumentError, match="already int8") as info:
        quantize_tiny_decoder(out)
    assert info.value.argument == "bundle"


def test_a_failed_int8_gate_changes_nothing(shipped_copy):
    before = _files(shipped_copy)
    siblings = set(shipped_copy.parent.iterdir())
    m = load_bundle(shipped_copy).model
    clips = [np.random.default_rng(i).standard_normal((1, m.latent_channels, 2, 16, 16), dtype=np.float32)
             for i in range(2)]
    with pytest.raises(TinyDecoderFidelityError, match="TINY_DECODER_INT8_MIN_PSNR_DB") as info:
        quantize_tiny_decoder(shipped_copy, check_latents=clips[:1], calibration_latents=clips[1:],
                              min_int8_psnr_db=200.0, threads=1)
    assert info.value.argument == "min_int8_psnr_db" and info.value.figures["psnr_vs_fp32_db"] < 200.0
    assert _files(shipped_copy) == before and set(shipped_copy.parent.iterdir()) == siblings  # no staging left behind
    load_bundle(shipped_copy)


def test_bad_input_is_refused_before_any_work(shipped_copy, tmp_path):
    bundle = load_bundle(shipped_copy)
    with pytest.raises(InvalidArgumentError) as info:
        quantize_tiny_decoder(shipped_copy, check_latents=[np.zeros((4, 2, 16, 16), np.float32)])
    assert info.value.argument == "check_latents"
    with pytest.raises(InvalidArgumentError) as info:
        quantize_tiny_decoder(shipped_copy, calibration_latents=[])
    assert info.value.argument == "calibration_latents"
    with pytest.raises(InvalidArgumentError) as info:
        quantize_tiny_decoder(shipped_copy, min_int8_psnr_db=float("nan"))
    assert info.value.argument == "min_int8_psnr_db"
    few = tmp_path / "few.txt"
    few.write_text("a red circle moving right\na cat\n")
    with pytest.raises(InvalidArgumentError, match="at least 12") as info:
        quantize_tiny_decoder(shipped_copy, out=tmp_path / "never", calibration_prompts=few)
    assert info.value.argument == "calibration_prompts" and not (tmp_path / "never").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidArgumentError) as info:
        quantize_tiny_decoder(shipped_copy, out=tmp_path / "taken")
    assert info.value.argument == "out"
    # A bundle without a tiny decoder.
    shutil.rmtree(shipped_copy / TINY_DECODER)
    _write_manifest_atomically(shipped_copy, bundle, {k: v for k, v in bundle.components.items() if k != TINY_DECODER},
                               {k: v for k, v in bundle.provenance.items() if k != "tiny_decoder"})
    manifest = (shipped_copy / MANIFEST_NAME).read_text()
    with pytest.raises(InvalidArgumentError, match="has no tiny decoder") as info:
        quantize_tiny_decoder(shipped_copy)
    assert info.value.argument == "bundle" and (shipped_copy / MANIFEST_NAME).read_text() == manifest
    assert TINY_DECODER not in json.loads(manifest)["components"]


def test_the_openvino_ir_turns_int8_passes_its_gates_and_decodes_like_fp32(shipped_with_ir, tmp_path):
    """A tiny decoder with an OpenVINO IR: NNCF quantizes the IR too, gated on OpenVINO; the pipeline runs it."""
    import openvino as ov

    out = tmp_path / "int8"
    report = quantize_tiny_decoder(shipped_with_ir, out=out, threads=1)
    print("\n" + report.summary())
    assert report.graphs == ("onnx", "openvino") and "openvino graph now INT8" in report.summary()
    bundle = load_bundle(out)
    tiny = bundle.components[TINY_DECODER]
    assert tiny.onnx == INT8_GRAPH and tiny.openvino == INT8_IR
    assert tiny.graph_precision("openvino") == "int8 nncf-ptq" and tiny.graph_precision("onnx") == "int8 qdq-static"
    assert f"{TINY_DECODER}/openvino_model_int8.bin" in bundle.files
    assert not {f"{TINY_DECODER}/openvino_model.xml", f"{TINY_DECODER}/openvino_model.bin"} & set(bundle.files)
    assert not (out / TINY_DECODER / "openvino_model.xml").exists()
    figures = bundle.provenance["tiny_decoder"]["int8"]["openvino"]
    assert figures["recipe"] == "nncf-ptq" and figures["psnr_vs_fp32_db"] >= TINY_DECODER_INT8_MIN_PSNR_DB
    assert figures["fidelity"]["psnr_db"] >= TINY_DECODER_MIN_PSNR_DB
    # Every convolution of the IR reads int8 weights.
    model = ov.Core().read_model(str(out / INT8_IR))
    kinds = Counter(op.get_type_name() for op in model.get_ops())
    int8_constants = [op for op in model.get_ops()
                      if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert kinds["Convolution"] and len(int8_constants) == kinds["Convolution"] and kinds["FakeQuantize"]
    # On latents no gate saw, the OpenVINO INT8 pipeline decodes what the fp32 IR does.
    fp32 = lcm_edge.AnimateLCMPipeline.from_bundle(shipped_with_ir, backend="openvino")
    int8 = lcm_edge.AnimateLCMPipeline.from_bundle(out, backend="openvino")
    latents = fp32("a green circle moving up", seed=UNSEEN_SEED, output_type="latents").latents
    a, b = fp32.decode(latents, decoder="tiny"), int8.decode(latents, decoder="tiny")
    psnr = psnr_db(a.astype(np.float32) / 255, b.astype(np.float32) / 255, peak=1.0)
    print(f"[tiny int8 openvino] unseen clip: {psnr:.1f} dB against the fp32 IR (uint8 frames)")
    assert a.shape == b.shape and psnr >= TINY_DECODER_INT8_MIN_PSNR_DB
    with pytest.raises(InvalidArgumentError, match="already int8"):
        quantize_tiny_decoder(out)


def test_a_broken_openvino_quantization_fails_its_gate_and_changes_nothing(shipped_with_ir, monkeypatch):
    """The OpenVINO INT8 IR has its own gate: an IR whose int8 weights are wrong fails it even though the onnx graph
    passed, and the bundle keeps its fp32 graphs."""
    import openvino as ov

    real_quantize_ir = tiny_decoder_int8.quantize_ir

    def negated_weights(src, dst, calibration, vae_scaling_factor):
        record = real_quantize_ir(src, dst, calibration, vae_scaling_factor)
        model = ov.Core().read_model(str(dst))
        for op in model.get_ops():
            if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8:
                flipped = ov.op.Constant(-op.get_data().astype(np.int16).clip(-127, 127).astype(np.int8))
                op.output(0).replace(flipped.output(0))
        ov.save_model(model, str(dst) + ".tmp.xml", compress_to_fp16=False)
        del model
        for suffix in (".xml", ".bin"):
            (dst.parent / (dst.name + ".tmp" + suffix)).replace(dst.with_suffix(suffix))
        return record

    monkeypatch.setattr(tiny_decoder_int8, "quantize_ir", negated_weights)
    before, siblings = _files(shipped_with_ir), set(shipped_with_ir.parent.iterdir())
    m = load_bundle(shipped_with_ir).model
    clips = [np.random.default_rng(i).standard_normal((1, m.latent_channels, 2, 16, 16), dtype=np.float32)
             for i in range(2)]
    with pytest.raises(TinyDecoderFidelityError, match="OpenVINO frames") as info:
        quantize_tiny_decoder(shipped_with_ir, check_latents=clips[:1], calibration_latents=clips[1:],
                              min_psnr_db=None, threads=1)
    assert info.value.argument == "min_int8_psnr_db"
    assert info.value.figures["recipe"] == "nncf-ptq" and info.value.figures["psnr_vs_fp32_db"] < 20.0
    assert _files(shipped_with_ir) == before and set(shipped_with_ir.parent.iterdir()) == siblings
    assert load_bundle(shipped_with_ir).components[TINY_DECODER].quantization is None


def test_an_ir_without_nncf_is_an_error_before_any_work(shipped_with_ir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` raises ImportError
    before = _files(shipped_with_ir)
    with pytest.raises(MissingExtraError, match=r"lcm-edge\[int8\]"):
        quantize_tiny_decoder(shipped_with_ir, out=tmp_path / "never")
    with pytest.raises(MissingExtraError, match=r"lcm-edge\[int8\]"):
        quantize_tiny_decoder(shipped_with_ir)
    assert not (tmp_path / "never").exists() and _files(shipped_with_ir) == before


def test_a_bundle_with_an_int8_onnx_graph_gets_its_ir_quantized_alone(shipped_copy):
    """A bundle whose onnx graph went INT8 before its tiny decoder had an IR: only the IR is quantized now, and the
    onnx graph and its figures stay."""
    from lcm_edge.export.openvino_ir import convert_to_openvino

    m = load_bundle(shipped_copy).model
    clips = [np.random.default_rng(i).standard_normal((1, m.latent_channels, 2, 16, 16), dtype=np.float32)
             for i in range(2)]
    options = dict(check_latents=clips[:1], calibration_latents=clips[1:], min_psnr_db=None, threads=1)
    assert quantize_tiny_decoder(shipped_copy, **options).graphs == ("onnx",)
    bundle = load_bundle(shipped_copy)
    tiny = bundle.components[TINY_DECODER]
    convert_to_openvino(default_bundle_path() / TINY_DECODER / "model.onnx",
                        shipped_copy / TINY_DECODER / "openvino_model.xml")
    _write_manifest_atomically(shipped_copy, bundle, {**bundle.components, TINY_DECODER: dataclasses.replace(
        tiny, openvino=f"{TINY_DECODER}/openvino_model.xml")}, bundle.provenance)
    onnx_int8 = (shipped_copy / INT8_GRAPH).read_bytes()
    report = quantize_tiny_decoder(shipped_copy, **options)
    assert report.graphs == ("openvino",) and "onnx graph now" not in report.summary()
    after = load_bundle(shipped_copy)
    assert after.components[TINY_DECODER].quantization == {"onnx": {"precision": "int8", "recipe": "qdq-static"},
                                                           "openvino": {"precision": "int8", "recipe": "nncf-ptq"}}
    assert (shipped_copy / INT8_GRAPH).read_bytes() == onnx_int8
    record = after.provenance["tiny_decoder"]["int8"]
    assert record["recipe"] == "qdq-static" and record["openvino"]["psnr_vs_fp32_db"] >= TINY_DECODER_INT8_MIN_PSNR_DB
    assert not (shipped_copy / TINY_DECODER / "openvino_model.xml").exists()
