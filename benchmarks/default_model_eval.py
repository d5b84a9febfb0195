"""Evaluate the default model like the AnimateLCM paper's Table 1, at toy scale.

    python benchmarks/default_model_eval.py --teacher WORKDIR/teacher --teacher-motion WORKDIR/teacher_motion
        [--split tune|eval] [--bundle BUNDLE] [--prompts 60] [--seeds 1] [--guidance 4.0] [--out results/default_model]
        [--student-steps 1 2 4 8] [--teacher-steps 1 2 4 8 25 50] [--rows-from earlier/results.json]
        [--threads N]

Rows: the shipped consistency model (lcm_edge runtime, onnxruntime CPU) at 1/2/4/8 steps
without guidance, and the teacher (diffusers AnimateDiffPipeline + DDIMScheduler, the same
weights it was trained as) at 1/2/4/8/25/50 steps with classifier-free guidance. Columns,
read off each clip by `lcm_edge.distill.default_model.detector` (no model in the loop):
prompt adherence (colour, shape and direction all right), each attribute alone, the same on
colour-shape-direction combinations held out of training, and temporal consistency (object
present in every frame with a stable size). Seeds are never used in training; --split picks them: "tune"
(seed base 10000, what the recipe and its probes were chosen on) or "eval" (seed base 50000, disjoint, never used
to choose anything: the probes refuse it). Every row records the model's sha256, the code's commit and its seed base.
Writes table.md, results.json, plot.png and samples.png (the 4-step student's first clips) to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from lcm_edge.distill.default_model.chain import code_version
from lcm_edge.distill.default_model.clips import HELD_OUT
from lcm_edge.distill.default_model.detector import detect
from lcm_edge.distill.synthetic import COLOURS, DIRECTIONS, SHAPES, caption_for

# Seed bases of the two splits, far from the training seeds (0..). Clip i of a split is sampled at base + i; the
# eval split's SPLIT_SEEDS seeds are never used to choose anything (tune_seed_base refuses them).
SEED_BASES = {"tune": 10_000, "eval": 50_000}
SPLIT_SEEDS = 10_000
EVAL_SEED_BASE = SEED_BASES["tune"]  # the probes' default


def tune_seed_base(seed_base: int, clips: int) -> int:
    """`seed_base` for a probe of `clips` clips, refused if any of its seeds is one of the eval split's."""
    low = SEED_BASES["eval"]
    if seed_base < low + SPLIT_SEEDS and seed_base + clips > low:
        raise SystemExit(f"seed base {seed_base} ({clips} clips) reaches the eval split's seeds {low}-"
                         f"{low + SPLIT_SEEDS - 1}, kept for measuring what the tune seeds chose: use another base")
    return seed_base


def sha256_of(*paths: Path) -> str:
    """sha256 over the files' bytes, in order: a bundle's manifest (which lists every file's own sha256) or a
    teacher's weights."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# Every colour-shape-direction combination once (the held-out ones first). Up to v5 the table read the first 24;
# on those the teacher's 4-step DDIM looked 0.15 better than on all 60, a sampling error the full set removes.
EVAL_PROMPTS = 60
FIRST_PROMPTS = 24


def first_prompts_adherence(clips, combos) -> dict:
    """Adherence on the first FIRST_PROMPTS prompts (the v1-v5 tables' set, same seeds), to compare with them."""
    if len(combos) <= FIRST_PROMPTS:
        return {}
    return {f"adherence_first_{FIRST_PROMPTS}": score(clips[:FIRST_PROMPTS], combos[:FIRST_PROMPTS])["adherence"]}


def prompt_set(count: int, seeds: int = 1) -> list[tuple[str, str, str]]:
    """All held-out combinations first, then a fixed spread of the trained ones; the whole list `seeds` times.

    Clip i is sampled at seed base + i, so the first repetition is exactly the one-seed set.
    """
    trained = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS if (c, s, d) not in HELD_OUT]
    rng = np.random.default_rng(1234)
    order = rng.permutation(len(trained))
    return (list(HELD_OUT) + [trained[i] for i in order[: max(0, count - len(HELD_OUT))]]) * seeds


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate over n clips: how far one sample of prompts and seeds can move it."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))  # rounding at rate 0 or 1


def score(clips: list[np.ndarray], combos: list[tuple[str, str, str]]) -> dict:
    rows = []
    for frames, combo in zip(clips, combos):
        d = detect(frames)
        m = d.matches(*combo)
        rows.append({**m, "all": all(m.values()), "held_out": combo in HELD_OUT,
                     "consistency": d.present_fraction * d.area_stability})
    pick = lambda key, held: [r[key] for r in rows if held is None or r["held_out"] == held]  # noqa: E731
    return {
        "adherence": float(np.mean(pick("all", None))),
        "colour": float(np.mean(pick("colour", None))),
        "shape": float(np.mean(pick("shape", None))),
        "direction": float(np.mean(pick("direction", None))),
        "adherence_held_out": float(np.mean(pick("all", True))),
        "consistency": float(np.mean(pick("consistency", None))),
    }


def run_student(bundle: str, combos, steps: int, threads: int | None,
                seed_base: int = EVAL_SEED_BASE) -> tuple[list[np.ndarray], float, list[int]]:
    """Clips, s/clip and the schedule sampled (the bundle's tuned one for `steps`, where it has one)."""
    import lcm_edge

    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle, **({"threads": threads} if threads else {}))
    clips, start = [], time.perf_counter()
    for i, combo in enumerate(combos):
        result = pipe(caption_for(*combo), num_inference_steps=steps, seed=seed_base + i)
        clips.append(result.frames)
    return clips, (time.perf_counter() - start) / len(combos), list(result.timesteps)


def run_teacher(teacher: Path, motion: Path, combos, steps: int, guidance: float, threads: int | None,
                seed_base: int = EVAL_SEED_BASE) -> tuple[list[np.ndarray], float]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = {"local_files_only": True}
    pipe = AnimateDiffPipeline(
        vae=AutoencoderKL.from_pretrained(teacher / "vae", **local),
        text_encoder=CLIPTextModel.from_pretrained(teacher / "text_encoder", **local),
        tokenizer=CLIPTokenizer.from_pretrained(teacher / "tokenizer", **local),
        unet=UNet2DConditionModel.from_pretrained(teacher / "unet", **local),
        motion_adapter=MotionAdapter.from_pretrained(motion, **local),
        scheduler=DDIMScheduler.from_pretrained(teacher / "scheduler", **local))
    pipe.set_progress_bar_config(disable=True)
    return sample_diffusers(pipe, combos, steps, guidance, seed_base)


def sample_diffusers(pipe, combos, steps: int, guidance: float,
                     seed_base: int = EVAL_SEED_BASE) -> tuple[list[np.ndarray], float]:
    """A diffusers AnimateDiffPipeline's uint8 clips of `combos` (clip i at seed_base + i), and its s/clip."""
    import torch

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    clips, start = [], time.perf_counter()
    for i, combo in enumerate(combos):
        out = pipe(caption_for(*combo), num_frames=16, height=size, width=size, num_inference_steps=steps,
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(seed_base + i),
                   output_type="np")
        clips.append((out.frames[0] * 255).round().astype(np.uint8))
    return clips, (time.perf_counter() - start) / len(combos)


def plot(results: list[dict], path: Path) -> None:
    """Adherence vs steps for both methods, drawn with OpenCV (no plotting dependency)."""
    w, h, pad = 640, 400, 60
    img = np.full((h, w, 3), 255, np.uint8)
    steps_axis = [1, 2, 4, 8, 25, 50]
    xs = {s: pad + int(i * (w - 2 * pad) / (len(steps_axis) - 1)) for i, s in enumerate(steps_axis)}
    y = lambda v: h - pad - int(v * (h - 2 * pad))  # noqa: E731
    cv2.line(img, (pad, h - pad), (w - pad, h - pad), (0, 0, 0), 1)
    cv2.line(img, (pad, pad), (pad, h - pad), (0, 0, 0), 1)
    for s, x in xs.items():
        cv2.putText(img, str(s), (x - 8, h - pad + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    for v in (0.0, 0.5, 1.0):
        cv2.putText(img, f"{v:.1f}", (pad - 35, y(v) + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    for method, colour in (("consistency model (no CFG)", (40, 40, 220)), ("teacher DDIM (CFG)", (200, 120, 30))):
        pts = [(xs[r["steps"]], y(r["adherence"])) for r in results if r["method"] == method]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, a, b, colour, 2)
        for p in pts:
            cv2.circle(img, p, 4, colour, -1)
        cv2.putText(img, method, (pad + 10, pad - 20 + 18 * (colour[0] > 100)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    colour, 1)
    cv2.putText(img, "prompt adherence vs sampling steps", (pad, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


SAMPLE_ROWS = 8


def write_samples(clips: list[np.ndarray], combos, path: Path, every: int = 3, zoom: int = 2) -> None:
    """One row per clip (every `every`-th frame), its prompt and the detector's reading above it."""
    rows = []
    for frames, combo in zip(clips, combos):
        d = detect(frames)
        strip = np.concatenate(list(frames[::every]), axis=1)
        strip = cv2.resize(strip, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
        label = np.full((14, strip.shape[1], 3), 255, np.uint8)
        text = f"{' '.join(combo)} -> {d.colour} {d.shape} {d.direction}"
        cv2.putText(label, text, (2, 11), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1, cv2.LINE_AA)
        rows += [label, strip]
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="the student bundle (default: the shipped one)")
    parser.add_argument("--teacher", type=Path, default=None, help="WORKDIR/teacher of the chain")
    parser.add_argument("--teacher-motion", type=Path, default=None, help="WORKDIR/teacher_motion of the chain")
    parser.add_argument("--split", choices=sorted(SEED_BASES), default="tune",
                        help="tune: the seeds the recipe was chosen on; eval: disjoint seeds never used to choose")
    parser.add_argument("--prompts", type=int, default=EVAL_PROMPTS)
    parser.add_argument("--seeds", type=int, default=1,
                        help="clips per prompt (each at its own seed): more narrow the rates' intervals")
    # Stage 2 distilled with w in [1.5, 3], i.e. CFG scale 1 + w up to 4: the teacher is read at that scale.
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--student-steps", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--teacher-steps", type=int, nargs="*", default=[1, 2, 4, 8, 25, 50])
    parser.add_argument("--rows-from", type=Path, default=None,
                        help="results.json of an earlier run (same prompts): its rows join this table")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both (torch and onnxruntime): s/clip compares like with like")
    parser.add_argument("--out", type=Path, default=Path("results/default_model"))
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.teacher_steps and (args.teacher is None or args.teacher_motion is None):
        parser.error("--teacher and --teacher-motion are needed for the teacher rows (or pass --teacher-steps "
                     "with no values)")
    args.out.mkdir(parents=True, exist_ok=True)
    combos = prompt_set(args.prompts, args.seeds)
    if len(combos) > SPLIT_SEEDS:
        parser.error(f"{len(combos)} clips is more than a split's {SPLIT_SEEDS} seeds")
    prompts = len(combos) // args.seeds  # at most every combination once
    seed_base, commit = SEED_BASES[args.split], code_version()
    trace = {"split": args.split, "seed_base": seed_base, "commit": commit}
    results = []
    if args.student_steps:
        from lcm_edge.default import default_bundle_path

        bundle = args.bundle or str(default_bundle_path())
        trace_student = {**trace, "model_sha256": sha256_of(Path(bundle) / "bundle.json")}
    if args.teacher_steps:
        weights = [next((folder).glob("*.safetensors")) for folder in (args.teacher / "unet", args.teacher_motion)]
        trace_teacher = {**trace, "model_sha256": sha256_of(*weights)}
    for steps in args.student_steps:
        clips, sec, timesteps = run_student(bundle, combos, steps, args.threads, seed_base)
        if steps == 4:
            write_samples(clips[:SAMPLE_ROWS], combos[:SAMPLE_ROWS], args.out / "samples.png")
        results.append({"method": "consistency model (no CFG)", "steps": steps, "guidance": 1.0, "timesteps": timesteps,
                        "seconds_per_clip": sec, "prompts": prompts, "seeds": args.seeds, **score(clips, combos),
                        **first_prompts_adherence(clips, combos), **trace_student})
        print(results[-1], flush=True)
    for steps in args.teacher_steps:
        clips, sec = run_teacher(args.teacher, args.teacher_motion, combos, steps, args.guidance, args.threads,
                                 seed_base)
        results.append({"method": "teacher DDIM (CFG)", "steps": steps, "guidance": args.guidance,
                        "seconds_per_clip": sec, "prompts": prompts, "seeds": args.seeds, **score(clips, combos),
                        **first_prompts_adherence(clips, combos), **trace_teacher})
        print(results[-1], flush=True)
    if args.rows_from is not None:
        earlier = json.loads(args.rows_from.read_text())
        if any(r.get("prompts") != prompts or r.get("seeds", 1) != args.seeds for r in earlier):
            raise SystemExit(f"--rows-from {args.rows_from}: rows were measured on another prompt or seed count")
        # Rows from before seed bases were recorded were all measured at the tune split's base.
        results += [{"split": "tune", "seed_base": SEED_BASES["tune"], "commit": "not recorded",
                     "model_sha256": "not recorded", **r} for r in earlier]
    results.sort(key=lambda r: (r["method"] != "consistency model (no CFG)", r["steps"], r["seed_base"]))
    header = ("| method | steps | guidance | adherence | adherence 95% interval | colour | shape | direction | "
              "adherence (held-out) | temporal consistency | s/clip | seed base | model sha256 | commit |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    interval = lambda r: "%.2f-%.2f" % wilson_interval(r["adherence"], r["prompts"] * r.get("seeds", 1))  # noqa: E731
    lines = [header] + [
        f"| {r['method']} | {r['steps']} | {r['guidance']} | {r['adherence']:.2f} | {interval(r)} | "
        f"{r['colour']:.2f} | {r['shape']:.2f} | {r['direction']:.2f} | {r['adherence_held_out']:.2f} | "
        f"{r['consistency']:.2f} | {r['seconds_per_clip']:.2f} | {r['seed_base']} | {r['model_sha256'][:12]} | "
        f"{r['commit']} |" for r in results]
    schedules = "; ".join(f"{r['steps']} step{'s' * (r['steps'] > 1)} {'/'.join(map(str, r['timesteps']))}"
                          for r in results if "timesteps" in r)
    if schedules:
        lines.append(f"\nConsistency model timesteps: {schedules}.")
    table = "\n".join(lines)
    print(f"\n{len(combos)} clips: {prompts} prompts ({len(HELD_OUT)} held out of training) x "
          f"{args.seeds} seed(s), 16 frames each\n{table}")
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "plot.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
