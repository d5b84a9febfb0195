"""The embedded default model: a tiny AnimateLCM trained here from an empty folder.

Modules: `bpe` (CLIP-format tokenizer trained on the caption vocabulary), `pretrain` (VAE,
teacher image UNet + text encoder, teacher motion module: plain diffusion training),
`chain` (the one command: data -> teachers -> stage 1 -> stage 2 -> bundle), `detector`
(reads generated clips back: colour, shape, direction; numpy + opencv only).
"""
