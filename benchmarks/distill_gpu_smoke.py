"""First run on a GPU: a few steps of every distillation stage at real SD1.5 sizes, bf16, with timings.

    python benchmarks/distill_gpu_smoke.py [--out DIR] [--steps 6] [--frames 16] [--resolution 512]

Random weights in the SD1.5 / AnimateLCM architectures (UNet 320-640-1280-1280, CLIP-L-sized text tower,
SD VAE, AnimateLCM's MotionAdapter: configs from lcm_edge.export.sd15_configs), synthetic moving-shape
videos decoded and VAE-encoded on the fly, bf16 autocast, gradient checkpointing, batch 1. Runs stage
image -> stage video (with the stage-1 LoRA) -> stage adapter (image-to-video, on the stage-2 motion
module), each through `lcm_edge.distill.train`, and reports per stage: median seconds per optimizer step
(first two steps excluded: kernel selection, allocator warm-up; the last
one too: it writes a checkpoint) and peak GPU memory.

This is what to run first on your own GPU: if it passes, the same configs with your SD1.5 folder,
AnimateDiff motion module and data are what differs. Refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_gpu_smoke"))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per stage (>= 3)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="check this script's logic on CPU with tiny models (no timings worth reading)")
    args = parser.parse_args(argv)

    import torch

    if args.dry_run_cpu:
        args.frames, args.resolution, args.steps = 4, 16, 3
    elif not torch.cuda.is_available():
        print("error: distill_gpu_smoke needs a CUDA GPU (torch.cuda.is_available() is False). Fix: run it on a "
              "machine with an NVIDIA GPU and a CUDA build of torch; on CPU run tests/test_distill_*.py or "
              "benchmarks/distill_learns.py instead", file=sys.stderr)
        return 2
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first two are warm-up)")

    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel

    from lcm_edge.distill.config import config_from_dict, two_stage_configs
    from lcm_edge.distill.models import BaseModels, load_motion_adapter
    from tiny_sd import char_tokenizer, tiny_components
    from lcm_edge.distill.synthetic import synthetic_clips, write_image_dataset, write_video_dataset
    from lcm_edge.distill.train import train
    from lcm_edge.export.sd15_configs import (ANIMATELCM_ADAPTER_CONFIG, ANIMATELCM_SCHEDULER_CONFIG,
                                              SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG)

    out = args.out
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)  # a fresh run every time (train() refuses to mix runs)
    work.mkdir(parents=True)
    cuda = not args.dry_run_cpu
    device = torch.device("cuda" if cuda else "cpu")
    gpu = torch.cuda.get_device_name(device) if cuda else "none (--dry-run-cpu)"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
    print(f"GPU: {gpu}, torch {torch.__version__}, {args.precision}, {args.frames} frames at {args.resolution}px")

    # Data: 8 moving-shape clips, decoded and VAE-encoded on the fly (the real data path).
    clips = synthetic_clips(8, seed=0, size=16 if args.dry_run_cpu else 128, num_frames=args.frames)
    write_video_dataset(work / "videos", clips)
    write_image_dataset(work / "images", clips)

    def make_base(motion: str | None = None) -> BaseModels:
        """Random SD1.5-sized components, built directly on the GPU (fast init, no host copy)."""
        if args.dry_run_cpu:
            base = tiny_components(work / "tokenizer")
            if motion is not None:
                base.motion_adapter = load_motion_adapter(motion, base.unet)
            return base
        tokenizer = char_tokenizer(work / "tokenizer")
        text_config = dict(SD15_TEXT_ENCODER_CONFIG, vocab_size=len(tokenizer), bos_token_id=len(tokenizer) - 2,
                           eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
        torch.manual_seed(0)
        with device:
            unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
            base = BaseModels(unet=unet, text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
                              tokenizer=tokenizer, vae=AutoencoderKL.from_config(SD15_VAE_CONFIG),
                              motion_adapter=MotionAdapter.from_config(ANIMATELCM_ADAPTER_CONFIG))
        if motion is not None:
            base.motion_adapter = load_motion_adapter(motion, base.unet).to(device)
        return base

    schedule = {k: ANIMATELCM_SCHEDULER_CONFIG[k] for k in ("beta_schedule", "beta_start", "beta_end",
                                                             "prediction_type", "num_train_timesteps")}
    train_common = {"max_train_steps": args.steps, "batch_size": 1,
                    "mixed_precision": "no" if args.dry_run_cpu else args.precision,
                    "gradient_checkpointing": True, "checkpointing_steps": args.steps, "report_to": "tensorboard",
                    "log_every": 1, "vae_batch_size": 4}
    video_data = {"kind": "videos", "root": str(work / "videos"), "resolution": args.resolution,
                  "num_frames": args.frames, "frame_stride": 1, "center_crop": False}
    pretrained = work / "unused-in-memory-base"
    stage1, stage2 = two_stage_configs(
        work, pretrained=pretrained, motion_adapter=work / "teacher_motion", schedule=schedule,
        image_data={"kind": "images", "root": str(work / "images"), "resolution": args.resolution},
        video_data=video_data, train=train_common, lora={"rank": 4 if args.dry_run_cpu else 64, "alpha": 64.0},
        consistency={"w_min": 5.0, "w_max": 15.0})

    results = {"gpu": gpu, "torch": torch.__version__, "precision": args.precision, "frames": args.frames,
               "resolution": args.resolution, "steps": args.steps, "stages": {}}

    def run(name: str, cfg_dict: dict, base: BaseModels):
        cfg = config_from_dict(cfg_dict)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        stamps: list[float] = []
        sync()
        stamps.append(time.perf_counter())

        def tick(step, loss):
            sync()
            stamps.append(time.perf_counter())

        result = train(cfg, base=base, callback=tick)
        durations = [b - a for a, b in zip(stamps, stamps[1:])]
        # Steps 1-2 warm up (kernel selection, allocator); the last one also writes a checkpoint.
        timed = durations[2:-1] if len(durations) > 3 else durations[2:]
        entry = {"seconds_per_step_median": statistics.median(timed),
                 "seconds_per_step_all": durations,
                 "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
                 "losses": result.losses, "trainable_parameters": sum(
                     p.numel() for p in result.stage.online.parameters() if p.requires_grad)}
        results["stages"][name] = entry
        print(f"{name}: {entry['seconds_per_step_median']:.2f} s/step (median of steps 3..{max(args.steps - 1, 3)}), "
              f"peak {entry['peak_gpu_memory_gib']:.1f} GiB, losses {list(result.losses.values())}", flush=True)
        del result
        if cuda:
            torch.cuda.empty_cache()
        return cfg

    cfg1 = run("image", stage1, make_base())
    lora = Path(cfg1.train.output_dir) / "lora"
    motion_src = work / "teacher_motion"
    torch.manual_seed(1)
    teacher_motion = (tiny_components(work / "tokenizer").motion_adapter if args.dry_run_cpu
                      else MotionAdapter.from_config(ANIMATELCM_ADAPTER_CONFIG))
    teacher_motion.save_pretrained(motion_src)  # a random "AnimateDiff" teacher module
    cfg2 = run("video", stage2, make_base(str(motion_src)))
    student_motion = Path(cfg2.train.output_dir) / "motion_adapter"
    run("adapter_i2v", {**stage2, "stage": "adapter", "adapter": {"kind": "image_to_video"},
                        "lora": stage1["lora"],
                        "model": {"pretrained": str(pretrained), "motion_adapter": str(student_motion),
                                  "lora": str(lora)},
                        "train": {**train_common, "output_dir": str(work / "adapter")}},
        make_base(str(student_motion)))

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: {m: v[m] for m in ("seconds_per_step_median", "peak_gpu_memory_gib")}
                      for k, v in results["stages"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
