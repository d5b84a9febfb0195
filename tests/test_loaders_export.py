"""Every supported weight layout goes through `lcm-edge export` to a bundle that generates.

A: SD1.5 diffusers folder + original motion .ckpt + kohya LoRA at 0.8 + motion LoRA, fp32.
B: fp16 LDM single-file .safetensors + base folder + MotionAdapter folder (fp16 variant only)
   + peft LoRA, --precision fp16 --openvino.
C: LDM .ckpt (Lightning wrapper) + base folder + original motion .ckpt, fp32.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from lcm_edge import AnimateLCMPipeline, load_bundle
from lcm_edge.backends import create_backend
from lcm_edge.cli import main as cli_main
from lcm_edge.export.sources import assemble_motion_unet
from test_loaders import TINY_MOTION_CONFIG, layouts, tiny_adapter, tiny_text_encoder, tiny_unet2d  # noqa: F401
from test_loaders_lora import kohya_lora, motion_lora


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("loras")
    unet2d, text_encoder = tiny_unet2d(21), tiny_text_encoder(22)
    save_file(kohya_lora(unet2d, text_encoder, rank=8, alpha=1.0, seed=7), str(root / "lcm_lora.safetensors"))
    save_file(motion_lora(assemble_motion_unet(tiny_unet2d(21), tiny_adapter(23)), rank=4, seed=8),
              str(root / "motion_lora.safetensors"))
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "conv2"])
    unet2d.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(root / "peft", unet_lora_layers=get_peft_model_state_dict(unet2d),
                                              unet_lora_adapter_metadata=config.to_dict())
    motion_config = root / "motion_config.json"
    motion_config.write_text(json.dumps(TINY_MOTION_CONFIG))
    return {"kohya": root / "lcm_lora.safetensors", "motion": root / "motion_lora.safetensors",
            "peft": root / "peft" / "pytorch_lora_weights.safetensors", "motion_config": motion_config}


def _generates(bundle, backend="onnxruntime"):
    pipe = AnimateLCMPipeline(load_bundle(bundle), create_backend(backend))
    result = pipe("a red circle moving right", num_frames=3, height=16, width=20, seed=1)
    assert result.frames.shape == (3, 16, 20, 3) and result.frames.std() > 0
    return result


def test_folder_motion_ckpt_and_two_loras(layouts, lora_files, tmp_path, capsys):  # noqa: F811
    bundle = tmp_path / "a"
    rc = cli_main(["export", "--base", str(layouts["sd_folder"]), "--motion-module", str(layouts["motion_ckpt"]),
                   "--motion-config", str(lora_files["motion_config"]), "--lora", f"{lora_files['kohya']}:0.8",
                   "--lora", str(lora_files["motion"]), "--out", str(bundle)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "LoRA fusion gate unet: fused vs unfused max abs" in captured.err
    b = load_bundle(bundle)
    source = b.provenance["source"]
    assert [(entry["weight"], entry["formats"]) for entry in source["loras"]["loras"]] == \
        [(0.8, ["kohya"]), (1.0, ["diffusers-attn-procs"])]
    assert all(len(entry["sha256"]) == 64 for entry in source["loras"]["loras"])
    assert source["motion_module"]["layout"] == "original" and source["motion_module"]["record"]["sha256"]
    assert all(c["passed"] for c in source["loras"]["checks"])
    # SD1.5 folder scheduler is PNDM: the bundle gets AnimateLCM's schedule.
    assert (b.scheduler_config.beta_schedule, b.scheduler_config.original_inference_steps) == ("linear", 100)
    assert {c.precision for c in b.components.values()} == {"fp32"}
    _generates(bundle)


def test_single_file_fp16_adapter_folder_peft_lora_fp16_openvino(layouts, lora_files, tmp_path, capsys):  # noqa: F811
    bundle = tmp_path / "b"
    rc = cli_main(["export", "--base", str(layouts["ldm_fp16"]), "--base-folder", str(layouts["sd_folder"]),
                   "--motion-module", str(layouts["adapter_dir"]), "--lora", f"{lora_files['peft']}:0.6",
                   "--out", str(bundle), "--precision", "fp16", "--openvino", "--original-inference-steps", "50"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    b = load_bundle(bundle)
    assert {n: c.precision for n, c in b.components.items()} == \
        {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    parity = b.provenance["parity"]
    assert parity["unet/onnxruntime-fp16"]["tolerance"]["name"] == "onnx-fp16-vs-torch-fp32"
    assert parity["unet/openvino"]["tolerance"]["name"] == "openvino-fp16-weights-vs-torch-fp32"
    assert parity["unet/onnxruntime"]["tolerance"]["name"] == "onnx-fp32-vs-torch"  # gated before conversion
    assert {c["case"] for c in parity["unet/onnxruntime-fp16"]["checks"]} == {"b1-f2-3x2", "b2-f4-2x2"}
    graph = onnx.load(str(bundle / "unet" / "model.onnx"))
    dtypes = {init.data_type for init in graph.graph.initializer if len(init.dims) > 1}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in graph.graph.input] == [onnx.TensorProto.FLOAT] * 3
    assert b.provenance["source"]["base"]["format"] == "ldm-single-file"
    assert b.provenance["source"]["motion_module"]["files"][0].endswith(".fp16.safetensors")
    assert b.scheduler_config.original_inference_steps == 50
    ort_frames = _generates(bundle).frames
    ov_frames = _generates(bundle, "openvino").frames
    # fp16 graph on onnxruntime vs fp16-weight IR on OpenVINO: same model, different rounding.
    assert np.abs(ort_frames.astype(int) - ov_frames.astype(int)).mean() < 8


def test_ldm_ckpt_original_motion(layouts, lora_files, tmp_path, capsys):  # noqa: F811
    bundle = tmp_path / "c"
    rc = cli_main(["export", "--base", str(layouts["ldm_ckpt"]), "--base-folder", str(layouts["sd_folder"]),
                   "--motion-module", str(layouts["motion_ckpt"]), "--motion-config",
                   str(lora_files["motion_config"]), "--out", str(bundle)])
    assert rc == 0, capsys.readouterr().err
    b = load_bundle(bundle)
    assert b.provenance["source"]["base"]["record"]["file"].endswith("personalized.ckpt")
    assert b.provenance["source"]["base"]["configs"].startswith("base folder")
    _generates(bundle)


@pytest.mark.parametrize("argv, message", [
    (["--base", "{ldm_fp16}", "--motion-module", "{motion_ckpt}"], "--base-folder: a single-file checkpoint"),
    (["--base", "{sd_folder}"], "--motion-module: missing"),
    (["--base", "{sd_folder}", "--motion-module", "{sdxl_motion}", "--motion-config", "{motion_config}"],
     "wrong shape key(s)"),
    (["--base", "{sd_folder}", "--motion-module", "{motion_ckpt}", "--motion-config", "{motion_config}",
      "--lora", "{ldm_fp16}:0.8"], "unexpected key(s)"),
    (["--base", "{sd_folder}", "--motion-module", "{motion_ckpt}"], "--motion-config"),
    (["{sd_folder}", "--base", "{sd_folder}"], "both given"),
])
def test_cli_refuses_weights_that_do_not_fit(layouts, tmp_path, capsys, argv, message):  # noqa: F811
    from lcm_edge.export.motion_module import to_original_keys

    sdxl_motion = tmp_path / "mm_sdxl.ckpt"
    torch.save(to_original_keys(tiny_adapter(9, channels=(16, 32)).state_dict()), sdxl_motion)
    motion_config = tmp_path / "mm.json"
    motion_config.write_text(json.dumps(TINY_MOTION_CONFIG))
    names = {k: str(v) for k, v in layouts.items() if isinstance(v, type(tmp_path))}
    args = ["export"] + [a.format(**names, sdxl_motion=sdxl_motion, motion_config=motion_config) for a in argv]
    args += ["--out", str(tmp_path / "out")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Fix:" in err, err
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_spilled_trace_is_merged_into_one_data_file(tmp_path):
    """Full-size traces spill one file per tensor; the merge streams them into one aligned file."""
    import onnxruntime as ort

    from lcm_edge.export.onnx_io import EXTERNAL_DATA_NAME, consolidate, trace_onnx
    from lcm_edge.export.specs import ShapeCase, sample_inputs, text_encoder_spec
    from lcm_edge.export.wrappers import TextEncoderWrapper

    spec = text_encoder_spec(77, 32)
    rng = np.random.default_rng(0)
    traced = trace_onnx(TextEncoderWrapper(tiny_text_encoder(3)), spec,
                        sample_inputs(spec, ShapeCase(2, 1, 1, 1), vocab_size=49408, rng=rng), tmp_path / "trace")
    spilled = tmp_path / "spilled" / "model.onnx"
    spilled.parent.mkdir()
    onnx.save_model(onnx.load(str(traced)), str(spilled), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(spilled.parent.iterdir())) > 10
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    assert consolidate(spilled, out, spec, external_data=True) == out.parent / EXTERNAL_DATA_NAME
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", EXTERNAL_DATA_NAME]
    offsets = [int(e.value) for t in onnx.load(str(out), load_external_data=False).graph.initializer
               for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    feeds = sample_inputs(spec, ShapeCase(3, 1, 1, 1), vocab_size=49408, rng=rng)
    want = ort.InferenceSession(str(traced)).run(None, feeds)[0]
    got = ort.InferenceSession(str(out)).run(None, feeds)[0]
    assert np.array_equal(want, got)
