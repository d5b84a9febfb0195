"""Tiny, real diffusers/transformers components (random weights) for export and parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

# AnimateLCM's schedule: linear betas, original_inference_steps 100 (docs/animatelcm.md).
ANIMATELCM_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
    "original_inference_steps": 100, "prediction_type": "epsilon", "timestep_scaling": 10.0,
    "clip_sample": False, "set_alpha_to_one": True,
}


def make_tiny_components(tokenizer_dir: Path, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, LCMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet2d = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=2, motion_norm_num_groups=2,
                            motion_num_attention_heads=4, motion_max_seq_length=32)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    # Motion modules must act strongly, or a graph that mixes up the frame axis would still pass
    # every parity check: any all-zero motion weight (an identity-initialised module) is randomised.
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "motion_modules" in name and not param.any():
                param.normal_(0.0, 0.3)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    scheduler = LCMScheduler(**ANIMATELCM_SCHEDULER)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": scheduler}
