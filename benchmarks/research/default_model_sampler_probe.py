"""Read a chain's teacher or stage-2 student in torch, under any sampler, with the eval's prompts and detector.

One job per mode:

    # sample: one JSON line of the eval's columns (default_model_eval.score) and s/clip per step count
    python benchmarks/research/default_model_sampler_probe.py sample --teacher WORK/teacher \
        --motion WORK/teacher_motion [--lora WORK/stage1/lora --lora-weight 0.5] --scheduler lcm|ddim \
        --steps 1 2 4 8 [--guidance 1.0]
    python benchmarks/research/default_model_sampler_probe.py sample --model WORK/stage2/model --steps 1 2 4 8
    # ... or one line for explicit timesteps (with --scheduler ddim: lcm_edge.distill.sampling's guided DDIM)
    python benchmarks/research/default_model_sampler_probe.py sample --teacher WORK/teacher \
        --motion WORK/teacher_motion --scheduler ddim --guidance 4 --timesteps 999 699 399 199
    # trace: what each LCM step's x_0 prediction reads, and the direction flips between steps
    python benchmarks/research/default_model_sampler_probe.py trace --model WORK/stage2/model \
        --timesteps 999 799 499 299
    # teacher-check: does the guided teacher keep, from the student's re-noised first prediction, its direction?
    python benchmarks/research/default_model_sampler_probe.py teacher-check --model WORK/stage2/model \
        --teacher WORK/teacher --motion WORK/teacher_motion

It tells where a prompt attribute is lost between teacher, stage 1 and stage 2 without exporting a bundle per
variant (default_model_teacher_sweep/README.md, "The word is lost in stage 1's LoRA"). Clip i is sampled at
--seed-base + i; the eval split's seeds are refused.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # default_model_eval, one folder up
from default_model_eval import (EVAL_PROMPTS, EVAL_SEED_BASE, caption_for, first_prompts_adherence,  # noqa: E402
                                prompt_set, sample_diffusers, score, tune_seed_base)

FRAMES = 16  # the eval's clip length


def build_pipeline(*, model: Path | None = None, teacher: Path | None = None, motion: Path | None = None,
                   lora: Path | None = None, lora_weight: float = 1.0, scheduler: str = "lcm"):
    """A diffusers AnimateDiffPipeline of a stage-2 model folder, or of the teacher (+ motion, + merged LoRA)."""
    from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, LCMScheduler, MotionAdapter,
                           UNet2DConditionModel, UNetMotionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    local = {"local_files_only": True}
    root = model or teacher
    if model:
        unet, adapter = UNetMotionModel.from_pretrained(model / "unet", **local), None
    else:
        unet = UNet2DConditionModel.from_pretrained(teacher / "unet", **local)
        if lora:
            from lcm_edge.distill.lora_io import merge_lora_

            merge_lora_(unet, lora, weight=lora_weight, argument="--lora")
        adapter = MotionAdapter.from_pretrained(motion, **local)
    config = DDIMScheduler.load_config(root / "scheduler")
    if scheduler == "lcm":
        noise_scheduler = LCMScheduler.from_config(config)
    else:
        # A stage-2 folder carries LCM's "leading" spacing, whose few-step DDIM would start at t = 750, not from
        # pure noise; the teacher's own config is "trailing" already.
        noise_scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    pipe = AnimateDiffPipeline(vae=AutoencoderKL.from_pretrained(root / "vae", **local),
                               text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", **local),
                               tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", **local),
                               unet=unet, motion_adapter=adapter, scheduler=noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoded(pipe, latents):
    """A pipeline's latents as the eval's uint8 clip (frames, height, width, 3)."""
    import numpy as np
    import torch

    with torch.no_grad():
        video = pipe.video_processor.postprocess_video(video=pipe.decode_latents(latents), output_type="np")
    return (video[0] * 255).round().astype(np.uint8)


def clip_start(pipe, combo, seed: int):
    """(generator, prompt embeddings, empty-prompt embeddings, latents) the pipeline itself starts clip `seed` from."""
    import torch

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(seed)
    text, uncond = pipe.encode_prompt(caption_for(*combo), "cpu", 1, True, "")
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, FRAMES, size, size, text.dtype, "cpu",
                                   generator, None)
    return generator, text, uncond, latents


def per_frame_unet(pipe):
    """The pipeline's motion UNet as a (x, t, text) model: diffusers' takes the prompt once per frame."""
    return lambda x, t, text: pipe.unet(x, t, encoder_hidden_states=text.repeat_interleave(FRAMES, 0)).sample


def use_timesteps(pipe, timesteps: list[int]) -> None:
    """Make the LCM pipeline sample at `timesteps` whatever step count it is asked for."""
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda *_, **kw: set_timesteps(timesteps=timesteps, device=kw.get("device"))


def sample_ddim_on(pipe, combos, timesteps: list[int], guidance: float, seed_base: int):
    """Guided DDIM on explicit timesteps (diffusers' DDIMScheduler steps by a fixed stride, so this runs the
    distill package's `sample_ddim`), from the latents the pipeline itself would start clip i from."""
    import torch

    from lcm_edge.distill.sampling import guided_model, sample_ddim

    unet = per_frame_unet(pipe)
    clips, start = [], time.perf_counter()
    with torch.no_grad():
        for i, combo in enumerate(combos):
            _, text, uncond, latents = clip_start(pipe, combo, seed_base + i)
            model_fn = guided_model(unet, text, uncond, guidance - 1.0)  # diffusers' g is (1 + w) here
            x0 = sample_ddim(model_fn, latents, timesteps, pipe.scheduler.alphas_cumprod,
                             pipe.scheduler.config.prediction_type)
            clips.append(decoded(pipe, x0))
    return clips, (time.perf_counter() - start) / len(combos)


def sample(args, combos) -> int:
    """One row per step count (or one for --timesteps): the eval's columns and s/clip."""
    pipe = build_pipeline(model=args.model, teacher=args.teacher, motion=args.motion, lora=args.lora,
                          lora_weight=args.lora_weight, scheduler=args.scheduler)
    if args.timesteps and args.scheduler == "lcm":
        use_timesteps(pipe, args.timesteps)
    for steps in [len(args.timesteps)] if args.timesteps else args.steps:
        if args.timesteps and args.scheduler == "ddim":
            clips, seconds_per_clip = sample_ddim_on(pipe, combos, args.timesteps, args.guidance, args.seed_base)
        else:
            clips, seconds_per_clip = sample_diffusers(pipe, combos, steps, args.guidance, args.seed_base)
        print(json.dumps({"scheduler": args.scheduler, "steps": steps, "guidance": args.guidance,
                          "clips": len(combos), "seed_base": args.seed_base,
                          **({"lora_weight": args.lora_weight} if args.lora else {}),
                          **({"timesteps": args.timesteps} if args.timesteps else {}),
                          **{key: round(value, 3) for key, value in
                             {**score(clips, combos), **first_prompts_adherence(clips, combos)}.items()},
                          "s_per_clip": round(seconds_per_clip, 2)}), flush=True)
    return 0


def trace(args, combos) -> int:
    """Decode the LCM sampler's x_0 prediction after every step: one row of the eval's columns per step, then
    how many clips' detected direction turned right -> wrong and wrong -> right between consecutive steps."""
    from lcm_edge.distill.default_model.detector import detect

    pipe = build_pipeline(model=args.model, teacher=args.teacher, motion=args.motion, lora=args.lora,
                          lora_weight=args.lora_weight)
    steps = args.steps
    if args.timesteps:
        use_timesteps(pipe, args.timesteps)
        steps = len(args.timesteps)
    predictions, step = [], pipe.scheduler.step

    @functools.wraps(step)  # keeps step's signature: the pipeline passes `generator` only to a step that takes one
    def recording_step(*a, **kw):
        out = step(*a, **kw)
        predictions.append(out.denoised.detach())
        return out

    pipe.scheduler.step = recording_step
    sample_diffusers(pipe, combos, steps, 1.0, args.seed_base)  # the probe's own clips; `steps` predictions per clip
    per_step = [[decoded(pipe, predictions[i * steps + k]) for i in range(len(combos))] for k in range(steps)]
    timesteps = pipe.scheduler.timesteps.tolist()
    directions = [[detect(clip).direction for clip in clips] for clips in per_step]
    for k, clips in enumerate(per_step):
        print(json.dumps({"step": k + 1, "t": timesteps[k], "clips": len(combos),
                          **{key: round(value, 3) for key, value in score(clips, combos).items()}}), flush=True)
    truth = [combo[2] for combo in combos]
    for k in range(1, steps):
        pairs = list(zip(directions[k - 1], directions[k], truth))
        print(json.dumps({"from_step": k, "to_step": k + 1,
                          "right_to_wrong": sum(a == t != b for a, b, t in pairs),
                          "wrong_to_right": sum(a != t == b for a, b, t in pairs)}), flush=True)
    return 0


def teacher_check(args, combos) -> int:
    """Does the teacher keep what the student's first step chose? Per clip: the direction of the student's first
    x_0 prediction, of its second, and of the guided teacher's DDIM (8 steps, w at the mean of the range stage 2
    drew from at each timestep) from the same re-noised x at the student's second timestep; and, for reference,
    of that teacher from the clip's pure noise. The student samples its own 4-step LCM schedule."""
    import numpy as np
    import torch

    from lcm_edge.distill.default_model.chain import GUIDANCE_W, STAGE2_HIGH_W, STAGE2_HIGH_W_FROM
    from lcm_edge.distill.default_model.detector import detect
    from lcm_edge.distill.sampling import guided_model, sample_ddim

    pipe = build_pipeline(model=args.model)
    teacher = build_pipeline(teacher=args.teacher, motion=args.motion, scheduler="ddim")
    config = teacher.scheduler.config
    direction = lambda p, latents: detect(decoded(p, latents)).direction  # noqa: E731
    teacher_unet, student_unet = per_frame_unet(teacher), per_frame_unet(pipe)

    def teacher_ddim(x, start, text, uncond):
        high = guided_model(teacher_unet, text, uncond, sum(STAGE2_HIGH_W) / 2)
        low = guided_model(teacher_unet, text, uncond, sum(GUIDANCE_W) / 2)
        model_fn = lambda x, t: (high if int(t[0]) >= STAGE2_HIGH_W_FROM else low)(x, t)  # noqa: E731
        timesteps = [int(t) for t in np.linspace(start, 0, 9)[:-1].round()]
        return sample_ddim(model_fn, x, timesteps, teacher.scheduler.alphas_cumprod, config.prediction_type)

    pipe.scheduler.set_timesteps(4)
    t1, t2 = (int(t) for t in pipe.scheduler.timesteps[:2])
    read = {"first": [], "student_second": [], "teacher_from_second": [], "teacher_from_noise": []}
    with torch.no_grad():
        for i, combo in enumerate(combos):
            generator, text, uncond, latents = clip_start(pipe, combo, args.seed_base + i)
            pipe.scheduler.set_timesteps(4)  # the LCM scheduler counts its steps: start each clip afresh
            first = pipe.scheduler.step(student_unet(latents, t1, text), t1, latents, generator=generator)
            second = pipe.scheduler.step(student_unet(first.prev_sample, t2, text), t2, first.prev_sample,
                                         generator=generator)
            read["first"].append(direction(pipe, first.denoised))
            read["student_second"].append(direction(pipe, second.denoised))
            read["teacher_from_second"].append(direction(teacher, teacher_ddim(first.prev_sample, t2, text, uncond)))
            read["teacher_from_noise"].append(direction(teacher, teacher_ddim(latents, t1, text, uncond)))
    truth = [combo[2] for combo in combos]
    right = {key: [a == b for a, b in zip(values, truth)] for key, values in read.items()}
    print(json.dumps({"clips": len(combos), "timesteps": [t1, t2],
                      **{f"direction_{key}": round(float(np.mean(values)), 3) for key, values in right.items()},
                      **{f"{key}_turned_right_to_wrong": sum(a and not b for a, b in zip(right["first"], right[key]))
                         for key in ("student_second", "teacher_from_second")}}), flush=True)
    return 0


def main() -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prompts", type=int, default=EVAL_PROMPTS)
    common.add_argument("--seeds", type=int, default=1, help="clips per prompt, as the eval's --seeds")
    common.add_argument("--threads", type=int, default=None)
    common.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE,
                        help="clip i at this seed + i (another base: a second sample to choose a sampler on)")
    common.add_argument("--teacher", type=Path, help="WORK/teacher (with --motion)")
    common.add_argument("--motion", type=Path, help="WORK/teacher_motion")
    common.add_argument("--model", type=Path, help="a stage-2 model/ folder")
    one_model = argparse.ArgumentParser(add_help=False)
    one_model.add_argument("--lora", type=Path, help="a stage-1 lora/ folder, merged into the teacher's UNet")
    one_model.add_argument("--lora-weight", type=float, default=1.0)
    one_model.add_argument("--timesteps", type=int, nargs="+", default=None,
                           help="the sampler's timesteps, largest first (instead of --steps)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    rows = modes.add_parser("sample", parents=[common, one_model], help="the eval's columns per step count")
    rows.add_argument("--scheduler", choices=("lcm", "ddim"), default="lcm")
    rows.add_argument("--steps", type=int, nargs="+", default=[4])
    rows.add_argument("--guidance", type=float, default=1.0, help="diffusers' form; 1.0 = no guidance")
    steps = modes.add_parser("trace", parents=[common, one_model], help="every LCM step's x_0 prediction, read")
    steps.add_argument("--steps", type=int, default=4)
    modes.add_parser("teacher-check", parents=[common], help="the guided teacher from the student's second x")
    args = parser.parse_args()

    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.mode == "teacher-check":
        if args.model is None or args.teacher is None or args.motion is None:
            parser.error("teacher-check reads both: give --model WORK/stage2/model and --teacher WORK/teacher "
                         "--motion WORK/teacher_motion")
    else:
        if (args.model is None) == (args.teacher is None):
            parser.error("give --model WORK/stage2/model or --teacher WORK/teacher --motion WORK/teacher_motion")
        if args.teacher is not None and args.motion is None:
            parser.error("--teacher needs --motion WORK/teacher_motion")
        if args.model is not None and args.lora is not None:
            parser.error("--lora merges into --teacher; a stage-2 model folder has its LoRA merged already")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    combos = prompt_set(args.prompts, args.seeds)
    tune_seed_base(args.seed_base, len(combos))
    return {"sample": sample, "trace": trace, "teacher-check": teacher_check}[args.mode](args, combos)


if __name__ == "__main__":
    sys.exit(main())
