"""Does decoupled consistency learning learn? A CPU run on synthetic moving shapes, in minutes.

    .venv/bin/python benchmarks/distill_learns.py [--out DIR] [--quick] [--set FIELD=VALUE ...]

1. Data: coloured shapes moving in a straight line (distill/synthetic.py), as pixel-space "latents"
   (RGB + mean, 4 x 8 x 8 per frame, 8 frames): no VAE, so samples can be looked at directly.
2. Teacher: a tiny SD-style model trained from scratch the AnimateDiff way: a 2-D UNet on frames, then a
   motion module on clips with the 2-D weights frozen (plain diffusion loss, 10% empty captions for CFG).
3. Stage 1 (`train`, stage "image"): image consistency LoRA on frames, CFG-augmented DDIM solver,
   guidance fixed at CFG 7.5 (w = 6.5), the scale the paper's DDIM baselines use.
4. Stage 2 (`train`, stage "video"): temporal layers (zero-initialised) distilled from the video teacher,
   stage-1 LoRA merged into the online model only, EMA target.
5. Evaluation, same prompts and starting noise x_T for every sampler, in latent space: MSE to the
   teacher's 50-step guided DDIM sample of the student's 1/2/4/8-step LCM samples (every scheduler step
   done by the runtime's numpy scheduler) and of the teacher's own 1/2/4/8-step guided DDIM samples on
   the same timesteps. LCM multistep sampling re-noises at each step; "same noise" re-noises with x_T
   itself (a deterministic function of x_T, as DDIM is), "fresh noise" with new draws (the runtime's
   default; per-sample distance to an ODE solution then also counts that new randomness, so even a
   perfect consistency model would not reach zero: about 0.24 at 4 steps for this teacher, against 0.06
   with the same noise, measured by replacing the student with a 50-step ODE solve of the teacher).

Exit status 1 when the 4-step student (same noise) is not closer than the teacher's 4-step DDIM.

Writes DIR/results.json, DIR/results.md (the table) and DIR/samples.png (rows: prompts; columns: the
8 frames of teacher 50-step, teacher 4-step DDIM, student 4-step, student 1-step).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Scenario:
    clips: int = 96  # cycling through the 60 (colour, shape, direction) combinations
    frame_px: int = 16
    latent_px: int = 8
    frames: int = 8
    channels: tuple[int, int] = (32, 64)
    teacher_image_steps: int = 600
    teacher_image_batch: int = 16  # frames
    teacher_motion_steps: int = 400
    teacher_motion_batch: int = 2  # clips
    teacher_lr: float = 2e-3
    stage1_steps: int = 1500
    stage1_batch: int = 16
    stage1_lr: float = 1e-3
    stage2_steps: int = 2500
    stage2_batch: int = 1
    stage2_lr: float = 1e-3
    student_motion_init: str = "zero"  # the paper's; "teacher" starts from a copy of the teacher's module
    lr_scheduler: str = "cosine"
    lora_rank: int = 32
    # N of the DDIM solver grid (skip k = 1000 // N). LCM uses 50; 10 means 5x fewer bootstrap links from
    # t = 0 to t = 999, which is what makes a CPU-sized run converge (solver error: see teacher DDIM 8).
    num_ddim_timesteps: int = 10
    guidance_w: float = 6.5  # (1 + w) cond - w uncond = CFG 7.5, the paper's baselines; fixed: w_min = w_max
    ema_decay: float = 0.95
    eval_prompts: int = 8
    seed: int = 0


QUICK = Scenario(clips=48, teacher_image_steps=20, teacher_motion_steps=20, stage1_steps=10, stage2_steps=10,
                 eval_prompts=4)
SCHEDULE = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
            "num_ddim_timesteps": 50}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def batches_from(latents: list[torch.Tensor], captions: list[str], embeds: dict[str, torch.Tensor],
                 batch_size: int, seed: int, drop: float = 0.1):
    """Endless random batches of (x0, text embeddings), captions dropped to "" with probability `drop`."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(latents), batch_size)
        texts = ["" if rng.random() < drop else captions[i] for i in idx]
        yield torch.stack([latents[i] for i in idx]), torch.cat([embeds[t] for t in texts])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_learns"))
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Scenario field, e.g. --set stage2_steps=600")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these tiny ops do not parallelise, and on a shared "
                             "machine more threads than free cores thrash)")
    parser.add_argument("--keep", action="store_true", help="keep DIR/work (teacher, data, stage outputs)")
    parser.add_argument("--teacher-from", type=Path, default=None,
                        help="reuse DIR/work/teacher of an earlier --keep run with the same data settings")
    args = parser.parse_args(argv)

    from lcm_edge.distill import consistency as C
    from lcm_edge.distill.config import ScheduleConfig, config_from_dict, two_stage_configs
    from lcm_edge.distill.models import encode_prompts
    from tiny_sd import tiny_components
    from lcm_edge.distill.synthetic import latents_to_rgb, pixel_latents, synthetic_clips, write_pixel_latents
    from lcm_edge.distill.train import train

    torch.set_num_threads(args.threads)
    sc = QUICK if args.quick else Scenario()
    for item in args.set:  # e.g. --set stage2_steps=600
        key, _, value = item.partition("=")
        if key not in Scenario.__dataclass_fields__:
            parser.error(f"--set {item}: unknown field; fields: {sorted(Scenario.__dataclass_fields__)}")
        kind = type(getattr(sc, key))
        sc = replace(sc, **{key: kind(value) if kind is not tuple else tuple(int(v) for v in value.split(","))})
    out = args.out
    work = out / "work"
    if args.teacher_from is not None and args.teacher_from.resolve() == work.resolve():
        parser.error("--teacher-from must be another run's work folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    torch.manual_seed(sc.seed)
    schedule = ScheduleConfig(**{**SCHEDULE, "num_ddim_timesteps": sc.num_ddim_timesteps})
    acp = C.make_alphas_cumprod("linear", 0.00085, 0.012, 1000)

    # 1. Data.
    clips = synthetic_clips(sc.clips, seed=sc.seed, size=sc.frame_px, num_frames=sc.frames)
    write_pixel_latents(work / "video_latents", clips, sc.latent_px)
    write_pixel_latents(work / "image_latents", clips, sc.latent_px, images=True)
    video = [torch.from_numpy(pixel_latents(c.frames, sc.latent_px)) for c in clips]
    captions = [c.caption for c in clips]
    log(f"data: {len(clips)} clips of {sc.frames} frames, latents {tuple(video[0].shape)}")

    # 2. Teacher: 2-D model on frames, then a motion module on clips (spatial frozen), AnimateDiff-style.
    base = tiny_components(work / "tokenizer", seed=sc.seed, channels=sc.channels)
    embeds = {t: encode_prompts(base.tokenizer, base.text_encoder, [t], torch.device("cpu"))
              for t in sorted(set(captions)) + [""]}
    image_losses = motion_losses = [float("nan")]
    if args.teacher_from is not None:
        shutil.copytree(args.teacher_from / "teacher", work / "teacher")
        log(f"teacher reused from {args.teacher_from / 'teacher'}")
    else:
        image_losses, motion_losses = _train_teacher(sc, base, video, captions, embeds, acp, work, schedule)
    teacher_s = time.perf_counter() - started

    # 3-4. Stage 1 and stage 2 through the real training entry point.
    train_common = {"lr_scheduler": sc.lr_scheduler, "lr_warmup_steps": 20, "checkpointing_steps": 10_000,
                    "report_to": "none", "log_every": 50, "seed": sc.seed}
    stage1, stage2 = two_stage_configs(
        work, pretrained=work / "teacher", motion_adapter=work / "teacher" / "motion_adapter",
        schedule={**SCHEDULE, "num_ddim_timesteps": sc.num_ddim_timesteps},
        image_data={"kind": "latents", "root": str(work / "image_latents")},
        video_data={"kind": "latents", "root": str(work / "video_latents"), "num_frames": sc.frames},
        train=train_common, lora={"rank": sc.lora_rank, "alpha": float(sc.lora_rank)},
        consistency={"w_min": sc.guidance_w, "w_max": sc.guidance_w, "ema_decay": sc.ema_decay},
        image={"train": {"max_train_steps": sc.stage1_steps, "batch_size": sc.stage1_batch,
                         "learning_rate": sc.stage1_lr}},
        video={"model": {"student_motion_init": sc.student_motion_init},
               "train": {"max_train_steps": sc.stage2_steps, "batch_size": sc.stage2_batch,
                         "learning_rate": sc.stage2_lr}})
    t0 = time.perf_counter()
    r1 = train(config_from_dict(stage1))
    stage1_s = time.perf_counter() - t0
    cfg2 = config_from_dict(stage2)
    t0 = time.perf_counter()
    r2 = train(cfg2)
    stage2_s = time.perf_counter() - t0

    # 5. Evaluation from shared starting noise.
    student, teacher = r2.stage.online.eval(), r2.stage.teacher.eval()
    combos = sorted(set(captions))
    prompts = [combos[i] for i in np.random.default_rng(123).permutation(len(combos))[:sc.eval_prompts]]
    t0 = time.perf_counter()
    rows, samples, scale = evaluate(student, teacher, prompts, embeds, r2.stage.uncond_embeds, sc, schedule, acp)
    eval_s = time.perf_counter() - t0
    results = {
        "scenario": asdict(sc), "quick": args.quick,
        "metric": "mean squared error to the teacher's 50-step guided DDIM sample in latent space, same prompts "
                  f"and starting noise ({len(prompts)} prompts x {sc.frames} frames x 4 x {sc.latent_px}^2); "
                  f"variance of the reference samples {scale:.4f}",
        "rows": rows,
        "student_4_beats_teacher_ddim_4": rows[2]["student_same_noise_mse"] < rows[2]["teacher_ddim_mse"],
        "losses": {"teacher_2d_first10": float(np.mean(image_losses[:10])),
                   "teacher_2d_last10": float(np.mean(image_losses[-10:])),
                   "teacher_motion_first10": float(np.mean(motion_losses[:10])),
                   "teacher_motion_last10": float(np.mean(motion_losses[-10:])),
                   "stage1_first10": float(np.mean([r1.losses[k] for k in sorted(r1.losses)[:10]])),
                   "stage1_last10": float(np.mean([r1.losses[k] for k in sorted(r1.losses)[-10:]])),
                   "stage2_first10": float(np.mean([r2.losses[k] for k in sorted(r2.losses)[:10]])),
                   "stage2_last10": float(np.mean([r2.losses[k] for k in sorted(r2.losses)[-10:]]))},
        "seconds": {"teacher": teacher_s, "stage1": stage1_s, "stage2": stage2_s, "eval": eval_s,
                    "total": time.perf_counter() - started,
                    "stage1_per_step": r1.seconds_per_step, "stage2_per_step": r2.seconds_per_step},
        "prompts": prompts, "torch_threads": torch.get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = _table(rows)
    (out / "results.md").write_text(results["metric"] + "\n\n" + table + "\n", encoding="utf-8")
    _figure(out / "samples.png", prompts[:4], samples, latents_to_rgb)
    print(table)
    print(json.dumps({k: results[k] for k in ("losses", "seconds", "student_4_beats_teacher_ddim_4")}, indent=2))
    if not args.keep:
        shutil.rmtree(work)
    return 0 if results["student_4_beats_teacher_ddim_4"] or args.quick else 1


@torch.no_grad()
def evaluate(student, teacher, prompts, embeds, uncond, sc: Scenario, schedule, acp):
    """MSE to the teacher's 50-step guided DDIM samples, from the same prompts and starting noise x_T.

    LCM multistep sampling re-noises with a fresh draw z_i at every step but the last (Algorithm 3).
    "same noise" passes z_i = x_T (the starting noise) to the runtime scheduler, which makes the student's
    sample a deterministic function of x_T like the teacher's; "fresh noise" draws new z_i (the runtime's
    default), for which per-sample distance to the teacher's ODE solution also counts the new randomness.
    """
    from lcm_edge.distill import consistency as C
    from lcm_edge.distill.sampling import guided_model, sample_ddim, sample_lcm
    from lcm_edge.scheduler import LCMScheduler, SchedulerConfig

    text = torch.cat([embeds[p] for p in prompts])
    shape = (len(prompts), 4, sc.frames, sc.latent_px, sc.latent_px)
    g = torch.Generator().manual_seed(1234)
    x_T = torch.randn(shape, generator=g)
    fresh = [torch.randn(shape, generator=g).numpy() for _ in range(8)]
    lcm = LCMScheduler(SchedulerConfig.from_dict(schedule.lcm_scheduler_config()))
    teacher_fn = guided_model(teacher, text, uncond, sc.guidance_w)

    def student_fn(x, t):
        return student(x, t, text).float()

    # The reference: 50 DDIM steps on the 1000 // 50 grid, whatever grid the student was distilled on.
    reference = sample_ddim(teacher_fn, x_T, C.lcm_inference_timesteps(50, 1000, 50).tolist(), acp, "epsilon")
    samples = {"teacher DDIM 50 (reference)": reference}
    rows = []
    for n in (1, 2, 4, 8):
        timesteps = lcm.set_timesteps(n).tolist()
        samples[f"teacher DDIM {n}"] = sample_ddim(teacher_fn, x_T, timesteps, acp, "epsilon")
        samples[f"student LCM {n}"] = sample_lcm(student_fn, x_T, lcm, n, lambda i: x_T.numpy())
        samples[f"student LCM {n} fresh"] = sample_lcm(student_fn, x_T, lcm, n, lambda i: fresh[i])
        rows.append({"steps": n, "timesteps": timesteps,
                     "student_same_noise_mse": _mse(samples[f"student LCM {n}"], reference),
                     "student_fresh_noise_mse": _mse(samples[f"student LCM {n} fresh"], reference),
                     "teacher_ddim_mse": _mse(samples[f"teacher DDIM {n}"], reference),
                     "student_unet_passes": n, "teacher_unet_passes": 2 * n})
    return rows, samples, float(reference.var())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def _table(rows: list[dict]) -> str:
    lines = ["| steps | student LCM, same noise | student LCM, fresh noise | teacher DDIM | UNet passes "
             "student / teacher |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['student_same_noise_mse']:.4f} | {r['student_fresh_noise_mse']:.4f} | "
                     f"{r['teacher_ddim_mse']:.4f} | {r['student_unet_passes']} / {r['teacher_unet_passes']} |")
    return "\n".join(lines)


def _train_teacher(sc, base, video, captions, embeds, acp, work, schedule):
    from lcm_edge.distill.models import Denoiser, fresh_motion_adapter, inflate, load_motion_adapter, save_base
    from lcm_edge.distill.pretrain import pretrain
    from lcm_edge.distill.train import save_motion_adapter

    frames = [v[:, f] for v in video for f in range(sc.frames)]
    frame_caps = [c for c in captions for _ in range(sc.frames)]
    image_model = Denoiser(base.unet)
    t0 = time.perf_counter()
    image_losses = pretrain(image_model, batches_from(frames, frame_caps, embeds, sc.teacher_image_batch, sc.seed),
                            acp, steps=sc.teacher_image_steps, learning_rate=sc.teacher_lr, seed=sc.seed)
    log(f"teacher 2-D: {sc.teacher_image_steps} steps, loss {np.mean(image_losses[:10]):.4f} -> "
        f"{np.mean(image_losses[-10:]):.4f} ({time.perf_counter() - t0:.0f} s)")
    motion = fresh_motion_adapter(base.motion_adapter)
    video_unet = inflate(base.unet, motion)
    for name, p in video_unet.named_parameters():
        p.requires_grad_("motion_modules" in name)
    t0 = time.perf_counter()
    motion_losses = pretrain(Denoiser(video_unet),
                             batches_from(video, captions, embeds, sc.teacher_motion_batch, sc.seed + 1), acp,
                             steps=sc.teacher_motion_steps, learning_rate=sc.teacher_lr, seed=sc.seed + 1)
    log(f"teacher motion module: {sc.teacher_motion_steps} steps, loss {np.mean(motion_losses[:10]):.4f} -> "
        f"{np.mean(motion_losses[-10:]):.4f} ({time.perf_counter() - t0:.0f} s)")
    save_motion_adapter(video_unet, dict(motion.config), work / "teacher_motion")
    base.motion_adapter = load_motion_adapter(work / "teacher_motion", base.unet)
    save_base(base, work / "teacher", schedule)
    return image_losses, motion_losses


def _figure(path: Path, prompts: list[str], samples: dict, to_rgb) -> None:
    """Rows: prompts; per row, four strips of frames: teacher 50, teacher DDIM 4, student 4, student 1."""
    import cv2

    columns = ["teacher DDIM 50 (reference)", "teacher DDIM 4", "student LCM 4", "student LCM 1"]
    zoom, pad = 4, 4
    rows = []
    for i, prompt in enumerate(prompts):
        strips = []
        for name in columns:
            rgb = to_rgb(samples[name][i].numpy())  # (F, s, s, 3)
            strip = np.concatenate([np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=255) for f in rgb], axis=1)
            strips.append(np.kron(strip, np.ones((zoom, zoom, 1), np.uint8)))
            strips.append(np.full((strips[-1].shape[0], pad * zoom, 3), 255, np.uint8))
        row = np.concatenate(strips[:-1], axis=1)
        label = np.full((14, row.shape[1], 3), 255, np.uint8)
        cv2.putText(label, f"{prompt}   [teacher 50 | teacher DDIM 4 | student 4 | student 1]", (2, 11),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        rows += [label, row, np.full((6, row.shape[1], 3), 255, np.uint8)]
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    sys.exit(main())
