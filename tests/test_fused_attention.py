"""Fused attention: onnxruntime's MultiHeadAttention in the exported UNet and VAE decoder, a plain graph over the
same weights for TensorRT and OpenVINO, each gated against torch; bundles without it load as before."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lcm_edge import InvalidArgumentError, load_bundle
from lcm_edge.backends import create_backend
from lcm_edge.backends.ort_backend import PROVIDERS, select_onnx_graph
from lcm_edge.default import default_bundle_path
from lcm_edge.export import ONNX_FP32_TOLERANCE, check_parity, export_bundle
from lcm_edge.export.attention import (FUSED_OP_KEY, FusedAttnProcessor, count_ops, fused_attention,
                                       single_attention_model, unfuse_attention)
from lcm_edge.export.specs import ShapeCase, sample_inputs, unet_spec, vae_decoder_spec
from lcm_edge.export.wrappers import UNetWrapper, VaeDecoderWrapper


def _ops(bundle, relative: str) -> dict[str, int]:
    return count_ops(onnx.load(str(bundle / relative), load_external_data=False))


def test_exported_graphs_fused_and_plain(tiny_bundle, tiny_components):
    """Every attention of the UNet (spatial, cross and the motion modules' temporal ones) and the VAE decoder's
    mid-block is one MultiHeadAttention node in the fused graph; the plain graph has the Softmax pattern instead,
    over the same weights file."""
    bundle = load_bundle(tiny_bundle)
    attention_modules = len(tiny_components["unet"].attn_processors)
    temporal = sum(1 for name in tiny_components["unet"].attn_processors if "motion_modules" in name)
    assert temporal > 0 and attention_modules > temporal
    expected = {"unet": attention_modules, "vae_decoder": 1}
    for name, count in expected.items():
        component = bundle.components[name]
        assert component.onnx_fused == f"{name}/model_fused.onnx"
        fused, plain = _ops(tiny_bundle, component.onnx_fused), _ops(tiny_bundle, component.onnx)
        assert fused.get(FUSED_OP_KEY) == count and "Softmax" not in fused
        assert plain.get("Softmax") == count and FUSED_OP_KEY not in plain
        for relative in (component.onnx, component.onnx_fused):
            model = onnx.load(str(tiny_bundle / relative), load_external_data=False)
            locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
            assert locations == {"model.onnx_data"}
        assert bundle.provenance["attention"]["components"][name] == {"fused_nodes": count, "softmax_left": 0}
    assert bundle.components["text_encoder"].onnx_fused is None
    # Both graphs passed the export gate; the fused one is what onnxruntime's CPU provider was gated on.
    parity = bundle.provenance["parity"]
    assert {c["runtime"] for c in parity["unet/onnxruntime"]["checks"]} == {"onnxruntime-fused"}
    assert all(c["passed"] for key in ("unet/onnxruntime", "unet/onnxruntime-plain") for c in parity[key]["checks"])


def test_fused_graphs_match_torch(tiny_bundle, tiny_components, one_torch_thread):
    """Fresh shapes, independent of the export gate: onnxruntime CPU opens the fused graph and matches diffusers'
    own attention processors."""
    bundle = load_bundle(tiny_bundle)
    backend = create_backend("onnxruntime", "cpu")
    rng = np.random.default_rng(7)
    for name, spec, module in (("unet", unet_spec(4, 77, 32), UNetWrapper(tiny_components["unet"])),
                               ("vae_decoder", vae_decoder_spec(4), VaeDecoderWrapper(tiny_components["vae"]))):
        session = backend.open(tiny_bundle, bundle.components[name])
        assert session.path.name == "model_fused.onnx"
        cases = {"b1-f5-4x6": sample_inputs(spec, ShapeCase(1, 5, 4, 6), vocab_size=49408, rng=rng)}
        report = check_parity(module, spec, session, "onnxruntime-fused", cases, ONNX_FP32_TOLERANCE)
        assert report.worst_abs() < 1e-5


def test_graph_selection_by_provider(tiny_bundle):
    unet = load_bundle(tiny_bundle).components["unet"]
    for device in ("cpu", "cuda", "directml"):
        assert select_onnx_graph(unet, PROVIDERS[device]) == "unet/model_fused.onnx"
    for device in ("tensorrt", "openvino"):
        assert select_onnx_graph(unet, PROVIDERS[device]) == "unet/model.onnx"
    old = load_bundle(default_bundle_path()).components["unet"]
    assert old.onnx_fused is None
    assert {select_onnx_graph(old, p) for p in PROVIDERS.values()} == {old.onnx}


def test_openvino_fuses_the_plain_graph(tiny_bundle, tiny_components):
    """The bundle's OpenVINO IR, converted from the plain graph, has ScaledDotProductAttention where it attends."""
    ov = pytest.importorskip("openvino")
    bundle = load_bundle(tiny_bundle)
    core = ov.Core()
    for name, count in (("unet", len(tiny_components["unet"].attn_processors)), ("vae_decoder", 1)):
        component = bundle.components[name]
        types = [op.get_type_name() for op in core.read_model(str(tiny_bundle / component.openvino)).get_ordered_ops()]
        assert types.count("ScaledDotProductAttention") == count and "Softmax" not in types


def test_old_bundle_without_fused_graph_generates():
    """The shipped default bundle predates fused attention: it loads, onnxruntime opens its plain graphs and the
    pipeline makes a clip."""
    from lcm_edge import AnimateLCMPipeline

    bundle = load_bundle(default_bundle_path())
    assert all(c.onnx_fused is None for c in bundle.components.values())
    pipe = AnimateLCMPipeline.from_bundle(default_bundle_path(), backend="onnxruntime", device="cpu", threads=1)
    assert pipe.unet.path.name == "model.onnx"
    result = pipe("a red circle moving right", num_frames=2, num_inference_steps=1, seed=0)
    assert result.frames.shape[0] == 2 and result.frames.std() > 0


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 1e-5), (np.float16, 2e-3)])
def test_unfused_pattern_matches_fused_op(dtype, tolerance):
    """unfuse_attention's plain ops compute what MultiHeadAttention computes (cross-attention lengths, fp16 too)."""
    fused = single_attention_model(num_heads=4, head_dim=8, dtype=dtype)
    plain = copy.deepcopy(fused)
    assert unfuse_attention(plain) == 1
    assert count_ops(plain).get("Softmax") == 1 and FUSED_OP_KEY not in count_ops(plain)
    assert all(o.domain != "com.microsoft" for o in plain.opset_import)
    onnx.checker.check_model(plain)
    rng = np.random.default_rng(0)
    feeds = {"query": rng.standard_normal((3, 10, 32)).astype(dtype),
             "key": rng.standard_normal((3, 7, 32)).astype(dtype),
             "value": rng.standard_normal((3, 7, 32)).astype(dtype)}
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for m in (fused, plain)]
    heads = [torch.from_numpy(feeds[k].astype(np.float32)).reshape(3, -1, 4, 8).transpose(1, 2)
             for k in ("query", "key", "value")]
    reference = torch.nn.functional.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(3, 10, 32).numpy()
    for out in outs:
        assert out.dtype == dtype
        np.testing.assert_allclose(out.astype(np.float32), reference, atol=tolerance, rtol=tolerance)


def test_processors_restored_and_foreign_processors_refused(tiny_components):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    unet = tiny_components["unet"]
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with fused_attention(unet) as swapped:
        assert swapped == len(before)
        assert all(isinstance(p, FusedAttnProcessor) for p in unet.attn_processors.values())
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    vae = copy.deepcopy(tiny_components["vae"])
    vae.set_attn_processor(SlicedAttnProcessor(slice_size=1))
    with pytest.raises(InvalidArgumentError) as err:
        with fused_attention(unet, vae):
            pass
    assert err.value.argument == "attention" and "SlicedAttnProcessor" in str(err.value)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


def _export(components, out, **kwargs):
    c = components
    return export_bundle(out, unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                         scheduler_config=dict(c["scheduler"].config), **kwargs)


def test_attention_argument_and_cli(tiny_components, tiny_bundle, tmp_path, capsys, one_torch_thread):
    from diffusers import AnimateDiffPipeline

    from lcm_edge.cli import main as cli_main

    for kwargs, argument in (({"attention": "flash"}, "attention"),
                             ({"attention": "fused", "external_data": False}, "external_data")):
        with pytest.raises(InvalidArgumentError) as err:
            _export(tiny_components, tmp_path / "bad", **kwargs)
        assert err.value.argument == argument
    assert not (tmp_path / "bad").exists()
    # `lcm-edge export --attention plain`: standard ops only, one graph per component, as before fused attention.
    c = tiny_components
    AnimateDiffPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
                        motion_adapter=None, scheduler=c["scheduler"]).save_pretrained(tmp_path / "model")
    assert cli_main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "plain"), "--attention", "plain"]) == 0
    bundle = load_bundle(tmp_path / "plain")
    assert all(c.onnx_fused is None for c in bundle.components.values())
    assert FUSED_OP_KEY not in _ops(tmp_path / "plain", "unet/model.onnx")
    assert not (tmp_path / "plain" / "unet" / "model_fused.onnx").exists()
    assert "unet/onnxruntime-plain" not in bundle.provenance["parity"]
    capsys.readouterr()
    assert cli_main(["info", str(tiny_bundle)]) == 0
    assert "unet: unet/model.onnx + fused attention unet/model_fused.onnx" in capsys.readouterr().out


def test_spilled_trace_consolidates_into_one_shared_weights_file(tiny_components, tmp_path, one_torch_thread):
    """The >2 GiB path at tiny size: a fused trace spilled one file per tensor (as the exporter does for the
    full-size UNet) is merged into one model.onnx_data, and the plain graph written beside it reads the same file."""
    from lcm_edge.export.attention import FUSED_ATTENTION_DOMAIN, FUSED_ATTENTION_OPSET, write_unfused
    from lcm_edge.export.onnx_io import EXTERNAL_DATA_NAME, consolidate, trace_onnx

    spec = vae_decoder_spec(4)  # the smallest graph with attention: the tracing, not the model, is under test
    module = VaeDecoderWrapper(tiny_components["vae"])
    rng = np.random.default_rng(3)
    with fused_attention(tiny_components["vae"]):
        traced = trace_onnx(module, spec, sample_inputs(spec, ShapeCase(2, 3, 4, 6), vocab_size=49408, rng=rng),
                            tmp_path / "trace", custom_opsets={FUSED_ATTENTION_DOMAIN: FUSED_ATTENTION_OPSET})
    spilled = tmp_path / "spilled" / "model.onnx"
    spilled.parent.mkdir()
    onnx.save_model(onnx.load(str(traced)), str(spilled), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list(spilled.parent.iterdir())) > 10  # one file per tensor, as torch spills them
    out = tmp_path / "bundle" / "vae_decoder"
    out.mkdir(parents=True)
    assert consolidate(spilled, out / "model_fused.onnx", spec, external_data=True) == out / EXTERNAL_DATA_NAME
    assert write_unfused(out / "model_fused.onnx", out / "model.onnx") == 1
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", EXTERNAL_DATA_NAME, "model_fused.onnx"]
    feeds = sample_inputs(spec, ShapeCase(1, 2, 6, 4), vocab_size=49408, rng=rng)
    with torch.no_grad():
        expected = module(*[torch.from_numpy(feeds[n]) for n in spec.input_names]).numpy()
    for graph in ("model_fused.onnx", "model.onnx"):
        got = ort.InferenceSession(str(out / graph), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(got, expected, atol=ONNX_FP32_TOLERANCE.atol, rtol=ONNX_FP32_TOLERANCE.rtol)
