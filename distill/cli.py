"""`distill image|video|adapter --config FILE`: the command line of lcm_edge.distill.

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


def _add_stages(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", required=True, metavar="{image,video,adapter}")
    for stage, help_text in STAGE_HELP.items():
        p = stages.add_parser(stage, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, required=True, help="training config (.json or .toml)")
        p.add_argument("--resume", default=None,
                       help="override train.resume: 'latest', 'auto' or a checkpoint folder")
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
