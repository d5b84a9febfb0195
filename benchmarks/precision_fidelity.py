"""bf16 (or f16) against f32 on the default model: frame PSNR and prompt adherence, same seeds.

    python benchmarks/precision_fidelity.py [--bundle DIR] [--precision bf16] [--prompts 60] [--seed-base 30000]

Every clip is generated twice on OpenVINO (f32 and the candidate precision) from the same seed, so the
same latents and noise; rows: adherence (colour, shape and direction all right, read by the default model's
detector), each attribute, and the frame PSNR of the candidate against f32 (worst frame, median clip).
Seeds start at 30000, never used to train or tune the default model. Needs the distill extra (the detector).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_model_eval import prompt_set, score  # noqa: E402

from lcm_edge import AnimateLCMPipeline  # noqa: E402
from lcm_edge.default import default_bundle_path  # noqa: E402
from lcm_edge.distill.default_model.detector import detect  # noqa: E402
from lcm_edge.distill.synthetic import caption_for  # noqa: E402
from lcm_edge.cpu import cpu_flags  # noqa: E402
from lcm_edge.fidelity import frame_psnr_db  # noqa: E402
from lcm_edge.precision import MIN_FRAME_PSNR_DB  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--precision", default="bf16", choices=sorted(MIN_FRAME_PSNR_DB))
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--seed-base", type=int, default=30_000)
    args = parser.parse_args()
    bundle = args.bundle or default_bundle_path()
    combos = prompt_set(args.prompts)
    clips, seconds = {}, {}
    for precision in ("f32", args.precision):
        pipe = AnimateLCMPipeline.from_bundle(bundle, backend="openvino", device=args.device, precision=precision)
        pipe(caption_for(*combos[0]), seed=args.seed_base)  # compile outside the timing
        start = time.perf_counter()
        clips[precision] = [pipe(caption_for(*c), seed=args.seed_base + i).frames for i, c in enumerate(combos)]
        seconds[precision] = (time.perf_counter() - start) / len(combos)
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"bundle {bundle}, {len(combos)} prompts, seeds {args.seed_base}.., OpenVINO {args.device}, CPU flags {flags}")
    print(f"{'precision':<10} {'adherence':>9} {'colour':>7} {'shape':>6} {'direction':>9} {'held out':>8} "
          f"{'s/clip':>7}")
    for precision, frames in clips.items():
        s = score(frames, combos)
        print(f"{precision:<10} {s['adherence']:>9.3f} {s['colour']:>7.3f} {s['shape']:>6.3f} {s['direction']:>9.3f} "
              f"{s['adherence_held_out']:>8.3f} {seconds[precision]:>7.3f}")
    worst = np.array([frame_psnr_db(a, b).min() for a, b in zip(clips["f32"], clips[args.precision])])
    print(f"{args.precision} vs f32 worst-frame PSNR per clip (dB): min {worst.min():.2f}, median "
          f"{np.median(worst):.2f}, max {worst.max():.2f}; clips under the gate's "
          f"{MIN_FRAME_PSNR_DB[args.precision]:.0f} dB: {(worst < MIN_FRAME_PSNR_DB[args.precision]).sum()}"
          f"/{len(worst)}")
    same = sum(all(detect(a).matches(*c).values()) == all(detect(b).matches(*c).values())
               for a, b, c in zip(clips["f32"], clips[args.precision], combos))
    print(f"clips whose adherence verdict is the same at both precisions: {same}/{len(combos)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
