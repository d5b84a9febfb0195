"""Architecture and schedule configs of SD1.5 + AnimateLCM, shipped so that nothing is fetched.

Values are those of the public `stable-diffusion-v1-5` diffusers folder (unet/vae/text_encoder
config.json) and of the AnimateLCM motion adapter and scheduler (docs/animatelcm.md).
A single-file checkpoint carries no config; these are used unless a base folder gives its own.
"""

from __future__ import annotations

import copy

SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14 text tower. bos/eos/pad ids are the legacy values of SD1.5's own config.json;
# they only select the pooled output, which the UNet never reads.
SD15_TEXT_ENCODER_CONFIG = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# diffusers MotionAdapter config of AnimateLCM (about 453M parameters).
ANIMATELCM_ADAPTER_CONFIG = {
    "block_out_channels": [320, 640, 1280, 1280],
    "motion_layers_per_block": 2,
    "motion_max_seq_length": 32,
    "motion_mid_block_layers_per_block": 1,
    "motion_norm_num_groups": 32,
    "motion_num_attention_heads": 8,
    "motion_transformer_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1,
    "use_motion_mid_block": True,
    "conv_in_channels": None,
}

# LCMScheduler as AnimateLCM samples: linear betas and original_inference_steps 100
# (diffusers' defaults are scaled_linear and 50).
ANIMATELCM_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "original_inference_steps": 100,
    "prediction_type": "epsilon",
    "timestep_scaling": 10.0,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "rescale_betas_zero_snr": False,
}


def packaged(config: dict) -> dict:
    """A private copy, so a caller's edit never changes the shipped defaults."""
    return copy.deepcopy(config)
