"""The tiny decoder's INT8 onnxruntime graph: the shipped decoder passes both gates in INT8 and decodes like the fp32
graph, a failed gate changes nothing, and bad input is refused before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

import lcm_edge
from lcm_edge.bundle import MANIFEST_NAME, load_bundle
from lcm_edge.cli import main as cli_main
from lcm_edge.default import default_bundle_path
from lcm_edge.errors import InvalidArgumentError
from lcm_edge.export.tiny_decoder import (TINY_DECODER, TINY_DECODER_MIN_PSNR_DB, TinyDecoderFidelityError,
                                          _write_manifest_atomically)
from lcm_edge.export.tiny_decoder_int8 import INT8_GRAPH, TINY_DECODER_INT8_MIN_PSNR_DB, quantize_tiny_decoder
from lcm_edge.fidelity import psnr_db

UNSEEN_SEED = 40_123  # neither the gate's (20_000..), the calibration's (21_000..) nor distillation's seeds


@pytest.fixture()
def shipped_copy(tmp_path):
    out = tmp_path / "shipped"
    shutil.copytree(default_bundle_path(), out)
    return out


def test_shipped_tiny_decoder_in_int8_passes_both_gates_and_decodes_like_fp32(tmp_path, capsys):
    out = tmp_path / "int8"
    assert cli_main(["quantize-tiny-decoder", str(default_bundle_path()), "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "now INT8" in printed and "against the full decoder" in printed, printed
    bundle = load_bundle(out)
    tiny = bundle.components[TINY_DECODER]
    assert tiny.onnx == INT8_GRAPH and tiny.graph_precision("onnx") == "int8 qdq-static"
    assert tiny.graph_precision("openvino") == "fp32"
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
    before = {p.relative_to(shipped_copy): p.read_bytes() for p in shipped_copy.rglob("*") if p.is_file()}
    siblings = set(shipped_copy.parent.iterdir())
    m = load_bundle(shipped_copy).model
    clips = [np.random.default_rng(i).standard_normal((1, m.latent_channels, 2, 16, 16), dtype=np.float32)
             for i in range(2)]
    with pytest.raises(TinyDecoderFidelityError, match="TINY_DECODER_INT8_MIN_PSNR_DB") as info:
        quantize_tiny_decoder(shipped_copy, check_latents=clips[:1], calibration_latents=clips[1:],
                              min_int8_psnr_db=200.0, threads=1)
    assert info.value.argument == "min_int8_psnr_db" and info.value.figures["psnr_vs_fp32_db"] < 200.0
    after = {p.relative_to(shipped_copy): p.read_bytes() for p in shipped_copy.rglob("*") if p.is_file()}
    assert after == before and set(shipped_copy.parent.iterdir()) == siblings  # no staging left behind
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


def test_the_openvino_ir_stays_fp32_and_both_runtimes_decode(tiny_bundle, tmp_path):
    """A bundle with OpenVINO IR: only the onnx graph turns INT8; OpenVINO still runs the fp32 IR, and the two
    runtimes' tiny-decoded frames agree."""
    from lcm_edge.export.tiny_decoder import TinyDecoderWeights, add_tiny_decoder, build_decoder, decoder_config

    config = decoder_config(block_out_channels=(8, 8), num_blocks=(1, 1))  # the tiny VAE upsamples 2x
    add_tiny_decoder(tiny_bundle, TinyDecoderWeights(build_decoder(config), config), out=tmp_path / "fp32",
                     min_psnr_db=None)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((1, 4, 2, 8, 8), dtype=np.float32) for _ in range(3)]
    report = quantize_tiny_decoder(tmp_path / "fp32", out=tmp_path / "int8", check_latents=clips[:1],
                                   calibration_latents=clips[1:], min_psnr_db=None, threads=1)
    assert report.figures["fidelity"] is None and report.figures["calibration_prompts"] == "latents given"
    tiny = load_bundle(tmp_path / "int8").components[TINY_DECODER]
    assert tiny.graph_precision("onnx") == "int8 qdq-static" and tiny.graph_precision("openvino") == "fp32"
    assert tiny.openvino == load_bundle(tmp_path / "fp32").components[TINY_DECODER].openvino
    latents = rng.standard_normal((1, 4, 3, 8, 8)).astype(np.float32)
    ov = lcm_edge.AnimateLCMPipeline.from_bundle(tmp_path / "int8", backend="openvino").decode(latents, decoder="tiny")
    ort = lcm_edge.AnimateLCMPipeline.from_bundle(tmp_path / "int8", threads=1).decode(latents, decoder="tiny")
    assert psnr_db(ov.astype(np.float32), ort.astype(np.float32)) >= TINY_DECODER_INT8_MIN_PSNR_DB
