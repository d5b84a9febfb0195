"""LoRAs: kohya / peft / motion LoRA files fuse to what diffusers' load_lora_weights + fuse_lora give,
several at once with their user weights, behind the fused-vs-unfused gate.

Known gap of the reference: with transformers 5, diffusers 0.42 drops kohya text-encoder
attention LoRAs (`lora_te_..._self_attn_q_proj`) with only a load report; for those modules
the test checks the fusion formula directly instead.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lcm_edge.errors import ParityError
from lcm_edge.export import LORA_FUSION_TOLERANCE, WeightsMismatchError, fuse_loras, load_lora
from lcm_edge.export.lora import LoraLayer, LoraRequest
from lcm_edge.export.motion_module import to_original_keys
from lcm_edge.export.sources import assemble_motion_unet, gate_probes
from test_loaders import tiny_adapter, tiny_text_encoder, tiny_unet2d, tiny_vae

UNET_TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # linear
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.0.attentions.0.proj_in",  # 1x1 conv
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv LoRA
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.0.downsamplers.0.conv",  # strided conv
    "up_blocks.0.upsamplers.0.conv",
    "mid_block.resnets.0.time_emb_proj",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_v",
)
TEXT_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1")
MOTION_TARGETS = (
    "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.1.motion_modules.2.transformer_blocks.0.attn2.to_out.0",
    "mid_block.motion_modules.0.transformer_blocks.0.attn1.to_v",
)


def _pair(weight: torch.Tensor, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.dim() == 4:  # kohya conv LoRA: down [r, in, k, k], up [out, r, 1, 1]
        return (0.3 * torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=g),
                0.3 * torch.randn(weight.shape[0], rank, 1, 1, generator=g))
    return 0.3 * torch.randn(rank, weight.shape[1], generator=g), 0.3 * torch.randn(weight.shape[0], rank, generator=g)


def kohya_lora(unet, text_encoder, *, rank: int, alpha: float, seed: int, ldm_names: bool = False) -> dict:
    """A kohya file: lora_unet_<diffusers name with _>, lora_te_text_model_<name with _>, per-layer alpha."""
    from lcm_edge.export.checkpoints import unet_ldm_name

    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, model, names in (("lora_unet_", unet, UNET_TARGETS), ("lora_te_text_model_", text_encoder,
                                                                      TEXT_TARGETS)):
        modules = dict(model.named_modules())
        for name in names:
            down, up = _pair(modules[name].weight, rank, g)
            if ldm_names and prefix == "lora_unet_":
                name = unet_ldm_name(f"{name}.weight", unet.config).removesuffix(".weight")
            key = prefix + name.replace(".", "_")
            out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(alpha))})
    return out


def motion_lora(unet, *, rank: int, seed: int) -> dict:
    """diffusers' motion-LoRA layout (guoyww/animatediff-motion-lora-*): attention-processor keys."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    out = {}
    for name in MOTION_TARGETS:
        down, up = _pair(modules[name].weight, rank, g)
        attn, _, proj = name.rpartition(".")
        if proj == "0":  # to_out.0
            attn, proj = attn.rsplit(".", 1)[0], "to_out"
        out[f"unet.{attn}.processor.{proj}_lora.down.weight"] = down
        out[f"unet.{attn}.processor.{proj}_lora.up.weight"] = up
    return out


@pytest.fixture()
def models():
    """Fresh UNetMotionModel + text encoder per test (fusion changes them in place)."""
    unet2d = tiny_unet2d(1)
    return {"unet": assemble_motion_unet(unet2d, tiny_adapter(4)), "text_encoder": tiny_text_encoder(3),
            "unet2d": unet2d}


def _fuse(models, requests):
    targets = {"unet": models["unet"], "text_encoder": models["text_encoder"]}
    files = [load_lora(r.path, targets, weight=r.weight) for r in requests]
    return fuse_loras(targets, files, gate_probes(targets["unet"], targets["text_encoder"]))


def _weights(model, names):
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


def test_two_kohya_loras_match_diffusers_fuse(models, tmp_path, sd15_tokenizer_dir):
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    base_unet, base_te = copy.deepcopy(models["unet2d"]), copy.deepcopy(models["text_encoder"])
    lcm = tmp_path / "AnimateLCM_sd15_t2v_lora.safetensors"
    style = tmp_path / "style.safetensors"
    save_file(kohya_lora(base_unet, base_te, rank=8, alpha=1.0, seed=0), str(lcm))  # alpha/rank = 1/8, as released
    save_file(kohya_lora(base_unet, base_te, rank=4, alpha=4.0, seed=1), str(style))

    report = _fuse(models, [LoraRequest.parse(f"{lcm}:0.8"), LoraRequest.parse(f"{style}:0.5")])
    assert [c.component for c in report.checks] == ["text_encoder", "unet"]
    for check in report.checks:
        assert check.passed and check.max_abs < 1e-5 and check.effect_max_abs > 1e-3
    assert report.loras[0]["weight"] == 0.8 and report.loras[0]["alphas"] == [1.0] and report.loras[0]["ranks"] == [8]
    assert report.loras[0]["formats"] == ["kohya"] and report.loras[0]["layers"] == 12

    pipe = StableDiffusionPipeline(vae=tiny_vae(2), text_encoder=copy.deepcopy(base_te), unet=copy.deepcopy(base_unet),
                                   tokenizer=CLIPTokenizer.from_pretrained(sd15_tokenizer_dir),
                                   scheduler=LCMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(lcm), adapter_name="lcm")
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[0.8, 0.5])
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["lcm", "style"])
    pipe.unload_lora_weights()
    ours, theirs = _weights(models["unet"], UNET_TARGETS), _weights(pipe.unet, UNET_TARGETS)
    before = _weights(base_unet, UNET_TARGETS)
    for name in UNET_TARGETS:
        assert float((ours[name] - before[name]).abs().max()) > 1e-2, name  # the LoRA did something
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), name
    # Every other weight is untouched by both.
    untouched = [k for k in base_unet.state_dict() if k.rsplit(".", 1)[0] not in UNET_TARGETS]
    assert all(torch.equal(models["unet"].state_dict()[k], base_unet.state_dict()[k]) for k in untouched)
    mlp = "encoder.layers.1.mlp.fc1"
    assert torch.allclose(_weights(models["text_encoder"], [mlp])[mlp], _weights(pipe.text_encoder, [mlp])[mlp],
                          atol=1e-6)
    # diffusers drops the kohya text attention LoRA here (see module doc): check the formula itself.
    q = "encoder.layers.0.self_attn.q_proj"
    key = "lora_te_text_model_" + q.replace(".", "_")
    from safetensors.torch import load_file

    expected = base_te.state_dict()[f"{q}.weight"].clone()
    for path, weight, scale in ((lcm, 0.8, 1.0 / 8), (style, 0.5, 1.0)):
        t = load_file(str(path))
        expected += weight * scale * t[f"{key}.lora_up.weight"] @ t[f"{key}.lora_down.weight"]
    assert torch.allclose(models["text_encoder"].state_dict()[f"{q}.weight"], expected, atol=1e-6)


def test_ldm_named_kohya_lora_fuses_like_diffusers_named(models, tmp_path):
    from safetensors.torch import save_file

    twin = {"unet": copy.deepcopy(models["unet"]), "text_encoder": copy.deepcopy(models["text_encoder"])}
    save_file(kohya_lora(models["unet2d"], models["text_encoder"], rank=4, alpha=2, seed=3), str(tmp_path / "d.st"))
    save_file(kohya_lora(models["unet2d"], models["text_encoder"], rank=4, alpha=2, seed=3, ldm_names=True),
              str(tmp_path / "l.safetensors"))
    (tmp_path / "d.safetensors").write_bytes((tmp_path / "d.st").read_bytes())
    _fuse(models, [LoraRequest(tmp_path / "d.safetensors")])
    targets = {"unet": twin["unet"], "text_encoder": twin["text_encoder"]}
    fuse_loras(targets, [load_lora(tmp_path / "l.safetensors", targets)], gate_probes(twin["unet"],
                                                                                      twin["text_encoder"]))
    for key, value in models["unet"].state_dict().items():
        assert torch.equal(value, twin["unet"].state_dict()[key]), key


def test_peft_lora_with_metadata_matches_diffusers(models, tmp_path, sd15_tokenizer_dir):
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTokenizer

    base = copy.deepcopy(models["unet2d"])  # models["unet"] shares its tensors: fusing changes both
    trained = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_v", "proj_in", "conv1"], alpha_pattern={"conv1": 2})
    trained.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(trained),
                                              unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    report = _fuse(models, [LoraRequest(path, 0.7)])
    assert report.loras[0]["formats"] == ["peft"] and report.loras[0]["alphas"] == [2.0, 8.0]

    pipe = StableDiffusionPipeline(vae=tiny_vae(2), text_encoder=tiny_text_encoder(3), unet=base,
                                   tokenizer=CLIPTokenizer.from_pretrained(sd15_tokenizer_dir),
                                   scheduler=LCMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(path), adapter_name="p")
    pipe.set_adapters(["p"], adapter_weights=[0.7])
    pipe.fuse_lora(components=["unet"], adapter_names=["p"])
    pipe.unload_lora_weights()
    theirs = pipe.unet.state_dict()
    changed = 0
    for key, value in tiny_unet2d(1).state_dict().items():
        ours = models["unet"].state_dict()[key]
        assert torch.allclose(ours, theirs[key], atol=1e-6), key
        changed += not torch.equal(ours, value)
    assert changed >= 10


def test_motion_lora_matches_diffusers_animatediff(models, tmp_path, sd15_tokenizer_dir):
    """diffusers-format motion LoRA == the same LoRA in AnimateDiff's original names == diffusers' fuse."""
    from diffusers import AnimateDiffPipeline, LCMScheduler
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    base = copy.deepcopy(models["unet"])
    tensors = motion_lora(base, rank=4, seed=5)
    save_file(tensors, str(tmp_path / "motion_lora.safetensors"))
    # AnimateDiff's own motion-LoRA .ckpt: no `unet.` prefix, original motion-module names.
    original = to_original_keys({k.removeprefix("unet."): v for k, v in tensors.items()})
    torch.save(original, tmp_path / "v2_lora_ZoomIn.ckpt")
    assert any("temporal_transformer" in k and "attention_blocks" in k for k in original)

    twin = {"unet": copy.deepcopy(base), "text_encoder": models["text_encoder"]}
    report = _fuse(models, [LoraRequest(tmp_path / "motion_lora.safetensors", 1.2)])
    assert [c.component for c in report.checks] == ["unet"] and report.loras[0]["motion_layers"] == 3
    fuse_loras(twin, [load_lora(tmp_path / "v2_lora_ZoomIn.ckpt", twin, weight=1.2)],
               gate_probes(twin["unet"], twin["text_encoder"]))

    pipe = AnimateDiffPipeline(vae=tiny_vae(2), text_encoder=tiny_text_encoder(3), unet=copy.deepcopy(base),
                               tokenizer=CLIPTokenizer.from_pretrained(sd15_tokenizer_dir), motion_adapter=None,
                               scheduler=LCMScheduler())
    pipe.load_lora_weights(str(tmp_path / "motion_lora.safetensors"), adapter_name="m")
    pipe.set_adapters(["m"], adapter_weights=[1.2])
    pipe.fuse_lora(components=["unet"], adapter_names=["m"])
    pipe.unload_lora_weights()
    theirs = pipe.unet.state_dict()
    for name in MOTION_TARGETS:
        key = f"{name}.weight"
        assert not torch.equal(models["unet"].state_dict()[key], base.state_dict()[key])
        assert torch.allclose(models["unet"].state_dict()[key], theirs[key], atol=1e-6), key
        assert torch.equal(models["unet"].state_dict()[key], twin["unet"].state_dict()[key]), key


def test_gate_catches_a_wrong_fusion(models, tmp_path, monkeypatch):
    """Fusing with the wrong scale (a classic: forgetting alpha/rank) fails the gate, naming the tolerance."""
    from safetensors.torch import save_file

    save_file(kohya_lora(models["unet2d"], models["text_encoder"], rank=8, alpha=1.0, seed=0),
              str(tmp_path / "l.safetensors"))
    from lcm_edge.export import lora as lora_module

    original = LoraLayer.delta
    monkeypatch.setattr(LoraLayer, "delta", lambda self, shape: original(self, shape) * 8)
    # diffusers' reading would catch this first (it also compares deltas): this test is about the gate.
    monkeypatch.setattr(lora_module, "check_against_diffusers", lambda models, lora: {})
    with pytest.raises(ParityError) as err:
        _fuse(models, [LoraRequest(tmp_path / "l.safetensors", 0.8)])
    assert len(err.value.failures) == 2
    assert all(LORA_FUSION_TOLERANCE.name in f for f in err.value.failures)


def test_lora_for_another_base_is_refused(models, tmp_path):
    from safetensors.torch import save_file

    tensors = kohya_lora(models["unet2d"], models["text_encoder"], rank=4, alpha=4, seed=0)
    # SDXL-like: a second transformer block, a second text encoder, a wider projection.
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight"] = torch.zeros(8, 4)
    tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(37, 4)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{key}.lora_down.weight"] = torch.zeros(4, 1280)
    del tensors["lora_unet_mid_block_resnets_0_time_emb_proj.lora_up.weight"]
    tensors["lora_unet_conv_in.hada_w1_a"] = torch.zeros(4, 4)  # LyCORIS LoHa
    save_file(tensors, str(tmp_path / "sdxl_lora.safetensors"))
    targets = {"unet": models["unet"], "text_encoder": models["text_encoder"]}
    before = {k: v.clone() for k, v in targets["unet"].state_dict().items()}
    with pytest.raises(WeightsMismatchError) as err:
        load_lora(tmp_path / "sdxl_lora.safetensors", targets)
    e = err.value
    assert "lora_unet_conv_in.hada_w1_a" in e.unexpected
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in e.unexpected
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight" in e.unexpected
    assert e.mismatched == [f"{key}.lora_down.weight: down [4, 1280], up [8, 4] vs weight [8, 8]"]
    assert len(e.missing) == 1 and e.missing[0].startswith("up weight of 'mid_block_resnets_0_time_emb_proj'")
    assert e.argument.startswith("--lora ") and "SDXL" in e.fix
    assert all(torch.equal(v, before[k]) for k, v in targets["unet"].state_dict().items())  # nothing fused


@pytest.mark.parametrize("text, path, weight", [
    ("a.safetensors:0.8", "a.safetensors", 0.8), ("a.safetensors", "a.safetensors", 1.0),
    ("C:\\loras\\a.safetensors", "C:\\loras\\a.safetensors", 1.0), ("C:\\l\\a.safetensors:-0.5", "C:\\l\\a.safetensors", -0.5),
])
def test_lora_argument_parsing(text, path, weight):
    request = LoraRequest.parse(text)
    assert str(request.path) == path and request.weight == weight


@pytest.mark.parametrize("misread", ["alpha", "module"])
def test_a_misread_alpha_or_target_module_is_caught_by_diffusers_reading(models, tmp_path, misread):
    """The fused-vs-run-time gate shares this module's reading of the file, so it passes a misread alpha or a
    wrong target module; diffusers' own reading of the same file (check_against_diffusers) does not."""
    from safetensors.torch import save_file

    from lcm_edge.export.lora import check_against_diffusers

    path = tmp_path / "lora.safetensors"
    save_file(kohya_lora(models["unet2d"], models["text_encoder"], rank=4, alpha=2.0, seed=5), str(path))
    targets = {"unet": models["unet"], "text_encoder": models["text_encoder"]}
    lora = load_lora(path, targets)
    assert check_against_diffusers(targets, lora)["modules_compared"] >= len(UNET_TARGETS)  # as read: agrees
    layer = next(layer for layer in lora.layers if layer.module.endswith("attn1.to_q"))
    if misread == "alpha":
        layer.scale, layer.alpha = 1.0, float(layer.rank)  # alpha ignored (scale 1) instead of 2 / 4
    else:
        layer.module = layer.module.replace("attn1.to_q", "attn1.to_k")  # same shape, another module
    with pytest.raises(ParityError, match="diffusers"):
        fuse_loras(targets, [lora], gate_probes(targets["unet"], targets["text_encoder"]))
