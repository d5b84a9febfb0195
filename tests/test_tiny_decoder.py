"""The tiny decoder: both TAESD weight layouts, fit checks, export + gates, adding to a bundle, generating and
previewing with it, bad input, and a short distillation that resumes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import lcm_edge
from lcm_edge.bundle import MANIFEST_NAME, load_bundle
from lcm_edge.cli import main as cli_main
from lcm_edge.default import default_bundle_path
from lcm_edge.errors import InvalidArgumentError
from lcm_edge.export.tiny_decoder import (TINY_DECODER, TinyDecoderFidelityError, add_tiny_decoder, decoder_config,
                                          load_tiny_decoder, save_tiny_decoder, TinyDecoderWeights, build_decoder)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# madebyollin/taesd's decoder as its taesd.py writes it (one nn.Sequential, Clamp first): an independent reference
# for the key mapping and the output convention ([0, 1] there, [-1, 1] in diffusers and in bundles).
class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n, n, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def _original_decoder(latent_channels=4, n=8, blocks=(1, 2, 1)):
    layers = [_Clamp(), nn.Conv2d(latent_channels, n, 3, padding=1), nn.ReLU()]
    for i, count in enumerate(blocks):
        layers += [_Block(n) for _ in range(count)]
        if i < len(blocks) - 1:
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(n, n, 3, padding=1, bias=False)]
    layers.append(nn.Conv2d(n, 3, 3, padding=1))
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory):
    """A random diffusers AutoencoderTiny (8 channels, 4x like the default model), saved both ways."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                            num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 2, 1))
    root = tmp_path_factory.mktemp("tiny_weights")
    model.save_pretrained(root / "diffusers")
    save_tiny_decoder(load_tiny_decoder(root / "diffusers"), root / "single")
    return model, root


@pytest.fixture()
def bundle_copy(tmp_path):
    """The shipped default model without its tiny decoder, as a writable copy."""
    from lcm_edge.export.tiny_decoder import _write_manifest_atomically

    out = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), out)
    bundle = load_bundle(out)
    if TINY_DECODER in bundle.components:
        shutil.rmtree(out / TINY_DECODER)
        _write_manifest_atomically(out, bundle, {k: v for k, v in bundle.components.items() if k != TINY_DECODER},
                                   {k: v for k, v in bundle.provenance.items() if k != "tiny_decoder"})
    return out


def test_both_layouts_load_the_same_decoder(random_tiny, tmp_path):
    model, root = random_tiny
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        reference = model.decode(x).sample
        for path in (root / "diffusers", root / "single" / "taesd_decoder.safetensors", root / "single"):
            weights = load_tiny_decoder(path)
            assert weights.config["decoder_block_out_channels"] == [8, 8, 8]
            assert weights.config["num_decoder_blocks"] == [1, 2, 1] and weights.upscale == 4
            torch.testing.assert_close(weights.decoder(x), reference, rtol=0, atol=0)
    # An original-layout file written by taesd.py's own module (keys "1.weight", "3.conv.0.weight", ...), .pth too.
    original = _original_decoder()
    torch.save(original.state_dict(), tmp_path / "taesd_decoder.pth")
    weights = load_tiny_decoder(tmp_path / "taesd_decoder.pth")
    assert weights.source["layout"] == "original"
    with torch.no_grad():
        torch.testing.assert_close(weights.decoder(x), original(x) * 2 - 1, rtol=1e-5, atol=1e-5)


def test_weights_that_do_not_fit_are_rejected(random_tiny, tmp_path, bundle_copy):
    from diffusers import AutoencoderTiny

    from lcm_edge.export.tiny_decoder import check_fit

    model = load_bundle(bundle_copy).model
    eight_x = TinyDecoderWeights(build_decoder(decoder_config(block_out_channels=(8,) * 4, num_blocks=(1,) * 4)),
                                 decoder_config(block_out_channels=(8,) * 4, num_blocks=(1,) * 4))
    with pytest.raises(InvalidArgumentError, match="upsamples latents 8x, the bundle's VAE 4x") as info:
        check_fit(eight_x, model)
    assert info.value.argument == "weights"
    AutoencoderTiny(latent_channels=16, decoder_block_out_channels=(8, 8, 8), encoder_block_out_channels=(8, 8, 8),
                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)).save_pretrained(tmp_path / "sd3")
    with pytest.raises(InvalidArgumentError, match="16 latent channels") as info:
        add_tiny_decoder(bundle_copy, tmp_path / "sd3", min_psnr_db=None)
    assert info.value.argument == "weights"
    encoder_only = {f"{k}": v for k, v in _original_decoder()[1:3].state_dict().items()}
    torch.save({"0.weight": torch.zeros(8, 3, 3, 3), **encoder_only}, tmp_path / "taesd_encoder.pth")
    with pytest.raises(InvalidArgumentError, match="weights"):
        load_tiny_decoder(tmp_path / "taesd_encoder.pth")
    assert TINY_DECODER not in load_bundle(bundle_copy).components  # nothing was added


def test_add_generate_and_preview(random_tiny, bundle_copy, capsys):
    _, root = random_tiny
    manifest_before = (bundle_copy / MANIFEST_NAME).read_bytes()
    # A folder an interrupted add left behind: not in the manifest, so the bundle loads as before ...
    (bundle_copy / TINY_DECODER).mkdir()
    (bundle_copy / TINY_DECODER / "model.onnx").write_bytes(b"half-written")
    assert TINY_DECODER not in load_bundle(bundle_copy).components
    # ... and a real add replaces it. Random weights: the parity gates only (min_psnr_db=None).
    report = add_tiny_decoder(bundle_copy, root / "single" / "taesd_decoder.safetensors", min_psnr_db=None)
    assert report.parity[f"{TINY_DECODER}/onnxruntime"].worst_abs() < 1e-4
    assert (bundle_copy / MANIFEST_NAME).read_bytes() != manifest_before
    bundle = load_bundle(bundle_copy, verify_checksums=True)
    assert bundle.components[TINY_DECODER].onnx == f"{TINY_DECODER}/model.onnx"
    assert bundle.provenance["tiny_decoder"]["source"]["layout"] == "original"
    assert cli_main(["info", str(bundle_copy)]) == 0
    assert f"{TINY_DECODER}: {TINY_DECODER}/model.onnx" in capsys.readouterr().out

    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle_copy, threads=1)
    steps = []
    result = pipe("a red circle moving right", num_frames=4, seed=3, decoder="tiny", preview=True,
                  callback=steps.append)
    assert [s.preview.shape for s in steps] == [(4, 64, 64, 3)] * 4 and steps[0].preview.dtype == np.uint8
    # The last step's x_0 prediction is the final latents, so its preview is the clip's tiny decode.
    np.testing.assert_array_equal(steps[-1].denoised, result.latents)
    np.testing.assert_array_equal(steps[-1].preview, result.frames)
    full = pipe("a red circle moving right", num_frames=4, seed=3)
    np.testing.assert_array_equal(full.latents, result.latents)  # the decoder changes only the decode
    np.testing.assert_array_equal(full.frames, pipe.decode(result.latents, decoder="full"))
    assert result.timings.preview_s > 0 and full.timings.preview_s == 0
    # The CLI's --decoder.
    assert cli_main(["generate", "a red circle moving right", "--bundle", str(bundle_copy), "--frames", "4",
                     "--decoder", "tiny", "--seed", "3", "-o", str(bundle_copy.parent / "clip.gif")]) == 0


def test_random_weights_fail_the_fidelity_gate_and_change_nothing(random_tiny, bundle_copy):
    _, root = random_tiny
    manifest_before = (bundle_copy / MANIFEST_NAME).read_bytes()
    with pytest.raises(TinyDecoderFidelityError, match="TINY_DECODER_MIN_PSNR_DB") as info:
        add_tiny_decoder(bundle_copy, root / "diffusers")
    assert info.value.figures["psnr_db"] < 20
    assert (bundle_copy / MANIFEST_NAME).read_bytes() == manifest_before
    assert not (bundle_copy / TINY_DECODER).exists()
    assert not any(p.name.startswith(".") for p in bundle_copy.parent.iterdir())  # no staging folder left
    # The CLI reports it as an error (exit 2), not a traceback.
    assert cli_main(["add-tiny-decoder", str(bundle_copy), "--weights", str(root / "diffusers")]) == 2


def test_decoder_and_preview_need_a_tiny_decoder(bundle_copy):
    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle_copy, threads=1)
    calls = []
    original = pipe._run
    pipe._run = lambda *a, **k: calls.append(1) or original(*a, **k)  # no graph may run
    for kwargs, argument in (({"decoder": "tiny"}, "decoder"), ({"preview": True, "callback": print}, "preview"),
                             ({"decoder": "small"}, "decoder"), ({"preview": True}, "preview"),
                             ({"preview": 1, "callback": print}, "preview")):
        with pytest.raises(InvalidArgumentError) as info:
            pipe("a red circle moving right", **kwargs)
        assert info.value.argument == argument and "Fix:" in str(info.value)
    assert calls == []
    with pytest.raises(InvalidArgumentError, match="no tiny decoder"):
        pipe.decode(np.zeros((1, 4, 2, 16, 16), np.float32), decoder="tiny")


def test_export_rejects_a_tiny_decoder_that_does_not_fit_before_tracing(tiny_components, tmp_path):
    from lcm_edge.export import export_bundle

    c = tiny_components
    weights = TinyDecoderWeights(build_decoder(decoder_config(block_out_channels=(8, 8, 8), num_blocks=(1, 1, 1))),
                                 decoder_config(block_out_channels=(8, 8, 8), num_blocks=(1, 1, 1)))
    with pytest.raises(InvalidArgumentError, match="upsamples latents 4x, the bundle's VAE 2x") as info:
        export_bundle(tmp_path / "b", unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"],
                      tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), tiny_decoder=weights)
    assert info.value.argument == "tiny_decoder"
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # a whole tiny export: ~10 s alone, about a minute on a loaded machine
def test_export_with_a_tiny_decoder_for_another_latent_space_publishes_nothing(tiny_components, tmp_path):
    """Shapes fit, the latent space does not: every graph is exported and gated, then the tiny decoder's fidelity
    gate fails on clips the unpublished bundle samples, and nothing is published."""
    from lcm_edge.export import export_bundle

    c = tiny_components
    two_x = decoder_config(block_out_channels=(8, 8), num_blocks=(1, 1))
    with pytest.raises(TinyDecoderFidelityError) as info:
        export_bundle(tmp_path / "b", unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"],
                      tokenizer=c["tokenizer"], scheduler_config=dict(c["scheduler"].config), default_frames=4,
                      tiny_decoder=TinyDecoderWeights(build_decoder(two_x), two_x))
    assert info.value.argument == "tiny_decoder"
    assert list(tmp_path.iterdir()) == []


def _decoder_config(tmp_path, name, **train):
    from lcm_edge.distill.decoder import decoder_config_from_dict

    return decoder_config_from_dict({
        "decoder": {"block_out_channels": [8, 8, 8], "num_blocks": [1, 1, 0]},
        "data": {"prompts": ["a red circle moving right", "a blue square moving up"], "clips": 2, "steps": [2],
                 "num_frames": 4, "holdout_clips": 1, "threads": 1},
        "train": {"output_dir": str(tmp_path / name), "max_train_steps": 4, "batch_size": 4, "learning_rate": 1e-3,
                  "checkpointing_steps": 2, "report_to": "none", "log_every": 1, **train},
        "gate": {"min_psnr_db": 1.0, "flicker_margin": 1.0},  # a 4-step decoder: the gate's plumbing only
    })


def test_distill_resumes_and_adds_a_gated_decoder(tmp_path, bundle_copy):
    from lcm_edge.distill.decoder import distill_decoder

    straight = distill_decoder(bundle_copy, _decoder_config(tmp_path, "straight"), add=False)
    cfg = _decoder_config(tmp_path, "resumed", max_train_steps=2)
    first = distill_decoder(bundle_copy, cfg, add=False)
    data = json.loads((tmp_path / "resumed" / "data" / "data.json").read_text())
    assert data["frames"] == 2 * 2 * 4 and data["holdout_clips"] == 1  # 2 clips x (2 steps' x_0) x 4 frames
    resumed = distill_decoder(bundle_copy, cfg.replace(train={"max_train_steps": 4, "resume": "latest"}),
                              out=tmp_path / "with_tiny")
    assert sorted(first.losses) == [1, 2] and sorted(resumed.losses) == [3, 4]
    for step in (3, 4):  # the resumed run repeats the uninterrupted one
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-5)
    assert resumed.bundle == tmp_path / "with_tiny" and resumed.gate["clips"] == 1
    gate = json.loads((tmp_path / "resumed" / "gate.json").read_text())
    assert gate["passed"] and gate["min_psnr_db"] == 1.0
    assert TINY_DECODER in load_bundle(tmp_path / "with_tiny").components
    assert TINY_DECODER not in load_bundle(bundle_copy).components  # --out: the source bundle is untouched
    # The saved weights load back in both layouts.
    assert load_tiny_decoder(resumed.weights).source["layout"] == "diffusers"
    assert load_tiny_decoder(resumed.weights / "taesd_decoder.safetensors").upscale == 4
    # A config whose stages do not give the bundle's upsampling is refused before any sampling.
    from lcm_edge.distill.errors import ConfigError

    bad = _decoder_config(tmp_path, "bad").replace(decoder={"block_out_channels": [8, 8], "num_blocks": [1, 1]})
    with pytest.raises(ConfigError, match="use 3 stages") as info:
        distill_decoder(bundle_copy, bad)
    assert info.value.argument == "decoder.num_blocks" and not (tmp_path / "bad").exists()


SHIPPED_GATE_SEED_BASE = 40_000  # never used: distillation sampled 0..47 and 1_000_000.., the add gate 20_000..


def test_shipped_tiny_decoder_passes_its_gates():
    """The default model's tiny decoder against its VAE decoder on clips it never saw (figures at distillation:
    32.0 dB and flicker 0.0125 vs 0.0138 on 8 held-out clips)."""
    from lcm_edge.backends import create_backend
    from lcm_edge.export.tiny_decoder import (TINY_DECODER_FLICKER_MARGIN, TINY_DECODER_MIN_PSNR_DB, check_fidelity,
                                              fidelity, sample_latents)

    bundle = load_bundle(default_bundle_path())
    assert bundle.files[f"{TINY_DECODER}/model.onnx"].size < 1 << 20
    clips = sample_latents(bundle, prompts=("a green triangle moving left", "a white square moving down",
                                            "a yellow circle moving up"), clips=3, seed_base=SHIPPED_GATE_SEED_BASE,
                           num_frames=16, threads=1)
    backend = create_backend("onnxruntime", "cpu", threads=1)
    figures = fidelity(backend.open(bundle.root, bundle.components["vae_decoder"]),
                       backend.open(bundle.root, bundle.components[TINY_DECODER]), clips,
                       bundle.model.vae_scaling_factor)
    print(f"[tiny decoder] {figures}")
    check_fidelity(figures, argument="default bundle", min_psnr_db=TINY_DECODER_MIN_PSNR_DB,
                   flicker_margin=TINY_DECODER_FLICKER_MARGIN)


@pytest.mark.slow  # 60 clips
def test_shipped_tiny_decoder_keeps_the_prompt_adherence():
    """benchmarks/decoder_speed.py --adherence: detector adherence of the tiny decoder's frames within
    TINY_DECODER_ADHERENCE_MARGIN of the full decoder's, same latents, seeds 30000+ (measured 0.83 and 0.83)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("decoder_speed", folder / "decoder_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        result = module.adherence(str(default_bundle_path()), threads=1, prompts=60)
    finally:
        if str(folder) in sys.path:
            sys.path.remove(str(folder))
    print(f"[tiny decoder adherence] full {result['full']['adherence']:.2f} tiny {result['tiny']['adherence']:.2f}")
    assert result["passed"], result


def test_add_to_a_bundle_with_openvino_ir_gates_the_ir_too(tiny_bundle, tmp_path):
    """A bundle with OpenVINO IR gets the tiny decoder's IR too, gated, and runs it on the openvino backend."""
    config = decoder_config(block_out_channels=(8, 8), num_blocks=(1, 1))  # the tiny VAE upsamples 2x
    report = add_tiny_decoder(tiny_bundle, TinyDecoderWeights(build_decoder(config), config), out=tmp_path / "b",
                              min_psnr_db=None)
    assert set(report.parity) == {f"{TINY_DECODER}/onnxruntime", f"{TINY_DECODER}/openvino"}
    bundle = load_bundle(tmp_path / "b")
    assert bundle.components[TINY_DECODER].openvino == f"{TINY_DECODER}/openvino_model.xml" and bundle.has_openvino()
    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(tmp_path / "b", backend="openvino")
    latents = np.random.default_rng(0).standard_normal((1, 4, 2, 8, 8)).astype(np.float32)
    ort = lcm_edge.AnimateLCMPipeline.from_bundle(tmp_path / "b", threads=1)
    assert np.abs(pipe.decode(latents, decoder="tiny").astype(int) - ort.decode(latents, decoder="tiny")).max() <= 1
