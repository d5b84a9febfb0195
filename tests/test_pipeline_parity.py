"""lcm_edge vs diffusers' AnimateDiffPipeline + LCMScheduler on the same tiny weights,
the same initial latents and the same per-step noise, on onnxruntime and OpenVINO."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm_edge import AnimateLCMPipeline

# Latents: fp32 graphs vs eager torch through 1-4 UNet passes and the LCM step.
LATENT_ATOL = 1e-4
# Frames: uint8 after rounding; a value on a .5 boundary may round the other way.
FRAME_MAX_LEVEL_DIFF = 1
FRAMES, HEIGHT, WIDTH = 8, 32, 24
PROMPT = "a red circle moving right"


def _reference(components, steps: int, guidance: float, seed: int):
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                               tokenizer=components["tokenizer"], unet=components["unet"], motion_adapter=None,
                               scheduler=components["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 4, FRAMES, HEIGHT // 2, WIDTH // 2), generator=generator)
    # diffusers' LCMScheduler draws one randn(shape, generator) per non-final step: replay it.
    replay = torch.Generator().manual_seed(seed + 1)
    noises = [torch.randn(latents.shape, generator=replay).numpy() for _ in range(steps - 1)]
    captured = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        captured["latents"] = kwargs["latents"].detach().clone()
        return {}

    out = pipe(PROMPT, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
               guidance_scale=guidance, latents=latents.clone(), generator=torch.Generator().manual_seed(seed + 1),
               output_type="np", callback_on_step_end=keep_latents, decode_chunk_size=3)
    frames = (out.frames[0] * 255).round().astype(np.uint8)
    return latents.numpy(), noises, captured["latents"].numpy(), frames


@pytest.fixture(scope="module")
def references(tiny_components):
    cache = {}

    def get(steps, guidance, seed=7):
        key = (steps, guidance, seed)
        if key not in cache:
            cache[key] = _reference(tiny_components, steps, guidance, seed)
        return cache[key]

    return get


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def pipeline(request, tiny_bundle):
    return AnimateLCMPipeline.from_bundle(tiny_bundle, backend=request.param)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("guidance", [1.0, 1.8])
def test_frames_match_diffusers(pipeline, references, steps, guidance):
    latents, noises, ref_latents, ref_frames = references(steps, guidance)
    result = pipeline(PROMPT, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                      guidance_scale=guidance, latents=latents, noise_fn=lambda i, shape: noises[i],
                      decode_chunk_size=3)
    latent_diff = float(np.abs(result.latents - ref_latents).max())
    frame_diff = int(np.abs(result.frames.astype(np.int16) - ref_frames.astype(np.int16)).max())
    print(f"\n[parity] {pipeline.backend.name} steps={steps} guidance={guidance}: "
          f"latents max abs {latent_diff:.2e}, frames max level diff {frame_diff}")
    assert result.frames.shape == ref_frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert latent_diff <= LATENT_ATOL, latent_diff
    assert frame_diff <= FRAME_MAX_LEVEL_DIFF, frame_diff
    # The comparison must see a real video, not two blank clips that agree.
    assert ref_frames.std() > 5.0


def test_noise_source_matters(pipeline, references):
    """The injected noise is really used: other noise gives other latents at 4 steps."""
    latents, noises, ref_latents, _ = references(4, 1.0)
    other = pipeline(PROMPT, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=4,
                     latents=latents, noise_fn=lambda i, shape: -noises[i])
    assert np.abs(other.latents - ref_latents).max() > 1e-2
