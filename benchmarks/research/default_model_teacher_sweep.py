"""How the default model's teachers improve with training compute, read by the detector.

    python benchmarks/research/default_model_teacher_sweep.py VARIANT [--device cuda] [--budget-s 480] [--out DIR]

Runs the chain's teacher steps (data, tokenizer, VAE, image teacher, motion teacher) with one
variant's step counts and settings, and every `check_every` steps samples the teacher (DDIM 25,
guidance 5, 24 trained prompts, seeds never trained on) and prints one JSON line of detector
rates. Made to size the CPU recipe from a GPU run: which step counts make shape and direction
follow the prompt. Stops cleanly at --budget-s, after printing what it has.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lcm_edge.distill.default_model.checks import direction_gain, load_teacher, sample_check_prompts, save_teacher
from lcm_edge.distill.default_model.clips import (caption_ids, clip_frames, encode_clips, make_training_clips,
                                                  train_tokenizer)
from lcm_edge.distill.default_model.pretrain import (ToyArchitecture, build_motion_adapter, build_text_encoder,
                                                     build_unet, build_vae, train_image_teacher, train_motion_teacher,
                                                     train_vae)

# 5b's settings, continued from a finished chain's teacher (the continue-* variants vary it).
CONTINUE = dict(resume=True, motion=3000, motion_batch=2, motion_lr=3e-4, spatial="all", check_motion=500)

# Step counts, batch sizes and settings of each variant; check_* = steps between two checks.
VARIANTS = {
    "image-long": dict(vae=2500, image=16000, image_batch=16, motion=0, motion_batch=2, motion_lr=1e-3,
                       spatial="cross_attention", check_image=2000, check_motion=1000),
    "motion-long": dict(vae=2500, image=2500, image_batch=16, motion=12000, motion_batch=2, motion_lr=1e-3,
                        spatial="cross_attention", check_image=2500, check_motion=1000),
    "motion-all": dict(vae=2500, image=2500, image_batch=16, motion=12000, motion_batch=2, motion_lr=5e-4,
                       spatial="all", check_image=2500, check_motion=1000),
    "batch4x": dict(vae=2500, image=2500, image_batch=64, motion=3000, motion_batch=8, motion_lr=1e-3,
                    spatial="cross_attention", check_image=500, check_motion=500),
    "joint": dict(vae=2500, image=1000, image_batch=16, motion=12000, motion_batch=2, motion_lr=1e-3,
                  spatial="all", check_image=1000, check_motion=1000),
    # With --resume WORKDIR: the chain's finished teacher, video training continued. continue-all = 5b's
    # settings; *-te also train the text encoder (te); *-hi train on timesteps >= 300 only (min_t);
    # *-x0wN weight the loss by clamp(1/SNR, 1, N) (x0w).
    "continue-all": CONTINUE,
    "continue-all-te": {**CONTINUE, "te": True},
    "continue-all-te-hi": {**CONTINUE, "te": True, "min_t": 300},
    "continue-all-te-lr1e3": {**CONTINUE, "te": True, "motion_lr": 1e-3},
    "continue-xattn-te": {**CONTINUE, "te": True, "spatial": "cross_attention"},
    "continue-motion-hi": {**CONTINUE, "spatial": "none", "motion_lr": 1e-3, "min_t": 300},
    **{f"continue-all-te-x0w{cap}": {**CONTINUE, "te": True, "x0w": float(cap)} for cap in (5, 20, 100, 1000)},
    "continue-all-x0w20": {**CONTINUE, "x0w": 20.0},
    # 16x the clips per step (batch 32): is the word learnt with far more video data (GPU only)?
    **{f"{name}-b32": {**base, "motion_batch": 32} for name, base in (
        ("continue-all", CONTINUE), ("continue-all-te", {**CONTINUE, "te": True}),
        ("continue-all-te-hi", {**CONTINUE, "te": True, "min_t": 300}),
        ("continue-all-te-x0w20", {**CONTINUE, "te": True, "x0w": 20.0}),
        # with --zero-snr: where the word is needed (benchmarks/research/default_model_ideal_gain.py), read often
        ("continue-all-te-often", {**CONTINUE, "te": True, "check_motion": 300}))},
    # With --zero-snr: pure noise in (t >= 990), the caption's mean clip out. Can this model place a track
    # from the word alone at all? (direction_gain read at t = 999 only: the steps below are not trained)
    "continue-top-te": {**CONTINUE, "te": True, "min_t": 990, "motion": 400, "motion_batch": 8, "motion_lr": 1e-3,
                        "check_motion": 100, "gain_t": (999,)},
    # Image teacher alone (batch 64 as in the chain), read every 500 steps.
    "image-only": dict(vae=2500, image=1500, image_batch=64, motion=0, motion_batch=2, motion_lr=1e-3,
                       spatial="cross_attention", check_image=500, check_motion=0),
    "image-only-long": dict(vae=2500, image=4000, image_batch=64, motion=0, motion_batch=2, motion_lr=1e-3,
                            spatial="cross_attention", check_image=500, check_motion=0),
    "tiny": dict(vae=3, image=4, image_batch=4, motion=4, motion_batch=1, motion_lr=1e-3,
                 spatial="cross_attention", check_image=2, check_motion=2),
}


def _fresh(args, arch: ToyArchitecture, v: dict, device: torch.device, log):
    """Data, tokenizer, a trained VAE and untrained image UNet + text encoder (the chain's steps 1-3)."""
    clips = make_training_clips(args.clips, arch, args.seed)
    captions = [c.caption for c in clips]
    tokenizer = train_tokenizer(Path(f"/tmp/sweep_{args.variant}") / "tokenizer", captions, arch)
    ids = caption_ids(tokenizer, captions, arch).to(device)
    empty_ids = caption_ids(tokenizer, [""], arch)[0].to(device)

    frames = clip_frames(np.stack([c.frames for c in clips])).to(device)
    vae = build_vae(arch).to(device)
    train_vae(vae, frames.flatten(0, 1), steps=v["vae"], batch_size=16, lr=2e-3, seed=args.seed, log=log, crop=32)
    video_latents = encode_clips(vae, frames)

    unet = build_unet(arch).to(device)
    text_encoder = build_text_encoder(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    return vae, unet, text_encoder.to(device), tokenizer, None, video_latents, captions, ids, empty_ids


class OutOfTime(Exception):
    """The budget is spent: stop training, keep what was printed."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--clips", type=int, default=1100)
    parser.add_argument("--check-prompts", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--resume", type=Path, default=None,
                        help="a chain WORKDIR: start from its finished teacher (the continue-* variants)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--zero-snr", action="store_true",
                        help="train (and read) with v-prediction on the zero-terminal-SNR schedule")
    args = parser.parse_args(argv)
    v = VARIANTS[args.variant]
    if (args.resume is not None) != v.get("resume", False):
        parser.error("--resume WORKDIR goes with the continue-* variants, and only with them")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # model init: two runs of one variant start from the same weights
    start = time.perf_counter()
    arch = ToyArchitecture(**(dict(prediction_type="v_prediction", rescale_betas_zero_snr=True) if args.zero_snr
                              else {}))
    log = lambda message: print(f"[{args.variant} {time.perf_counter() - start:6.0f}s] {message}",  # noqa: E731
                                flush=True)
    results = []

    if args.resume is not None:
        parts = load_teacher(args.resume, with_motion=True)
        vae, unet, text_encoder = (parts[k].to(device) for k in ("vae", "unet", "text_encoder"))
        tokenizer = parts["tokenizer"]
        adapter = parts["adapter"].to(device)
        video_latents = parts["video_latents"].to(device)
        captions = parts["captions"]
        ids = caption_ids(tokenizer, captions, arch).to(device)
        empty_ids = caption_ids(tokenizer, [""], arch)[0].to(device)
    else:
        vae, unet, text_encoder, tokenizer, adapter, video_latents, captions, ids, empty_ids = _fresh(args, arch, v,
                                                                                                   device, log)

    def check(stage: str, step: int) -> None:
        t0 = time.perf_counter()
        combos, detections = sample_check_prompts(vae, unet, text_encoder, tokenizer, empty_ids, arch, adapter,
                                                  prompts=args.check_prompts, steps=25, seed=args.seed)
        matches = [d.matches(*combo) for d, combo in zip(detections, combos)]
        row = {"variant": args.variant, "stage": stage, "step": step,
               "elapsed_s": round(time.perf_counter() - start, 1), "check_s": round(time.perf_counter() - t0, 1)}
        for key in ("colour", "shape", "direction"):
            row[key] = float(np.mean([m[key] for m in matches]))
        row["all"] = float(np.mean([all(m.values()) for m in matches]))
        row["consistency"] = float(np.mean([d.present_fraction * d.area_stability for d in detections]))
        row["direction_gain"] = direction_gain(unet, adapter, text_encoder, tokenizer, video_latents, captions,
                                               arch, timesteps=v.get("gain_t"), seed=args.seed)
        results.append(row)
        print("RESULT " + json.dumps(row), flush=True)
        if args.out is not None and stage == "motion" and step:  # as a chain WORKDIR holds it; replaced each time
            save_teacher(args.out / args.variant, unet, adapter, text_encoder)
        if time.perf_counter() - start > args.budget_s:
            raise OutOfTime

    image_latents = video_latents.permute(0, 2, 1, 3, 4).flatten(0, 1)
    try:
        if args.resume is not None and not args.zero_snr:  # an epsilon teacher read as a v one says nothing
            check("motion", 0)  # the chain's teacher as it is, read on the same prompts
        if v.get("image"):
            train_image_teacher(unet, text_encoder, image_latents, ids.repeat_interleave(arch.num_frames, dim=0),
                                empty_ids, arch, steps=v["image"], batch_size=v["image_batch"], lr=1e-3,
                                seed=args.seed + 1, log=log, on_checkpoint=lambda s: check("image", s),
                                checkpoint_every=v["check_image"])
        if v["motion"]:
            adapter = adapter if adapter is not None else build_motion_adapter(arch).to(device)
            train_motion_teacher(unet, adapter, text_encoder, video_latents, ids, empty_ids, arch,
                                 steps=v["motion"], batch_size=v["motion_batch"], lr=v["motion_lr"],
                                 seed=args.seed + 2, log=log, spatial=v["spatial"], min_timestep=v.get("min_t", 0),
                                 x0_weight_cap=v.get("x0w", 0.0), train_text_encoder=v.get("te", False),
                                 on_checkpoint=lambda s: check("motion", s), checkpoint_every=v["check_motion"])
    except OutOfTime:
        log("budget spent; stopping")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.variant}.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
