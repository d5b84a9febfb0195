"""`distill image|video|adapter --config FILE`, `distill decoder --bundle B --config FILE`: the command line of lcm_edge.distill.

`add_distill_parser(subparsers)` registers the `distill` command on an existing argparse parser (the
`lcm-edge` CLI); `main(argv)` is the stand-alone entry point of `python -m lcm_edge.distill` and
`accelerate launch -m lcm_edge.distill`. Argument parsing lives here only; the library takes a
DistillConfig.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lcm_edge.errors import run_command

STAGE_HELP = {
    "image": "stage 1: distil the image model into a consistency LoRA (teacher: the 2-D model with CFG)",
    "video": "stage 2: distil the video teacher into temporal layers on top of the frozen stage-1 model",
    "adapter": "teacher-free consistency training of an image-to-video adapter or a LoRA fine-tune",
}


DECODER_HELP = ("distill a tiny VAE decoder (TAESD architecture) for a bundle against its own VAE decoder, "
                "on latents from its own sampler; gated, then added to the bundle")


def _add_stages(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", required=True, metavar="{image,video,adapter,decoder}")
    for stage, help_text in STAGE_HELP.items():
        p = stages.add_parser(stage, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, required=True, help="training config (.json or .toml)")
        p.add_argument("--resume", default=None,
                       help="override train.resume: 'latest', 'auto' or a checkpoint folder")
        p.add_argument("--max-train-steps", type=int, default=None, help="override train.max_train_steps")
    p = stages.add_parser("decoder", help=DECODER_HELP, description=DECODER_HELP)
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder whose VAE decoder is the teacher")
    p.add_argument("--config", type=Path, required=True, help="decoder distillation config (.json or .toml)")
    p.add_argument("--out", type=Path, default=None,
                   help="add the decoder to a copy of the bundle here (default: to the bundle itself, replacing a "
                        "tiny decoder it has)")
    p.add_argument("--resume", default=None, help="override train.resume: 'latest', 'auto' or a checkpoint folder")
    p.add_argument("--max-train-steps", type=int, default=None, help="override train.max_train_steps")
    parser.set_defaults(func=cmd_distill)


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    """Register `distill image|video|adapter --config FILE` on an argparse subparsers object."""
    parser = subparsers.add_parser("distill", help="train AnimateLCM consistency models (needs lcm-edge[distill])",
                                   description="Decoupled consistency learning (AnimateLCM) on Accelerate.")
    _add_stages(parser)
    return parser


def cmd_distill(args: argparse.Namespace) -> int:
    import importlib.util

    from lcm_edge.errors import MissingExtraError

    for package in ("torch", "diffusers", "transformers", "accelerate", "peft"):
        if importlib.util.find_spec(package) is None:
            raise MissingExtraError("lcm-edge distill", "distill", package)
    if args.stage == "decoder":
        return _distill_decoder(args)
    from .config import load_config
    from .train import train

    config = load_config(args.config, stage=args.stage)
    overrides = {}
    if args.resume is not None:
        overrides["resume"] = args.resume
    if args.max_train_steps is not None:
        overrides["max_train_steps"] = args.max_train_steps
    if overrides:
        config = config.replace(train=overrides)
    result = train(config)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one report, however many processes `accelerate launch` started
        for name, path in result.artifacts.items():
            print(f"{name}: {path}")
        print(f"done: {result.global_step} steps, {result.seconds_per_step:.3f} s/step, "
              f"output in {result.output_dir}")
    return 0


def _distill_decoder(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .decoder import distill_decoder, load_decoder_config

    config = load_decoder_config(args.config)
    overrides = {k: v for k, v in (("resume", args.resume), ("max_train_steps", args.max_train_steps))
                 if v is not None}
    if overrides:
        config = config.replace(train=overrides)
    result = distill_decoder(args.bundle, config, out=args.out)
    if PartialState().is_main_process:
        g = result.gate
        print(f"weights: {result.weights}")
        print(f"held-out fidelity: PSNR {g['psnr_db']:.2f} dB against the full decoder, flicker {g['flicker_tiny']:.4f} "
              f"(full decoder {g['flicker_full']:.4f}) on {g['clips']} clips")
        print(f"done: {result.global_step} steps, {result.seconds_per_step:.3f} s/step; vae_decoder_tiny added to "
              f"{result.bundle}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lcm_edge.distill",
                                     description="Decoupled consistency learning (AnimateLCM) on Accelerate.")
    _add_stages(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args),
                       interrupted="interrupted: resume with --resume latest "
                                   "(the steps since the last checkpoint are lost)")
