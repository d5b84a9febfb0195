"""Loaders: every real weight layout, written at tiny size, loads to what diffusers' own loaders give.

Files are written in the layouts users have (docs/animatelcm.md): an SD1.5 diffusers
folder, an LDM single-file checkpoint (.safetensors fp16 and .ckpt with the Lightning wrapper),
an original-layout motion-module .ckpt without position encodings, a MotionAdapter folder with
only the fp16 variant file. Where diffusers has a loader for the layout, the test compares
against it (from_single_file with a local config folder, MotionAdapter.from_single_file,
from_pretrained); the LDM file is written from DIFFERENT weights than the folder, so a loader
that silently read the folder instead would fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lcm_edge.errors import InvalidArgumentError, ParityError
from lcm_edge.export import WeightsMismatchError, load_components, load_motion_module
from lcm_edge.export.checkpoints import load_ldm_checkpoint, to_ldm_state_dict
from lcm_edge.export.motion_module import infer_adapter_config, to_original_keys
from lcm_edge.export.sd15_configs import ANIMATELCM_ADAPTER_CONFIG, SD15_UNET_CONFIG

TINY_MOTION_CONFIG = {"motion_num_attention_heads": 4, "motion_norm_num_groups": 2}


# --------------------------------------------------------------------------- tiny models and real layouts


def tiny_unet2d(seed: int, channels=(8, 16)):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2).eval()


def tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=2, scaling_factor=0.18215).eval()


def tiny_text_encoder(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77)).eval()


def tiny_adapter(seed: int, channels=(8, 16)):
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=2, motion_norm_num_groups=2,
                            motion_num_attention_heads=4, motion_max_seq_length=32)
    # Zero-initialised output projections would make the motion modules identities.
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if not param.any():
                param.normal_(0.0, 0.3)
    return adapter.eval()


def save_sd_folder(folder: Path, tokenizer_dir: Path, unet, vae, text_encoder) -> Path:
    """An SD1.5-style diffusers folder, scheduler included (PNDM, as SD1.5 ships)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(
        tokenizer_dir), unet=unet, scheduler=PNDMScheduler(
        beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def state_equal(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> float:
    """Max abs difference over identical key sets (fails if the key sets differ); keys containing `skip` left out."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if skip not in k)


@pytest.fixture(scope="session")
def layouts(tmp_path_factory, sd15_tokenizer_dir):
    """Every supported layout on disk, plus the models they were written from."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("layouts")
    folder_models = {"unet": tiny_unet2d(1), "vae": tiny_vae(2), "text_encoder": tiny_text_encoder(3)}
    ldm_models = {"unet": tiny_unet2d(11), "vae": tiny_vae(12), "text_encoder": tiny_text_encoder(13)}
    sd_folder = save_sd_folder(root / "sd15", sd15_tokenizer_dir, **folder_models)

    ldm = to_ldm_state_dict(ldm_models["unet"], ldm_models["vae"], ldm_models["text_encoder"])
    extras = {"betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.ones(1000),
              "model_ema.decay": torch.tensor(0.9999),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77.0)[None]}
    ldm_fp16 = root / "personalized_fp16.safetensors"
    save_file({**{k: v.half() for k, v in ldm.items()}, **extras}, str(ldm_fp16))
    ldm_ckpt = root / "personalized.ckpt"
    torch.save({"state_dict": {**ldm, **extras}, "global_step": 1234}, ldm_ckpt)

    adapter = tiny_adapter(4)
    motion_ckpt = root / "AnimateLCM_sd15_t2v.ckpt"
    torch.save(to_original_keys(adapter.state_dict()), motion_ckpt)  # no pos_encoder keys, like AnimateLCM
    adapter_dir = root / "motion_adapter_fp16"
    tiny_adapter(4).half().save_pretrained(adapter_dir, variant="fp16")
    adapter_fp32_dir = root / "motion_adapter"
    adapter.save_pretrained(adapter_fp32_dir)
    return {"root": root, "sd_folder": sd_folder, "folder_models": folder_models, "ldm_models": ldm_models,
            "ldm_fp16": ldm_fp16, "ldm_ckpt": ldm_ckpt, "adapter": adapter, "motion_ckpt": motion_ckpt,
            "adapter_dir": adapter_dir, "adapter_fp32_dir": adapter_fp32_dir}


def folder_configs(folder: Path) -> dict:
    out = {}
    for sub, key in (("unet", "unet_config"), ("vae", "vae_config"), ("text_encoder", "text_config")):
        out[key] = {k: v for k, v in json.loads((folder / sub / "config.json").read_text()).items()
                    if not k.startswith("_")}
    return out


# --------------------------------------------------------------------------- single-file LDM checkpoints


@pytest.mark.parametrize("name", ["ldm_ckpt", "ldm_fp16"])
def test_ldm_single_file_matches_diffusers_from_single_file(layouts, name):
    from diffusers import StableDiffusionPipeline

    path = layouts[name]
    ours = load_ldm_checkpoint(path, **folder_configs(layouts["sd_folder"]))
    # diffusers' own single-file loader, offline: configs from the local folder, weights from the file.
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(layouts["sd_folder"]),
                                                      local_files_only=True, safety_checker=None)
    exact = name == "ldm_ckpt"  # the fp16 file is the same weights rounded to fp16
    for component in ("unet", "vae", "text_encoder"):
        model = getattr(ours, component)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert state_equal(model, getattr(theirs, component).float()) == 0.0
        written = state_equal(model, layouts["ldm_models"][component])
        assert written == 0.0 if exact else 0.0 < written < 2e-3
        # ... and not the folder's weights: the file was really read.
        assert state_equal(model, layouts["folder_models"][component]) > 0.01


def test_ldm_wrong_architecture_lists_keys(layouts, tmp_path):
    """An SDXL-like file: other UNet keys, a second text encoder, no CLIP-L. Nothing loads."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(layouts["ldm_fp16"]))
    sdxl = {k: v for k, v in tensors.items() if not k.startswith("cond_stage_model.")}
    sdxl["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 1280)
    sdxl["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(1280, 2816)
    sdxl["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"] = torch.zeros(8, 8, 5, 5)
    path = tmp_path / "sdxl.safetensors"
    save_file(sdxl, str(path))
    with pytest.raises(WeightsMismatchError) as err:
        load_ldm_checkpoint(path, **folder_configs(layouts["sd_folder"]))
    e = err.value
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in e.missing
    assert set(e.unexpected) == {"conditioner.embedders.1.model.positional_embedding",
                                 "model.diffusion_model.label_emb.0.0.weight"}
    assert e.mismatched == ["model.diffusion_model.input_blocks.1.0.in_layers.2.weight: file [8, 8, 5, 5] vs "
                            "model [8, 8, 3, 3]"]
    assert e.argument == f"--base {path}" and "Fix:" in str(e) and "missing" in str(e)


class LightningCallback:
    """Stands for the Python objects Lightning pickles into .ckpt files next to the weights."""


def test_ldm_pickle_with_objects_is_refused(tmp_path, layouts):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": LightningCallback()}, path)
    with pytest.raises(InvalidArgumentError) as err:
        load_ldm_checkpoint(path, **folder_configs(layouts["sd_folder"]))
    assert "refuses to unpickle" in str(err.value) and ".safetensors" in err.value.fix


def test_packaged_sd15_config_has_the_real_key_layout():
    """The shipped SD1.5 config maps onto the LDM layout without a single unmatched key (meta, no memory)."""
    from lcm_edge.export.checkpoints import build_sd_models, ldm_key_map
    from lcm_edge.export.sd15_configs import SD15_TEXT_ENCODER_CONFIG, SD15_VAE_CONFIG

    unet, vae, _ = build_sd_models(SD15_UNET_CONFIG, SD15_VAE_CONFIG, {**SD15_TEXT_ENCODER_CONFIG,
                                                                        "num_hidden_layers": 1})
    mapping = ldm_key_map(unet, vae, tiny_text_encoder(0))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5 UNet
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight", "model.diffusion_model.output_blocks.2.1.conv.bias",
                "model.diffusion_model.output_blocks.5.2.conv.weight", "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                "model.diffusion_model.input_blocks.11.0.out_layers.3.weight", "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.encoder.mid.attn_1.proj_out.weight", "model.diffusion_model.out.2.bias"):
        assert key in mapping, key
    assert len(mapping) == len(set(mapping.values()))


# --------------------------------------------------------------------------- motion modules


def test_original_motion_ckpt_matches_diffusers_conversion(layouts):
    from diffusers import MotionAdapter

    loaded = load_motion_module(layouts["motion_ckpt"], config=TINY_MOTION_CONFIG)
    theirs = MotionAdapter.from_single_file(str(layouts["motion_ckpt"]), config=str(layouts["adapter_fp32_dir"]),
                                            local_files_only=True)
    assert state_equal(loaded.adapter, theirs) == 0.0
    assert state_equal(loaded.adapter, layouts["adapter"]) == 0.0  # incl. regenerated position encodings
    assert loaded.source["layout"] == "original" and loaded.source["position_encodings"] == "regenerated"
    assert loaded.config["block_out_channels"] == [8, 16] and loaded.config["motion_layers_per_block"] == 2
    assert loaded.config["use_motion_mid_block"] is True


def test_motion_config_is_inferred_at_full_size():
    """AnimateLCM's adapter structure is read back from its weights' shapes alone (on meta: no memory)."""
    from diffusers import MotionAdapter

    with torch.device("meta"):
        adapter = MotionAdapter(**ANIMATELCM_ADAPTER_CONFIG)
    assert 450e6 < sum(p.numel() for p in adapter.parameters()) < 456e6
    original = to_original_keys(adapter.state_dict())
    assert not any("pos_encoder" in k for k in original)
    from lcm_edge.export.motion_module import convert_original_keys

    converted, position = convert_original_keys(original)
    assert infer_adapter_config(converted, argument="x") == ANIMATELCM_ADAPTER_CONFIG and position == {}


def test_stored_position_encodings_are_checked(layouts, tmp_path):
    """AnimateDiff v2 files carry the sinusoid table: accepted when it is the sinusoid, refused otherwise."""
    from lcm_edge.export.motion_module import sinusoidal_table

    original = torch.load(layouts["motion_ckpt"], weights_only=True)
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
    with_pe = {**original, key: sinusoidal_table(8, 24)}
    torch.save(with_pe, tmp_path / "v2.ckpt")
    loaded = load_motion_module(tmp_path / "v2.ckpt", config=TINY_MOTION_CONFIG)
    assert loaded.config["motion_max_seq_length"] == 24
    assert loaded.source["position_encodings"] == "checked against regenerated"
    bad = {**original, key: sinusoidal_table(8, 24) + 0.01}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ParityError) as err:
        load_motion_module(tmp_path / "bad.ckpt", config=TINY_MOTION_CONFIG)
    assert "position-encoding-vs-sinusoid" in err.value.failures[0]


def test_motion_adapter_folder_fp16_variant(layouts):
    from diffusers import MotionAdapter

    loaded = load_motion_module(layouts["adapter_dir"])
    theirs = MotionAdapter.from_pretrained(layouts["adapter_dir"], variant="fp16", local_files_only=True)
    assert all(p.dtype == torch.float32 for p in loaded.adapter.parameters())
    assert state_equal(loaded.adapter, theirs.float(), skip="pos_embed") == 0.0
    # Position encodings are regenerated in fp32, not taken from the fp16 file's rounded table.
    assert 0.0 < state_equal(loaded.adapter, theirs.float()) < 2.5e-4
    assert loaded.source["files"][0].endswith("diffusion_pytorch_model.fp16.safetensors")
    assert loaded.config["motion_num_attention_heads"] == 4  # from the folder's config.json


def test_motion_module_for_other_channels_is_refused(layouts, tmp_path):
    wide = tiny_adapter(5, channels=(16, 32))
    torch.save(to_original_keys(wide.state_dict()), tmp_path / "wide.ckpt")
    with pytest.raises(WeightsMismatchError) as err:
        load_components(layouts["sd_folder"], motion_module=tmp_path / "wide.ckpt", motion_config=TINY_MOTION_CONFIG)
    assert err.value.argument == f"--motion-module {tmp_path / 'wide.ckpt'}"
    assert "down_blocks.0.motion_modules.0.proj_in.weight: file [16, 16] vs model [8, 8]" in err.value.mismatched


def test_truncated_motion_module_lists_missing_keys(layouts, tmp_path):
    original = torch.load(layouts["motion_ckpt"], weights_only=True)
    dropped = sorted(k for k in original if k.startswith("up_blocks.1.motion_modules.2."))
    torch.save({k: v for k, v in original.items() if k not in dropped}, tmp_path / "cut.ckpt")
    with pytest.raises(WeightsMismatchError) as err:
        # Structure inferred from a partial file still says 2 layers: the up block lacks its third.
        load_motion_module(tmp_path / "cut.ckpt", config=TINY_MOTION_CONFIG)
    assert len(err.value.missing) == len(dropped) and not err.value.unexpected


# --------------------------------------------------------------------------- assembling components


def test_folder_plus_motion_module_equals_diffusers_from_unet2d(layouts):
    from diffusers import UNetMotionModel

    c = load_components(layouts["sd_folder"], motion_module=layouts["motion_ckpt"], motion_config=TINY_MOTION_CONFIG)
    reference = UNetMotionModel.from_unet2d(layouts["folder_models"]["unet"], layouts["adapter"])
    assert state_equal(c.unet, reference) == 0.0
    assert state_equal(c.vae, layouts["folder_models"]["vae"]) == 0.0
    assert state_equal(c.text_encoder, layouts["folder_models"]["text_encoder"]) == 0.0
    # SD1.5 folders ship PNDM: the bundle gets AnimateLCM's schedule instead, overridable.
    assert c.scheduler_config.beta_schedule == "linear" and c.scheduler_config.original_inference_steps == 100
    assert "PNDMScheduler is not an LCM scheduler" in c.source["scheduler"]["source"]
    again = load_components(layouts["sd_folder"], motion_module=layouts["adapter_fp32_dir"],
                            scheduler_overrides={"original_inference_steps": 50})
    assert again.scheduler_config.original_inference_steps == 50
    assert state_equal(again.unet, reference) == 0.0


def test_single_file_needs_base_folder_and_2d_base_needs_motion(layouts):
    with pytest.raises(InvalidArgumentError) as err:
        load_components(layouts["ldm_fp16"], motion_module=layouts["motion_ckpt"])
    assert err.value.argument == "--base-folder"
    with pytest.raises(InvalidArgumentError) as err:
        load_components(layouts["sd_folder"])
    assert err.value.argument == "--motion-module" and "AnimateLCM_sd15_t2v.ckpt" in err.value.fix
