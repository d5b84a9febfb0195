"""The embedded default model: a tiny AnimateLCM trained here from an empty folder.

Modules: `chain` (the one command: the recipe as a list of stages, and the runner that resumes it), `clips`
(the synthetic training data, held-out combinations, captions and latents), `bpe` (CLIP-format tokenizer trained
on the caption vocabulary), `pretrain` (VAE, teacher image UNet + text encoder, teacher motion module: plain
diffusion training), `checks` (reading the teachers back while they train), `detector` (reads generated clips
back: colour, shape, direction; numpy + opencv only).
"""
