"""Latency and memory of one bundle across runtimes: a reproducible benchmark mode.

    python benchmarks/runtime_latency.py --bundle DIR [--runtime onnxruntime:cpu openvino:CPU ...]
        [--frames 16] [--height H] [--width W] [--steps 4] [--guidance-scale 1.0] [--repeats 3]
        [--json results.json]

For each runtime it reports the first run (graph compile + warm-up) apart from the steady
state, and per-stage medians over the repeats (text encoder, UNet step, VAE decode, total),
plus the process's peak RSS after that runtime. Each runtime runs in its own subprocess so
peak RSS is that runtime's own, not the sum of everything measured before it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(bundle: str, runtime: str, frames: int | None, height: int | None, width: int | None, steps: int,
            guidance: float, repeats: int) -> dict:
    import lcm_edge

    backend, _, device = runtime.partition(":")
    t0 = time.perf_counter()
    pipe = lcm_edge.AnimateLCMPipeline.from_bundle(bundle, backend=backend, device=device or None)
    load_s = time.perf_counter() - t0
    kwargs = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps,
                  guidance_scale=guidance, seed=0)
    t0 = time.perf_counter()
    first = pipe("a red circle moving right", **kwargs)
    first_s = time.perf_counter() - t0
    runs = [pipe("a red circle moving right", **kwargs).timings for _ in range(repeats)]
    med = statistics.median
    return {
        "runtime": runtime, "describe": pipe.backend.describe(), "load_s": load_s, "first_run_s": first_s,
        "frames": first.frames.shape[0], "height": first.frames.shape[1], "width": first.frames.shape[2],
        "steps": steps, "guidance_scale": guidance, "repeats": repeats,
        "text_encoder_s": med(r.text_encoder_s for r in runs),
        "unet_step_s": med(s for r in runs for s in r.unet_steps_s),
        "vae_decode_s": med(r.vae_decode_s for r in runs),
        "total_s": med(r.total_s for r in runs),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--runtime", nargs="+", default=["onnxruntime:cpu", "openvino:CPU"])
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.bundle, args.child, args.frames, args.height, args.width, args.steps,
                                 args.guidance_scale, args.repeats)))
        return 0
    rows = []
    for runtime in args.runtime:
        child = [sys.executable, __file__, "--bundle", args.bundle, "--child", runtime, "--steps", str(args.steps),
                 "--guidance-scale", str(args.guidance_scale), "--repeats", str(args.repeats)]
        for flag in ("frames", "height", "width"):
            if getattr(args, flag) is not None:
                child += [f"--{flag}", str(getattr(args, flag))]
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = (f"{'runtime':<38} {'clip':>14} {'load s':>7} {'1st run s':>9} {'text s':>7} {'unet/step s':>11} "
              f"{'vae s':>7} {'total s':>8} {'peak MB':>8}")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(header)
    for r in rows:
        clip = f"{r['frames']}x{r['width']}x{r['height']}"
        print(f"{r['describe']:<38} {clip:>14} {r['load_s']:>7.2f} {r['first_run_s']:>9.2f} "
              f"{r['text_encoder_s']:>7.3f} {r['unet_step_s']:>11.3f} {r['vae_decode_s']:>7.3f} "
              f"{r['total_s']:>8.3f} {r['peak_rss_mb']:>8.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
