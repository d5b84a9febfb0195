"""The exporter: gates fail loudly, nothing half-written is left, a diffusers folder exports via the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from lcm_edge import AnimateLCMPipeline, InvalidArgumentError, ParityError, load_bundle
from lcm_edge.backends import create_backend
from lcm_edge.cli import main as cli_main
from lcm_edge.export import check_parity, export_bundle
from lcm_edge.export import graph_export
from lcm_edge.export.specs import ShapeCase, sample_inputs, text_encoder_spec
from lcm_edge.export.wrappers import TextEncoderWrapper


def _final_norm_bias(model) -> str:
    return next(n for n, _ in model.named_parameters() if n.endswith("final_layer_norm.bias"))


def test_gate_lists_every_failing_output(tiny_bundle, tiny_components):
    """A torch model that differs from the graph (one weight nudged) fails every case, loudly."""
    changed = copy.deepcopy(tiny_components["text_encoder"])
    with torch.no_grad():
        dict(changed.named_parameters())[_final_norm_bias(changed)].add_(0.05)
    spec = text_encoder_spec(77, 32)
    rng = np.random.default_rng(0)
    cases = {f"b{b}": sample_inputs(spec, ShapeCase(b, 1, 1, 1), vocab_size=49408, rng=rng) for b in (1, 2)}
    session = create_backend("onnxruntime").open(tiny_bundle, load_bundle(tiny_bundle).components["text_encoder"])
    with pytest.raises(ParityError) as err:
        check_parity(TextEncoderWrapper(changed), spec, session, "onnxruntime", cases)
    assert len(err.value.failures) == 2
    assert all("last_hidden_state" in f and "onnx-fp32-vs-torch" in f for f in err.value.failures)
    # The unchanged model passes the same gate.
    report = check_parity(TextEncoderWrapper(tiny_components["text_encoder"]), spec, session, "onnxruntime", cases)
    assert report.worst_abs() < 1e-4


def _export(components, out, **kwargs):
    c = components
    return export_bundle(out, unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                         scheduler_config=dict(c["scheduler"].config), **kwargs)


def test_failed_gate_leaves_nothing(tiny_components, tmp_path, monkeypatch):
    def failing_gate(*args, **kwargs):
        raise ParityError("unet onnxruntime vs torch", ["unet[...].out_sample: max abs 1"])

    monkeypatch.setattr(graph_export, "check_parity", failing_gate)
    with pytest.raises(ParityError):
        _export(tiny_components, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_checks_components(tiny_components, tiny_bundle, tmp_path):
    with pytest.raises(InvalidArgumentError) as err:
        _export(tiny_components, tiny_bundle)
    assert err.value.argument == "out"
    with pytest.raises(InvalidArgumentError) as err:
        _export(tiny_components, tmp_path / "missing" / "bundle")
    assert err.value.argument == "out"
    with pytest.raises(InvalidArgumentError) as err:
        _export(tiny_components, tmp_path / "b", default_frames=64)
    assert err.value.argument == "default_frames"
    for schedules in ({4: [999, 699, 399]}, {4: [199, 399, 699, 999]}, {0: []}, {101: list(range(101, 0, -1))},
                      [999, 699]):
        with pytest.raises(InvalidArgumentError) as err:
            _export(tiny_components, tmp_path / "c", default_timesteps=schedules)
        assert err.value.argument == "default_timesteps"
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_external_data_bundle_generates(tiny_components, tmp_path):
    """Large-model path (one model.onnx_data per graph) exercised at tiny size."""
    report = _export(tiny_components, tmp_path / "ext", external_data=True)
    bundle = load_bundle(tmp_path / "ext")
    assert bundle.components["unet"].onnx_data == "unet/model.onnx_data"
    # model_fused.onnx: the same graph with fused attention, over the same model.onnx_data (export/attention.py).
    assert sorted(p.name for p in (tmp_path / "ext" / "unet").iterdir()) == ["config.json", "model.onnx",
                                                                            "model.onnx_data", "model_fused.onnx"]
    assert report.parity["unet/onnxruntime"].worst_abs() < 1e-4
    result = AnimateLCMPipeline.from_bundle(tmp_path / "ext")("a cat", num_frames=2, height=16, width=16, seed=0)
    assert result.frames.shape == (2, 16, 16, 3)


def test_cli_export_generate_info(tiny_components, tmp_path, capsys):
    from diffusers import AnimateDiffPipeline

    c = tiny_components
    model_dir = tmp_path / "model"
    AnimateDiffPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
                        motion_adapter=None, scheduler=c["scheduler"]).save_pretrained(model_dir)
    bundle = tmp_path / "bundle"
    assert cli_main(["export", str(model_dir), "--out", str(bundle), "--original-inference-steps", "50",
                     "--default-timesteps", "4=999,699,399,199"]) == 0
    assert json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())["original_inference_steps"] == 50
    assert "unet/onnxruntime: worst max abs" in capsys.readouterr().out

    assert cli_main(["info", str(bundle)]) == 0
    info = capsys.readouterr().out
    assert "all sha256 verified" in info and "sample float32['batch', 4, 'frames', 'height', 'width']" in info
    # Output shapes in the graph are the spec's, static axes included (not tracer-generated names).
    assert "out_sample float32['batch', 4, 'frames', 'height', 'width']" in info
    assert "4 steps sample at timesteps 999, 699, 399, 199 (tuned for this model)" in info

    clip = tmp_path / "clip.gif"
    assert cli_main(["generate", "a red circle moving right", "--bundle", str(bundle), "--frames", "4",
                     "--height", "16", "--width", "24", "--seed", "5", "-o", str(clip)]) == 0
    captured = capsys.readouterr()
    assert clip.stat().st_size > 0
    assert "timings: text encoder" in captured.out and "step 4/4" in captured.err and "t=699" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--bundle", "{tmp}/none", "-o", "{tmp}/c.mp4"], "bundle folder does not exist"),
    (["generate", "x", "--bundle", "{bundle}", "-o", "{tmp}/nodir/c.mp4"], "does not exist"),
    (["generate", "x", "--bundle", "{bundle}", "-o", "{tmp}/c.webm"], "extension"),
    (["generate", "x", "--bundle", "{bundle}", "--backend", "openvino", "--device", "NPU", "-o", "{tmp}/c.gif"],
     "not available"),
    (["generate", "x", "--bundle", "{bundle}", "--steps", "0", "-o", "{tmp}/c.gif"], "num_inference_steps"),
    (["generate", "x", "--bundle", "{bundle}", "--frames", "99", "-o", "{tmp}/c.gif"], "num_frames"),
    (["generate", "x", "--bundle", "{bundle}", "--guidance-scale", "0.5", "-o", "{tmp}/c.gif"], "guidance_scale"),
    (["export", "--base", "{bundle}", "--out", "{tmp}/b", "--default-timesteps", "4:999,699"], "--default-timesteps"),
    (["export", "--base", "{bundle}", "--out", "{tmp}/b", "--default-timesteps", "4=999,699,399,199",
      "--default-timesteps", "4=999,599,399,199"], "--default-timesteps"),
])
def test_cli_errors_are_clear_and_leave_no_file(tiny_bundle, tmp_path, capsys, argv, message):
    args = [a.format(tmp=tmp_path, bundle=tiny_bundle) for a in argv]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Fix:" in err, err
    assert list(tmp_path.iterdir()) == []
